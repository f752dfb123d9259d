"""Turn a model spec into a `LoadedModel`: a decoder-only causal LM in eval mode, its tokenizer,
and where it came from.

`load_model(spec)` accepts a built-in name (see `mi_prun.models.zoo`), a Hugging Face id, a local
model folder or a `.gguf` file (a `str` or any `os.PathLike`). It refuses, each with a one-line
`MiPrunError` naming the fix: encoder and seq2seq models, remote code unless asked for, weights
that cannot fit in memory (before loading them), corrupt files, and weights that disagree with
the config (which transformers would fill with random numbers).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from accelerate import init_empty_weights
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mi_prun.errors import MiPrunError
from mi_prun.config import ExecutionConfig
from mi_prun.files import check_path_length, parse_json
from mi_prun.models import gguf_cache
from mi_prun.models.blocks import find_blocks, num_layers_of
from mi_prun.models.families import BLOCK_PATHS
from mi_prun.runtime.identity import model_identity
from mi_prun.models.memory import check_memory, check_streamable, fits, weights_bytes
from mi_prun.runtime.sources import WeightSource, offload_to_cpu, open_streamed, weight_source
from mi_prun.models.tiny import tiny_model
from mi_prun.models.zoo import (
    DEFAULT_MODEL,
    ZOO,
    builtin_names,
    drop_quantization_marker,
    ensure_builtin,
    hub_id,
    tiny_family,
)

log = logging.getLogger(__name__)

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
    except (RuntimeError, TypeError) as exc:
        raise MiPrunError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MiPrunError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise MiPrunError(f"device {device!r} asked for but MPS (Apple GPU) is not available: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise MiPrunError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
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
    source: str  # resolved: folder path, hub id, or the folder of a gguf file
    model_type: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    weights: WeightSource | None = None  # where the weights live, chosen by load_model (derived when None)

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = weight_source(self.model)

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.model))

    @property
    def hub_id(self) -> str | None:
        """The model's id on the Hugging Face hub, or None (see `mi_prun.models.zoo.hub_id`)."""
        return hub_id(self)

    def describe(self) -> dict:
        """What results record of the model: names, size, hub id and its identity (see
        `mi_prun.runtime.identity.model_identity`), so an analysis can refuse to prune another model."""
        return {
            "spec": self.spec,
            "source": self.source,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "n_blocks": self.n_blocks,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "hub_id": self.hub_id,
            **self.info,
            "identity": model_identity(self.model),
        }


def _is_encoder_config(config: Any) -> bool:
    """Encoder-only (bidirectional) or encoder-decoder: no causal block chain to prune.

    An architecture with a masked-LM head is bidirectional; its causal-LM class is a decoder only
    when the config says `is_decoder=True` (transformers' own rule for BERT-like models).
    """
    if getattr(config, "is_encoder_decoder", False):
        return True
    try:
        # optional: a private transformers path that may move between versions
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
        not getattr(config, "is_decoder", False)


def _not_causal(spec: str, config: Any) -> MiPrunError:
    return MiPrunError(
        f"{spec} ({getattr(config, 'model_type', '?')}) is not a causal language model "
        "(encoder-only or seq2seq models have no block chain to prune). Fix: choose a "
        "decoder-only LM.")


# ----------------------------------------------------------------------------------------------
# weights that disagree with the config

# Buffers older checkpoints saved that today's classes compute instead; harmless when left over.
_STRAY_BUFFER_LEAVES = frozenset({"inv_freq", "masked_bias"})
_STRAY_BUFFER_PAIRS = frozenset({("attn", "bias"), ("attention", "bias")})  # causal-mask buffers


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _weights(keys: list[str]) -> str:
    return f"{len(keys)} weight{'' if len(keys) == 1 else 's'}"


def _are(keys: list[str]) -> str:
    return "is" if len(keys) == 1 else "are"


