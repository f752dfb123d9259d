"""The identity of a model across loads, devices and dtypes, and the one check that a recorded
analysis or selection is applied to the model it was made on.

An analysis and a selection record `model_identity` of the analysed model (class, block count,
hidden size, a config digest and a few weight values). `check_same_model` is what `prune`,
`export`, `select(..., model=)` and the CLI all call before applying one to a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.files import jsonable
from mi_prun.models.accept import as_module
from mi_prun.models.blocks import find_blocks
from mi_prun.runtime.sources import weight_source

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "torch_dtype", "dtype", "transformers_version", "_commit_hash",
                         "use_cache", "_attn_implementation", "_attn_implementation_autoset",
                         "quantization_config", "architectures", "gguf_file"}
_SAMPLE_TENSORS = 24
_SAMPLE_VALUES = 16


def _config_digest(config: Any) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(jsonable(d), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model across loads, devices and dtypes: its class, block count, hidden
    size, a digest of its config (paths, dtype and version fields left out), and a few weight
    values at fixed positions of evenly spaced tensors (compared with a tolerance that absorbs
    float32 / bfloat16 / float16 rounding, never with a hash)."""
    params = list(model.named_parameters())
    picks = np.unique(np.linspace(0, len(params) - 1, min(_SAMPLE_TENSORS, len(params))).astype(int)) \
        if params else []
    sample: list[float] = []
    source = weight_source(model)
    with torch.no_grad():
        for i in picks:
            name, tensor = params[int(i)]
            numel = tensor.numel()
            k = min(_SAMPLE_VALUES, numel)
            # integer arithmetic: float32 positions round past the end of tensors over 2^24 elements
            idx = torch.arange(k, dtype=torch.int64) * (numel - 1) // max(k - 1, 1)
            # a streamed or accelerate-offloaded tensor is on `meta`: its values come from the store
            sample += [float(v) for v in source.values(model, name, tensor, idx).float().cpu()]
    cfg = model.config
    return {"architecture": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "n_blocks": len(find_blocks(model)),
            "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
            "n_params": int(sum(p.numel() for _, p in params)),
            "config_digest": _config_digest(cfg), "weight_sample": sample}


def identity_mismatch(expected: dict[str, Any] | None, model: Any) -> str | None:
    """Why `model` is not the model `expected` describes, or None when it is (or when `expected`
    holds no identity, as in analyses saved before identities were recorded)."""
    if not expected or "weight_sample" not in expected:
        return None
    found = model_identity(model)
    for key in ("architecture", "n_blocks", "hidden_size", "n_params"):
        if expected.get(key) != found.get(key):
            return f"{key} {expected.get(key)} in the analysis, {found.get(key)} in the model"
    if expected.get("config_digest") != found["config_digest"]:
        return "the configs differ"
    a = np.asarray(expected["weight_sample"], dtype=np.float64)
    b = np.asarray(found["weight_sample"], dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=2e-2, atol=2e-3 * max(1e-6, float(np.abs(a).max(initial=0)))):
        return "the weights differ"
    return None


# What a record made before identities existed (analysis format 1, early selections) still says of
# its model; each one recorded is compared, so an old file cannot prune another model silently.
_RECORDED_KEYS = ("architecture", "model_type", "n_blocks", "hidden_size", "n_params", "config_digest")


def recorded_mismatch(recorded: Any, model: Any) -> str | None:
    """Why `model` is not the model `recorded` (an analysis's or selection's `model` record)
    describes, or None. With an identity this is `identity_mismatch`; without one, every field the
    record holds of architecture, model type, block count, hidden size, parameter count and config
    digest is compared. A record that holds none of them cannot be checked (None)."""
    if not isinstance(recorded, dict):
        return None
    ident = recorded.get("identity")
    if isinstance(ident, dict) and "weight_sample" in ident:
        return identity_mismatch(ident, model)
    fields = {**recorded, **(ident if isinstance(ident, dict) else {})}
    wanted = {k: fields[k] for k in _RECORDED_KEYS if fields.get(k) is not None}
    if not wanted:
        return None
    found = model_identity(model)
    for key, value in wanted.items():
        if value != found.get(key):
            return ("the configs differ" if key == "config_digest"
                    else f"{key} {value} recorded, {found.get(key)} in the model")
    return None


def check_same_model(recorded: dict[str, Any] | None, n_blocks: int, model: Any, *, force: bool = False,
                     where: str = "the analysis", what: str = "analysis") -> None:
    """Refuse (`MiPrunError`) to apply a result recorded for `recorded` (its `model` dict, with an
    "identity" where one was recorded) and `n_blocks` blocks to another `model` (a module or a
    `LoadedModel`). Without an identity (analyses of format 1 saved before identities existed) the
    fields the record holds are compared (`recorded_mismatch`).

    `force=True` accepts a model with the same block count (for a user who knows the two share a
    structure); a different block count is refused always."""
    model = as_module(model)
    n = len(find_blocks(model))
    if n != n_blocks:
        raise MiPrunError(f"{where} is for a model of {n_blocks} blocks; this one has {n}. Fix: use the "
                          f"{what} of this model, or run the analysis on it.")
    meta = recorded if isinstance(recorded, dict) else {}
    why = recorded_mismatch(meta, model)
    if why and not force:
        raise MiPrunError(f"{where} was made on another model ({meta.get('spec')}): {why}. Fix: use the "
                          f"{what} of this model, or pass --force (force=True) if you know the two share "
                          "a structure.")
