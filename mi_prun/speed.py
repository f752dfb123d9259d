"""Size and speed of a model against its pruned version: parameters and bytes, prefill and decode
tokens per second (median of repeats), as the app's prune page shows them.

Speed claims in the docs come from `benchmarks/speed.py`; this module measures what a user's own
machine does with their own model.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.evaluate import model_context, warn_if_training
from mi_prun.runtime.sources import input_device, require_whole_model

def model_size(model: nn.Module) -> dict[str, int]:
    """Parameters and their bytes in memory; tied tensors count once."""
    params = list(model.parameters())  # deduplicated by identity, so tied weights count once
    return {"parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _prompt_ids(model: nn.Module, tokenizer: Any, prompt_tokens: int) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    # A fixed generator: the same prompt for every model and repeat, and no global RNG touched.
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, int(vocab), (1, prompt_tokens), generator=gen)


def _time_once(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt and `decode_tokens` greedy cached steps."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    # transformers 5 names the KV cache `cache`; 4.x named it `past_key_values`.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = out[key]
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: past})
        past = out[key]
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def _speed(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    with torch.inference_mode():
        return _time_once(model, ids, decode_tokens)


def _summarise(prefill: list[float], decode: list[float], prompt_tokens: int,
               decode_tokens: int) -> dict[str, float]:
    # Median over repeats: robust to one run hit by a background task.
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"prefill_tokens_per_s": prompt_tokens / p if p > 0 else math.inf,
            "decode_tokens_per_s": decode_tokens / d if d > 0 else math.inf,
            "prefill_seconds": p, "decode_seconds": d}


def size_and_speed(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, Any]:
    """Parameters, bytes, and prefill / decode throughput (tokens/s) on the model's device.

    Prefill: one forward pass over `prompt_tokens` fixed pseudo-random tokens (batch 1).
    Decode: `decode_tokens` single-token steps with the KV cache. One warm-up run, then the
    median of `repeats` runs.
    """
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise MiPrunError("prompt_tokens, decode_tokens and repeats must be at least 1.")
    context = model_context(model)
    if context is not None and prompt_tokens + decode_tokens > context:
        raise MiPrunError(f"prompt_tokens + decode_tokens = {prompt_tokens + decode_tokens} exceeds "
                          f"the model's context of {context}. Fix: measure shorter sequences.")
    warn_if_training(model)
    require_whole_model(model, "measuring generation speed")
    device = input_device(model)
    ids = _prompt_ids(model, tokenizer, prompt_tokens).to(device)
    _speed(model, ids, min(decode_tokens, 2))  # warm-up: allocator, kernels, lazy init
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = _speed(model, ids, decode_tokens)
        prefill.append(p)
        decode.append(d)
    return {**model_size(model), "device": str(device), "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "repeats": repeats,
            **_summarise(prefill, decode, prompt_tokens, decode_tokens)}


def compare_speed(
    dense: nn.Module,
    pruned: nn.Module,
    tokenizer: Any = None,
    *,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, Any]:
    """Size and speed of `dense` and `pruned`, measured in the same run, interleaved.

    Interleaving (dense, pruned, dense, pruned, ...) exposes both to the same machine load, so
    the ratios are fairer than two separate measurements. Returns {"dense": ..., "pruned": ...,
    "param_ratio", "bytes_ratio" (pruned / dense), "prefill_speedup", "decode_speedup"
    (pruned tokens/s over dense tokens/s)}.
    """
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise MiPrunError("prompt_tokens, decode_tokens and repeats must be at least 1.")
    models = {"dense": dense, "pruned": pruned}
    ids = {}
    for name, m in models.items():
        warn_if_training(m)
        ids[name] = _prompt_ids(dense, tokenizer, prompt_tokens).to(input_device(m))
        _speed(m, ids[name], min(decode_tokens, 2))
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            p, d = _speed(m, ids[name], decode_tokens)
            times[name][0].append(p)
            times[name][1].append(d)
    out: dict[str, Any] = {}
    for name, m in models.items():
        out[name] = {**model_size(m), "device": str(input_device(m)),
                     **_summarise(*times[name], prompt_tokens, decode_tokens)}
    d, p = out["dense"], out["pruned"]
    out.update({
        "param_ratio": p["parameters"] / d["parameters"],
        "bytes_ratio": p["bytes"] / d["bytes"],
        "prefill_speedup": p["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
        "decode_speedup": p["decode_tokens_per_s"] / d["decode_tokens_per_s"],
        "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats,
    })
    return out
