"""Turn a model spec into a `LoadedModel`: a decoder-only causal LM in eval mode, its tokenizer,
and where it came from.

`load_model(spec)` accepts a built-in name (see `mi_prun.models.zoo`), a Hugging Face id, a local
model folder or a `.gguf` file (a `str` or any `os.PathLike`). It refuses, each with a one-line
`MiPrunError` naming the fix: encoder and seq2seq models, remote code unless asked for, weights
that cannot fit in memory (before loading them), corrupt files, and weights that disagree with
the config (which transformers would fill with random numbers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import find_blocks, input_device
from mi_prun.models.identity import model_identity
from mi_prun.models.memory import check_memory, weights_bytes
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

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.model))

    @property
    def hub_id(self) -> str | None:
        """The model's id on the Hugging Face hub, or None (see `mi_prun.models.zoo.hub_id`)."""
        return hub_id(self)

    def describe(self) -> dict:
        """What results record of the model: names, size, hub id and its identity (see
        `mi_prun.models.identity.model_identity`), so an analysis can refuse to prune another model."""
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
    from transformers import AutoConfig

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


def _load_weights(spec: str, source: str, config: Any, kwargs: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

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


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
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
    Hugging Face id; a `Path` (any `os.PathLike`) is always a local folder or `.gguf` file.
    device: `auto` | `cpu` | `cuda[:N]` | `mps`. dtype: `auto` (bfloat16 on a GPU, float32 on the
    CPU) or a name. device_map: passed to accelerate (`"auto"` spreads a model larger than one
    GPU); device is then ignored for placement. trust_remote_code stays off unless the caller asks
    for it. check_memory_first: refuse weights larger than the free memory of the device before
    loading (skipped with a device_map, or when the size is unknown).
    """
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    is_path = isinstance(spec, os.PathLike)
    spec = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise MiPrunError(f"model spec must be a name or a path, got {spec!r}.")
    dev = resolve_device(device)
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        resolve_device(device_map)  # a device name: an unknown or missing device fails here, in one line
    dt = resolve_dtype(dtype, dev)
    info: dict = {}
    family = None if is_path else tiny_family(spec)
    if family is not None:
        from mi_prun.testing import tiny_model

        model, tokenizer = tiny_model(family)
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
        if check_memory_first and device_map is None:
            check_memory(spec, weights_bytes(source, gguf_file, dt), dev, dt)
        tokenizer_kwargs = dict(kwargs)
        kwargs["dtype"] = dt
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = _load_weights(spec, source, config, kwargs)
        if gguf_file:
            drop_quantization_marker(model)
        if device_map is None:
            model = model.to(dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        except (OSError, ValueError) as exc:
            raise MiPrunError(f"cannot load the tokenizer of {spec}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    find_blocks(model)  # fail early, with the model class named, if blocks cannot be found
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if device_map is not None:
        dev = input_device(model)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source,
                       model_type=model_type, device=dev, dtype=dt,
                       load_seconds=time.perf_counter() - t0, info=info)
