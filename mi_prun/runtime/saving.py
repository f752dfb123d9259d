"""The shard writer of a model whose tensors arrive one block at a time (a streamed model's export).

A model in memory is written by `save_pretrained`; a streamed one cannot be (its blocks are on the
`meta` device), so its weight source hands the tensors over block by block and `save_items` writes
them as the same safetensors shards and index `save_pretrained` would.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.shards import write_shards

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _shard_bytes(size: str) -> int:
    text = size.strip().upper()
    for unit, scale in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise MiPrunError(f"max_shard_size {size!r} is not a size. Fix: write it as e.g. '5GB'.") from None


def save_items(model: nn.Module, folder: Path, items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
               max_shard_size: str = "5GB") -> None:
    """Write `model`'s config and the tensors `items` yields ((name, real CPU tensor) in state-dict
    order, e.g. a streamed model's, one block in memory at a time) as safetensors shards that plain
    `from_pretrained` loads. Tied tensors are written once; floating tensors in `dtype`, as
    `save_pretrained` does for a loaded model."""
    limit = _shard_bytes(max_shard_size)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    seen: dict[int, str] = {}
    state = model.state_dict(keep_vars=True)
    skip = set()
    for name, t in state.items():  # tied entries (an LM head sharing the embeddings): the first name only
        if id(t) in seen:
            skip.add(name)
        else:
            seen[id(t)] = name

    def wanted() -> Iterable[tuple[str, torch.Tensor]]:
        for name, value in items:
            if name not in skip:
                yield name, value.to(dtype) if dtype is not None and value.is_floating_point() else value

    write_shards(folder, wanted(), limit)


__all__ = ["save_items"]