def _check_weights_match(spec: str, model: nn.Module, loading_info: dict) -> None:
    """Refuse a model some of whose weights were not in the files, or whose files hold weights it
    has no place for: transformers initialises the first at random (and warns, in a log mi-prun
    silences) and drops the second."""
    state = model.state_dict(keep_vars=True)
    missing_all = set(loading_info.get("missing_keys") or ())
    loaded_ids = {id(t) for k, t in state.items() if k not in missing_all}
    # A tied weight (an LM head sharing the embeddings) is loaded once under the other name.
    missing = sorted(k for k in missing_all if k.rsplit(".", 1)[-1] not in _STRAY_BUFFER_LEAVES
                     and not (k in state and id(state[k]) in loaded_ids))
    unexpected = sorted(k for k in loading_info.get("unexpected_keys") or ()
                        if k.rsplit(".", 1)[-1] not in _STRAY_BUFFER_LEAVES
                        and tuple(k.split(".")[-2:]) not in _STRAY_BUFFER_PAIRS)
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m)
                        for m in loading_info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    head = f"the weights of {spec} do not match its config"
    try:
        blocks = find_blocks(model)
    except MiPrunError:
        blocks = None
    if blocks is not None:
        prefix = blocks.path + "."

        def block_of(key: str) -> int | None:
            number = key[len(prefix):].split(".", 1)[0] if key.startswith(prefix) else ""
            return int(number) if number.isdigit() else None

        n_config = len(blocks)
        per_block: dict[int, list[str]] = {}
        for key in state:
            if block_of(key) is not None:
                per_block.setdefault(block_of(key), []).append(key)
        missing_set = set(missing)
        absent = [b for b, keys in per_block.items() if all(k in missing_set for k in keys)]
        extra = {block_of(k) for k in unexpected} - {None} - set(range(n_config))
        n_weights = n_config - len(absent) + len(extra)
        if n_weights != n_config:
            head = f"the config of {spec} says {n_config} blocks but its weights hold {n_weights}"
    parts = []
    if missing:
        parts.append(f"{_weights(missing)} the model needs {_are(missing)} not in the files "
                     f"({_some(missing)})")
    if unexpected:
        parts.append(f"{_weights(unexpected)} in the files {'fits' if len(unexpected) == 1 else 'fit'} "
                     f"nowhere in the model ({_some(unexpected)})")
    if mismatched:
        parts.append(f"{_weights(mismatched)} {_are(mismatched)} of the wrong shape "
                     f"({_some(mismatched)})")
    raise MiPrunError(
        f"{head}: {'; '.join(parts)}. The files are damaged or were edited by hand, and the model "
        "would run with random or missing weights. Fix: export or download it again (to change "
        "the number of blocks, prune it with mi-prun rather than editing config.json).")


# ----------------------------------------------------------------------------------------------
# load


def _resolve(spec: str, is_path: bool, info: dict, progress) -> tuple[str, str | None]:
    """(source, gguf file name or None) for a spec that is not a tiny model."""
    if not is_path and spec in ZOO:
        info["zoo"] = spec
        info["hf_id"] = ZOO[spec].hf_id
        return str(ensure_builtin(spec, progress=progress)), None
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise MiPrunError(f"GGUF file not found: {spec}. Fix: give the path of an existing .gguf file.")
        info["gguf"] = str(path.resolve())
        info["gguf_sha256"] = gguf_cache.file_digest(path)
        hit = gguf_cache.cached(info["gguf_sha256"])
        if hit is not None:  # converted before: no dequantisation (see mi_prun.models.gguf_cache)
            log.info("%s: loading the model converted before, cached in %s", spec, hit)
            info["gguf_cache"] = str(hit)
            return str(hit), None
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise MiPrunError(
                f"{spec} is not a model folder (no config.json). Fix: give a folder written "
                "by save_pretrained, a .gguf file, a Hugging Face id or a zoo name "
                f"({', '.join(sorted(ZOO))})."
            )
        return str(path), None
    if not is_path and spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None  # Hugging Face id
    raise MiPrunError(
        f"model {spec!r} not found: it is no local path, no Hugging Face id (owner/name) "
        f"and no built-in name ({builtin_names()})."
    )


# What a config.json field of the wrong type or value raises in transformers, reading the config or
# building the model from it (an unknown activation, a negative vocabulary size, a list for a dtype).
CONFIG_DAMAGE = (TypeError, AttributeError, KeyError, IndexError, AssertionError)


def _damaged_config(what: str, exc: BaseException) -> MiPrunError:
    detail = " ".join((str(exc) or type(exc).__name__).split())[:300].rstrip(".")
    return MiPrunError(f"{what}: {detail}. Fix: config.json is damaged or was edited by hand; export or "
                       "download the model again.")


def _load_config(spec: str, source: str, kwargs: dict, gguf_file: str | None) -> Any:
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
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
        if isinstance(exc, CONFIG_DAMAGE) or type(exc).__name__.startswith("StrictDataclass"):
            raise _damaged_config(f"cannot read the config of {spec}", exc) from exc
        raise


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "spiece.model")


