"""A model's tensors as data: the meta-device skeleton of a config, and setting or retying tensors by name.

The weight sources of `mi_prun.runtime` and the random-weight builder (`random_weights`) both build
models whose tensors arrive one at a time; these are the few structural operations they share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every weight on the `meta` device (no memory), buffers real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) of every parameter and buffer, duplicates (tied) included."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in module.named_buffers(remove_duplicate=False):
        if b is not None:
            yield name, b, False


def moved(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` on `device`; floating tensors also cast to `dtype` when given."""
    if dtype is not None and t.is_floating_point():
        return t.detach().to(device=device, dtype=dtype)
    return t.detach().to(device=device)


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    """Put `value` at the dotted `name` of `root` (a frozen parameter, or a buffer)."""
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if is_param:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def is_tied_output(model: nn.Module, name: str) -> bool:
    """Whether `name` is the output embeddings' weight of a model whose config ties it to the input's."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if out is None or not tied:
        return False
    return any(p is out.weight for n, p in model.named_parameters(remove_duplicate=False) if n == name)


def retie(model: nn.Module) -> None:
    """Point a still-empty output embedding at the input embeddings where the config ties them."""
    if not bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)):
        return
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and out is not None and out.weight.is_meta:
        out.weight = inp.weight


__all__ = ["is_tied_output", "moved", "named_tensors", "retie", "set_tensor", "skeleton"]
