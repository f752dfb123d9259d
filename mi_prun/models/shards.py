"""Write tensors that arrive one at a time as safetensors shards with the index `from_pretrained` reads.

A streamed model's export (`mi_prun.runtime.saving`) and a random model of any size
(`random_weights.write_random_model`) both hand tensors over one by one; memory stays at one shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_shards(folder: Path, items: Iterable[tuple[str, torch.Tensor]], shard_bytes: int,
                 single_file: bool = True) -> int:
    """Write (name, tensor) `items` into `folder` as shards of at most `shard_bytes` (a tensor larger
    than that gets a shard of its own), renamed to their final names only when all are written, plus
    `model.safetensors.index.json`; one shard is written as `model.safetensors` without an index when
    `single_file`. Returns the bytes written."""
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = folder / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    for name, value in items:
        value = value.contiguous()
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = value
        size += nbytes
        total += nbytes
    flush()
    if single_file and len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
        return total
    weight_map = {}
    for k, (path, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return total


__all__ = ["write_shards"]
