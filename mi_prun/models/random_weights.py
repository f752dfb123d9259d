"""Randomly initialised models of any shape, without ever holding the whole model in memory.

`random_tensors(config)` yields seeded random values tensor by tensor from the model skeleton on
`meta`; `write_random_model` writes them as safetensors shards (benchmarks/scale.py writes an
8B-shaped model this way); `random_model` builds the same model directly on a device
(benchmarks/gpu_bench.py). Values depend on the tensor's name and the seed only: normal(0,
initializer_range) for matrices, ones for norm weights, zeros for biases.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mi_prun.models.skeleton import retie as _retie, set_tensor as _set_tensor, skeleton
from mi_prun.models.shards import write_shards
from mi_prun.models.tiny import byte_tokenizer

def _init_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, seed: int,
                std: float) -> torch.Tensor:
    """A seeded random value for one tensor, from its name (the same whatever the order):
    normal(0, std) for matrices, ones for norm weights, zeros for biases."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) <= 1:
        return (torch.zeros if leaf == "bias" else torch.ones)(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, std, generator=gen)
    return out.to(dtype)


def random_tensors(config: Any, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   seed: int = 0, names: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a randomly initialised model of `config`, one tensor at a time: nothing
    but the tensor being yielded exists (the model is built on `meta`). `names` limits the tensors
    (default: every parameter, tied ones once)."""
    model = skeleton(config, dtype)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    wanted = None if names is None else set(names)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or (wanted is not None and name not in wanted):
            continue
        seen.add(id(p))
        yield name, _init_value(name, tuple(p.shape), dtype, device, seed, std)


def write_random_model(config: Any, folder: Any, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       shard_bytes: int = 2 * 2**30) -> Path:
    """Write a randomly initialised model of `config` as safetensors shards (plus config, index and
    the byte tokenizer) to `folder`, shard by shard: memory stays at one shard whatever the model's
    size. Returns the folder. Loads with `from_pretrained` or `mi_prun.models.load_model`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    write_shards(folder, random_tensors(config, dtype, "cpu", seed), shard_bytes, single_file=False)
    return folder


def random_model(config: Any, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of `config` built directly on `device` (no float32 copy, no
    CPU copy first), in eval mode; the same values as `write_random_model` writes."""
    model = skeleton(config, dtype)
    values = dict(random_tensors(config, dtype, device, seed))
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name in values:
            _set_tensor(model, name, values[name], True)
    _retie(model)
    for name, b in list(model.named_buffers()):
        _set_tensor(model, name, b.to(device), False)
    model.eval()
    model.requires_grad_(False)
    return model


__all__ = ["random_model", "random_tensors", "write_random_model"]
