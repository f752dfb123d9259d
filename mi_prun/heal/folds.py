"""Folding a bridge into the weights, where the family table (`mi_prun.models.families`) says.

A bridge r ~ m T + c for a removed run i..j-1 is folded into the last module of block i-1's MLP
branch, the one whose output m is added to the residual stream as it is:

- "linear": the MLP's output projection (`down_proj`, `c_proj`, `fc2`, `dense_4h_to_h`, ...).
  nn.Linear computes m = a W^T + b, so W <- T^T W and b <- b T + c; GPT-2's Conv1D computes
  m = a W + b, so W <- W T. Exact for any T; the intercept c only where there is a bias.
- "norm": a norm after the MLP (Gemma-2, Gemma-3, OLMo-2): m = n(z) * (offset + w) per channel, so
  only a diagonal T folds exactly, into the norm's weight: w <- (offset + w) * t - offset.

Families not in the table, mixture-of-experts MLPs, post-norm blocks (OPT-350m) and runs starting at
block 0 (no block before them) are refused with one line saying why: mi-prun never exports an
approximation that was not asked for. A weight shared with another module (tied) is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.families import FOLDS, Fold


class HealRefused(MiPrunError):
    """Healing cannot fold a bridge exactly into this model; the message says why in one line."""


@dataclass(frozen=True)
class Site:
    """The module of one block that a bridge folds into."""

    module: nn.Module
    name: str  # dotted path from the model root, for the record
    fold: Fold

    @property
    def diagonal(self) -> bool:
        return self.fold.kind == "norm"

    @property
    def intercept(self) -> bool:
        return self.fold.kind == "linear" and getattr(self.module, "bias", None) is not None


def fold_for(model: nn.Module) -> Fold:
    """The table entry of `model`'s family, or `HealRefused` naming why there is none."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    fold = FOLDS.get(model_type or "")
    if fold is None:
        raise HealRefused(f"cannot heal model_type {model_type!r}: no exact fold is known for it "
                          "(add a fold to its entry of mi_prun.models.families.FAMILIES).")
    why = fold.refuse(config) if fold.refuse else None
    if why:
        raise HealRefused(f"cannot heal {model_type}: {why}.")
    return fold


def site(model: nn.Module, block_path: str, new_index: int, fold: Fold) -> Site:
    """The fold module of block `new_index` (numbering of `model`), checked to be usable."""
    name = f"{block_path}.{new_index}.{fold.path}"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise HealRefused(f"cannot heal: {type(model).__name__} has no module {name} "
                          "(the family table mi_prun.models.families does not match this model).") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise HealRefused(f"cannot heal: {name} has no weight to fold a bridge into.")
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(owners) > 1:
        raise HealRefused(f"cannot heal: {name}.weight is tied to {', '.join(owners[1:])}; "
                          "changing it would change them too.")
    return Site(module=module, name=name, fold=fold)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family): weight (in, out), out = x W + b.
    return type(module).__name__ == "Conv1D"


@torch.no_grad()
def apply(site: Site, T: torch.Tensor, c: torch.Tensor) -> None:
    """Fold r ~ m T + c into `site.module`, replacing its weight (and bias) by new Parameters, so
    a module whose old tensors are shared with another model leaves that model unchanged."""
    module = site.module
    W = module.weight
    work = torch.float64 if W.numel() <= 2**26 else torch.float32  # float64 where memory allows
    T = T.to(device=W.device, dtype=work)
    c = c.to(device=W.device, dtype=work)
    if site.fold.kind == "norm":
        off = site.fold.offset
        new_w = (W.to(work) + off) * T - off
        module.weight = nn.Parameter(new_w.to(W.dtype), requires_grad=W.requires_grad)
        return
    if _is_conv1d(module):
        new_w = W.to(work) @ T  # (in, d) @ (d, d)
    else:
        new_w = T.T @ W.to(work)  # (d, d) @ (d, in)
    module.weight = nn.Parameter(new_w.to(W.dtype), requires_grad=W.requires_grad)
    b = getattr(module, "bias", None)
    if isinstance(b, torch.Tensor):
        module.bias = nn.Parameter((b.to(work) @ T + c).to(b.dtype), requires_grad=b.requires_grad)
