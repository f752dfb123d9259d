"""What the library accepts where it means a model, a tokenizer or token ids: one check at every
public boundary, so a `LoadedModel` works wherever a model is meant and anything else gets one
line naming the fix (never an AttributeError from deep inside torch).

Duck-typed on purpose: `LoadedModel` lives in `loading`, which imports `blocks`, which uses this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mi_prun.data import as_tokenizer  # noqa: F401  (re-exported: the one tokenizer check)
from mi_prun.errors import MiPrunError


def is_loaded(obj: Any) -> bool:
    """A `LoadedModel` (or anything shaped like one: a module in `.model` and a `.tokenizer`)."""
    return isinstance(getattr(obj, "model", None), nn.Module) and hasattr(obj, "tokenizer")


def as_module(model: Any, what: str = "model") -> nn.Module:
    """The torch module of `model`: itself when it is one, its `.model` when it is a `LoadedModel`;
    `MiPrunError` for anything else (a name, None, a path)."""
    if isinstance(model, nn.Module):
        return model
    if is_loaded(model):
        return model.model
    hint = " (a name or path: load it first with mi_prun.load_model)" if isinstance(model, (str, bytes)) else ""
    raise MiPrunError(f"{what} must be a model, got {type(model).__name__}{hint}. Fix: pass "
                      "mi_prun.load_model(spec) or its .model.")


def as_loaded(loaded: Any, what: str = "analyze") -> Any:
    """A `LoadedModel` (model and tokenizer together), for calls that need both."""
    if is_loaded(loaded):
        return loaded
    raise MiPrunError(f"{what} needs a LoadedModel (model and tokenizer), got {type(loaded).__name__}. "
                      "Fix: pass mi_prun.load_model(spec).")


def vocab_size(model: nn.Module) -> int | None:
    """The number of rows of the input embedding (what token ids index), or None when unknown."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    if isinstance(n, int):
        return n
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return n if isinstance(n, int) else None


def check_token_ids(input_ids: Any, model: nn.Module, what: str = "input_ids") -> torch.Tensor:
    """`input_ids` as an integer tensor whose ids the model's embedding can look up; `MiPrunError`
    for floats, negatives or ids past the vocabulary (which would be an IndexError, or a CUDA
    device assert, inside the embedding)."""
    ids = torch.as_tensor(input_ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise MiPrunError(f"{what} must hold integer token ids, got dtype {str(ids.dtype).replace('torch.', '')}. "
                          "Fix: pass the tokenizer's input_ids (torch.long).")
    if ids.numel() == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    n = vocab_size(model)
    if lo < 0 or (n is not None and hi >= n):
        raise MiPrunError(f"{what} holds token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                          f"of {n} ids (0..{(n or 0) - 1}). Fix: tokenise with this model's tokenizer.")
    return ids


__all__ = ["as_loaded", "as_module", "is_loaded", "as_tokenizer", "check_token_ids", "vocab_size"]