def check_weight_index(folder: Path) -> None:
    """Refuse a sharded checkpoint whose index file is damaged or names a shard that is missing,
    naming the file (transformers reports these as a KeyError or TypeError about its internals)."""
    for name in WEIGHT_INDEXES:
        index = folder / name
        if not index.is_file():
            continue
        fix = "Fix: download or export the model again (the index and every shard it names)."
        try:
            data = parse_json(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MiPrunError(f"the weight index {index} cannot be read ({type(exc).__name__}). {fix}") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise MiPrunError(f"the weight index {index} holds no valid 'weight_map' (tensor name -> shard file). {fix}")
        missing = sorted({v for v in weight_map.values() if not (folder / v).is_file()})
        if missing:
            raise MiPrunError(f"the weight index {index} names shard(s) that are not there: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}. {fix}")


def _tokenizer_error(spec: str, source: str, exc: BaseException) -> MiPrunError:
    """A tokenizer that cannot be loaded, with the files that were there and the fix."""
    folder = Path(source)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
    if folder.is_dir():
        present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if not present:
            return MiPrunError(f"cannot load the tokenizer of {spec}: {folder} holds no tokenizer file "
                               f"({', '.join(TOKENIZER_FILES[:3])}, ...). Fix: copy the tokenizer files of the "
                               "original model into the folder, or export or download it again.")
        return MiPrunError(f"cannot load the tokenizer of {spec}: {reason} (tokenizer files in {folder}: "
                           f"{', '.join(present)}; one of them is damaged). Fix: copy the tokenizer "
                           "files of the original model into the folder, or export or download it again.")
    return MiPrunError(f"cannot load the tokenizer of {spec}: {reason}. Fix: check the model id, or download "
                       "the model again.")


def _load_weights(spec: str, source: str, config: Any, kwargs: dict) -> nn.Module:
    if Path(source).is_dir():
        check_weight_index(Path(source))
    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            source, config=config, output_loading_info=True, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise _not_causal(spec, config) from exc
        raise MiPrunError(f"cannot load the weights of {spec}: {str(exc).splitlines()[0]}") from exc
    except CONFIG_DAMAGE as exc:  # the config parsed, but a field's value breaks building the model
        raise _damaged_config(f"cannot build {spec} from its config ({type(exc).__name__})", exc) from exc
    except Exception as exc:
        # safetensors reports a truncated or corrupt file as its own SafetensorError.
        if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
            raise
        raise MiPrunError(
            f"cannot load the weights of {spec}: {(str(exc).splitlines() or [type(exc).__name__])[0]} "
            "Fix: the weights file may be truncated or corrupt; download or export it again."
        ) from exc
    _check_weights_match(spec, model, loading_info)
    return model


def _n_layers(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return num_layers_of(text) or num_layers_of(config) or 0


def _safetensors_keys(folder: Path) -> list[str]:
    """Tensor names of the safetensors files in `folder`, from the headers only (no weights read);
    [] when there are none or a header cannot be read (the loader then names the damage)."""
    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= 100 * 2**20:
                    return []
                header = parse_json(fh.read(size))
        except (OSError, ValueError):
            return []
        if not isinstance(header, dict):
            return []
        keys += [k for k in header if k != "__metadata__"]
    return keys


def _few(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (" ..." if len(numbers) > 5 else "")


def check_block_count(spec: str, source: str, config: Any, gguf_file: str | None = None) -> None:
    """Refuse a local safetensors model whose config names another number of blocks than its weight
    files hold, before any weights are read, on every load path (resident, device map, streamed).
    transformers would fill missing blocks with random weights or drop extra ones; streaming would
    run only the blocks the config names. Block tensors are found under the family's block path
    (`BLOCK_PATHS`), with or without the base model's prefix; a family not in the table, a GGUF file
    (whose config is read from the same file) or a hub id not on disk is left to the loader's own
    check of the weights against the model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    path = BLOCK_PATHS.get(getattr(config, "model_type", None) or "") or \
        BLOCK_PATHS.get(getattr(text, "model_type", None) or "")
    folder = Path(source)
    n_config = _n_layers(config)
    if gguf_file is not None or path is None or not folder.is_dir() or not n_config:
        return
    prefixes = {path + "."} | ({path.split(".", 1)[1] + "."} if "." in path else set())
    found: set[int] = set()
    for key in _safetensors_keys(folder):
        for prefix in prefixes:
            if key.startswith(prefix):
                number = key[len(prefix):].split(".", 1)[0]
                if number.isdigit():
                    found.add(int(number))
    if found and found != set(range(n_config)):
        n_weights = max(found) + 1
        gaps = sorted(set(range(n_weights)) - found)
        held = f"{n_weights}" + (f" (blocks {', '.join(map(str, gaps[:5]))} missing)" if gaps else "")
        absent = sorted(set(range(n_config)) - found)
        extra = sorted(found - set(range(n_config)))
        what = "; ".join(
            ([f"the weights of block(s) {_few(absent)} are not in the files"] if absent else [])
            + ([f"the files hold block(s) {_few(extra)} that fit nowhere in the model"] if extra else []))
        raise MiPrunError(f"the config of {spec} says {n_config} blocks but its weights hold {held}: {what}. The files are "
                          "damaged or were edited by hand, and the model would run with random or missing blocks. "
                          "Fix: export or download it again (to change the number of blocks, prune it with mi-prun "
                          "rather than editing config.json).")


def _stream_folder(spec: str, source: str, gguf_file: str | None) -> Path:
    """The local folder of safetensors files a streamed model reads its blocks from."""
    if gguf_file is not None:
        raise MiPrunError(f"{spec} is a GGUF file, whose quantised blocks cannot stream. Fix: load it without "
                          "--stream, or convert it to safetensors first (the zoo's models are converted).")
    folder = Path(source)
    if not folder.is_dir():
        hit = try_to_load_from_cache(source, "config.json")
        if not isinstance(hit, str):
            raise MiPrunError(f"{spec} is not on this disk, and streaming reads the weights from local files. "
                              "Fix: download it first (huggingface-cli download), then give its folder.")
        folder = Path(hit).parent
    if not any(folder.glob("*.safetensors")):
        raise MiPrunError(f"{spec} has no .safetensors weights, and streaming reads blocks from them. Fix: "
                          "save it with save_pretrained(safe_serialization=True), or load without --stream.")
    return folder


MAP_EXAMPLE = '{"model.embed_tokens": 0, "model.layers.0": "cpu", ...}'


def read_device_map(path: str | os.PathLike) -> dict:
    """A {module name: device} map from a JSON file (accelerate's `device_map` format)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MiPrunError(f"device map file {path} not found. Fix: give an existing JSON file, or auto, "
                          "balanced or sequential.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MiPrunError(f"device map file {path} cannot be read ({type(exc).__name__}). Fix: write it as "
                          f"{MAP_EXAMPLE}.") from exc
    return parse_device_map(text, f"device map file {path}")


def parse_device_map(text: str, where: str = "the device map") -> dict:
    """A {module name: device} map from JSON text (a file's content, or an inline `--device-map
    '{"": "cpu"}'`)."""
    try:
        value = parse_json(text)
    except ValueError as exc:
        raise MiPrunError(f"{where} is not valid JSON ({type(exc).__name__}). Fix: write it as {MAP_EXAMPLE}.") from exc
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
        raise MiPrunError(f"{where} must hold a non-empty JSON object of module name -> device. "
                          f"Fix: write it as {MAP_EXAMPLE}.")
    return value


def _check_writable(folder: Path) -> None:
    """Refuse an offload folder that cannot be written, before anything is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mi_prun_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MiPrunError(f"the offload folder {folder} is not writable ({exc.strerror or type(exc).__name__}). "
                          "Fix: give a folder you can write to (--offload-folder).") from exc


def _check_device_map(device_map: dict) -> None:
    """Refuse a device map naming devices this machine lacks, or a module twice (an entry inside
    another: which device would win is accelerate's detail), in one line."""
    names = sorted(device_map)
    for name in names:
        outer = next((o for o in names if o != name and (o == "" or name.startswith(o + "."))), None)
        if outer is not None:
            where = outer if outer else 'the whole model ("")'
            raise MiPrunError(f"the device map places {name} twice: by its own entry and inside {where}. Fix: give "
                              "each module one entry (drop one of them).")
    for module, where in device_map.items():
        if where in ("disk", "cpu") or (isinstance(where, int) and not isinstance(where, bool)):
            if isinstance(where, int) and not (torch.cuda.is_available() and where < torch.cuda.device_count()):
                raise MiPrunError(f"the device map puts {module or 'the model'} on GPU {where}, which this machine "
                                  f"does not have ({torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                                  "GPUs). Fix: use cpu, disk or an existing GPU number, or --device-map auto.")
            continue
        try:
            dev = resolve_device(str(where))
        except MiPrunError as exc:
            raise MiPrunError(f"the device map puts {module or 'the model'} on {where!r}: {exc}") from None
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MiPrunError(f"the device map puts {module or 'the model'} on {where}, which this machine does "
                              f"not have ({torch.cuda.device_count()} GPUs). Fix: use an existing device.")


def _check_device_map_modules(spec: str, device_map: dict, config: Any) -> None:
    """Refuse a device map naming modules the model does not have (a typo would be ignored) or
    leaving modules with weights unplaced (accelerate lists every parameter), naming a few; the
    module names come from the model built on the meta device (no memory)."""
    try:
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 (the loader below reports a config it cannot build)
        log.debug("no skeleton to check the device map against: %s", exc)
        return
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = sorted(k for k in device_map if k not in modules)
    if unknown:
        close = [difflib.get_close_matches(k, sorted(modules), n=1) for k in unknown[:3]]
        hint = "; ".join(f"{k!r} (did you mean {c[0]!r}?)" if c else repr(k) for k, c in zip(unknown[:3], close))
        raise MiPrunError(f"the device map names module(s) that {spec} does not have: {hint}"
                          f"{' ...' if len(unknown) > 3 else ''}. Fix: use the model's module names, e.g. "
                          f"{', '.join(sorted(m for m in modules if m and m.count('.') <= 1)[:4])}.")

    def placed(param: str) -> bool:
        return "" in device_map or any(param == k or param.startswith(k + ".") for k in device_map)

    unplaced = sorted({p.rsplit(".", 1)[0] for p, _ in skeleton.named_parameters() if not placed(p)})
    if unplaced:
        raise MiPrunError(f"the device map leaves {len(unplaced)} module(s) of {spec} without a device: "
                          f"{', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''}. Fix: give every module a "
                          "device (a parent such as model.layers covers its blocks), or use --device-map auto.")


def _offloading(folder: Path, load: Callable[[], nn.Module]) -> nn.Module:
    """`load()` with accelerate offloading weights into `folder`: if it fails (a full disk, an
    interrupt), the files it wrote there are removed (the folder's earlier content is kept), and a
    full disk is named as such (not as damaged weights)."""
    before = set(os.listdir(folder))
    try:
        return load()
    except BaseException as exc:
        for name in set(os.listdir(folder)) - before:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        cause: BaseException | None = exc
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise MiPrunError(f"the offload folder {folder} filled up while the weights were written to it "
                              f"({os.strerror(cause.errno)}); the files written there were removed. Fix: free disk "
                              "space there, or give an --offload-folder on a disk with more room.") from exc
        raise


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    progress=None,
    check_memory_first: bool = True,
    stream: bool | str = "auto",
    offload_folder: str | os.PathLike | None = None,
    offload: bool | str | None = None,
) -> LoadedModel:
    """Load a decoder-only causal LM for analysis.

    spec: a zoo name (`smollm2-135m`, `tiny-llama`, ...), a local folder, a `.gguf` file, or a
    Hugging Face id; a `Path` (any `os.PathLike`) is always a local folder or `.gguf` file.
    device: `auto` | `cpu` | `cuda[:N]` | `mps`. dtype: `auto` (bfloat16 on a GPU, float32 on the
    CPU) or a name. device_map: passed to accelerate (`"auto"` spreads a model larger than one
    GPU); device is then ignored for placement. trust_remote_code stays off unless the caller asks
    for it. check_memory_first: refuse weights larger than the free memory of the device before
    loading (skipped with a device_map, or when the size is unknown). stream: True streams the
    blocks (`mi_prun.runtime.sources`: weights stay in the safetensors files, or in CPU memory for a
    tiny model, one block at a time on the device); "auto" streams when the memory check says the
    weights do not fit; False never streams (and the memory check refuses). offload_folder:
    accelerate's folder for the weights a device_map offloads to disk (must be writable). offload:
    the earlier name of `stream`, still accepted. The weight source chosen here travels with the
    result (`LoadedModel.weights`).
    """
    t0 = time.perf_counter()
    is_path = isinstance(spec, os.PathLike)
    spec = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise MiPrunError(f"model spec must be a name or a path, got {spec!r}.")
    check_path_length(spec, "model path")
    dev = resolve_device(device)
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        device_map = parse_device_map(device_map, "the inline device map")
    elif isinstance(device_map, (str, os.PathLike)) and os.fspath(device_map).endswith(".json"):
        device_map = read_device_map(device_map)
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        resolve_device(device_map)  # a device name: an unknown or missing device fails here, in one line
    dt = resolve_dtype(dtype, dev)

    if offload is not None:  # the earlier name of `stream`
        stream = offload
    asked = stream  # what the caller asked for; `stream` below is the decision
    ExecutionConfig(stream=stream, device_map=device_map,
                    offload_folder=None if offload_folder is None else os.fspath(offload_folder))
    if isinstance(device_map, dict):
        _check_device_map(device_map)
    if offload_folder is not None:
        _check_writable(Path(offload_folder))
    info: dict = {}
    family = None if is_path else tiny_family(spec)
    if family is not None and device_map is not None:
        raise MiPrunError(f"a device map would be ignored: the built-in {spec} is built in memory on one device. "
                          "Fix: drop --device-map (use --device), or save the model with save_pretrained and give "
                          "its folder.")
    if family is not None:
        model, tokenizer = tiny_model(family)
        if asked is True:  # the weights stay in CPU memory; blocks move to the device one at a time
            model = offload_to_cpu(model, dev, dt)
            info["offload"] = "cpu"
        else:
            model = model.to(device=dev, dtype=dt)
        source = spec
    else:
        source, gguf_file = _resolve(spec, is_path, info, progress)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        config = _load_config(spec, source, kwargs, gguf_file)
        if _is_encoder_config(config):
            raise _not_causal(spec, config)
        check_block_count(spec, source, config, gguf_file)  # every path below: resident, device map, streamed
        if isinstance(device_map, dict):
            _check_device_map_modules(spec, device_map, config)
        need = weights_bytes(source, gguf_file, dt) if device_map is None else None
        stream = asked is True or (asked == "auto" and check_memory_first and gguf_file is None
                                     and not fits(need, dev))  # a GGUF file cannot stream: the check refuses it
        if stream and asked == "auto" and not fits(3 * need // max(_n_layers(config), 1), dev):
            check_memory(spec, need, dev, dt)  # fits nowhere: the memory check's message lists every way out
        if stream:
            folder = _stream_folder(spec, source, gguf_file)
            check_streamable(spec, need, _n_layers(config), dev, dt)
            if asked == "auto":
                log.info("%s does not fit in %s memory: streaming its blocks from %s", spec, dev.type, folder)
            info["offload"] = "disk"
        elif check_memory_first and device_map is None:
            check_memory(spec, need, dev, dt)
        tokenizer_kwargs = dict(kwargs)
        kwargs["dtype"] = dt
        if device_map is not None:
            kwargs["device_map"] = device_map
            if offload_folder is not None:
                kwargs["offload_folder"] = os.fspath(offload_folder)
        if stream:
            try:
                model = open_streamed(folder, dev, dt, config=config)
            except CONFIG_DAMAGE as exc:
                raise _damaged_config(f"cannot build {spec} from its config ({type(exc).__name__})", exc) from exc
        elif device_map is not None and offload_folder is not None:
            model = _offloading(Path(offload_folder), lambda: _load_weights(spec, source, config, kwargs))
        else:
            model = _load_weights(spec, source, config, kwargs)
        if gguf_file:
            drop_quantization_marker(model)
        if device_map is None and not stream:
            model = model.to(dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # damaged files, all alike
            raise _tokenizer_error(spec, source, exc) from exc
        if gguf_file and not stream and device_map is None:  # converted once, cached by the file's digest
            stored = gguf_cache.store(Path(source) / gguf_file, info["gguf_sha256"], model, tokenizer)
            if stored is not None:
                info["gguf_cache"] = str(stored)
        elif info.get("gguf_cache") == source:  # read from the cache: named after its GGUF, as a direct load is
            model.config._name_or_path = str(Path(info["gguf"]).parent)
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    find_blocks(model)  # fail early, with the model class named, if blocks cannot be found
    model_type = getattr(model.config, "model_type", type(model).__name__)
    weights = weight_source(model)
    info.update({k: v for k, v in weights.describe().items() if k in ("weights", "weights_at")})
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source,
                       model_type=model_type, device=weights.device if device_map is not None else dev, dtype=dt,
                       load_seconds=time.perf_counter() - t0, info=info, weights=weights)
