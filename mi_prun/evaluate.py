"""Evaluate a (pruned) model: perplexity under a stated protocol, a greedy sample, size and speed.

Perplexities from different papers differ many times over because of sequence length and a
missing BOS token, so `perplexity` returns its protocol with every figure. Nothing here changes
the model: everything runs under `torch.inference_mode()`, the model is never switched to training
mode, moved or cast, so a model shared by other threads or sessions can be evaluated.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mi_prun.config import EvalConfig
from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import context_length, input_device
from mi_prun.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and the protocol that produced it.

    ppl = exp(nll); nll is the mean negative log-likelihood (nats) over `tokens_scored` predicted
    tokens in `windows` windows of `seq_len` model inputs each; `bos` says whether every window
    started with the BOS token; `protocol` states all of it in words.
    """

    ppl: float
    nll: float
    seq_len: int
    windows: int
    tokens_scored: int
    bos: bool
    protocol: str
    seconds: float
    source: str | None = None  # the evaluation text (e.g. "wikitext2 test"), where known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_context(model: nn.Module) -> int | None:
    """The longest input (in tokens) the model's config allows, or None where it names none."""
    return context_length(getattr(model, "config", None))


def _uses_bos(tokenizer: Any, add_bos: bool | str) -> bool:
    from mi_prun.data import adds_bos

    if not (add_bos is True or add_bos is False or add_bos == "auto"):
        raise MiPrunError(f"add_bos must be True, False or 'auto', got {add_bos!r}.")
    if add_bos == "auto":
        return adds_bos(tokenizer)
    if add_bos is True and getattr(tokenizer, "bos_token_id", None) is None:
        raise MiPrunError("add_bos=True but the tokenizer has no BOS token. Fix: use add_bos='auto' "
                          "or False.")
    return bool(add_bos)


def token_nll(model: nn.Module, input_ids: Any, attention_mask: Any | None = None, *, batch_size: int = 8,
              progress: Progress | None = None, stage: str = "nll") -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) of `model` over `input_ids` (B, T) and the number of
    tokens scored: every position t >= 1 whose token and predecessor are both unmasked, predicted
    from positions < t of its own row (padding is never scored). The one NLL loop of mi-prun:
    perplexity, SLEB-style search and verification all call it.

    The log-softmax runs in float32 (bf16 logits lose the small probabilities that dominate NLL).
    `progress(stage, fraction, message)` is called after every batch.
    """
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise MiPrunError(f"input_ids must be (batch, length >= 2); got {tuple(ids.shape)}.")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask)
    if mask is not None and mask.shape != ids.shape:
        raise MiPrunError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
    device = input_device(model)
    bs = max(1, int(batch_size))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[0], bs):
            x = ids[start:start + bs].to(device)
            m = None if mask is None else mask[start:start + bs].to(device)
            logits = model(input_ids=x, attention_mask=m, use_cache=False).logits  # (B, T, V)
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  x[:, 1:].reshape(-1).to(logits.device), reduction="none")
            if m is None:
                total += float(nll.double().sum())
                count += nll.numel()
            else:
                valid = ((m[:, 1:] > 0) & (m[:, :-1] > 0)).reshape(-1).to(nll.device)
                total += float(nll[valid].double().sum())
                count += int(valid.sum())
            if progress is not None:
                done = min(start + bs, ids.shape[0])
                progress(stage, done / ids.shape[0], f"batch {done}/{ids.shape[0]}")
    return total, count


def _warn_if_training(model: nn.Module) -> None:
    if model.training:
        # Not switched here: the model may be shared, and eval() would change it for everyone.
        log.warning("%s is in training mode (dropout active): perplexity will be noisy; call "
                    "model.eval() before evaluating", type(model).__name__)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = EvalConfig.seq_len,
    max_windows: int | None = EvalConfig.max_windows,
    batch_size: int = EvalConfig.batch_size,
    add_bos: bool | str = "auto",
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `text`, with non-overlapping windows, every token scored once.

    Protocol. `text` is tokenised once, without special tokens, into ids t_0 .. t_{N-1}. Every
    window is one model input of exactly `seq_len` positions:

    - with BOS (`add_bos=True`, or `"auto"` and the tokenizer puts BOS in front of a text), a
      window is BOS followed by the next `seq_len - 1` text tokens; every one of those text tokens
      is predicted (the first one from BOS alone), so consecutive windows tile the text and each
      text token is scored exactly once;
    - without BOS, a window is the next `seq_len` text tokens; its first token is context only
      and the other `seq_len - 1` are predicted (the protocol of ShortGPT / SLEB-style
      evaluations with the text joined and chunked).

    Either way a window scores `seq_len - 1` tokens; the incomplete tail of the text is dropped;
    `max_windows` keeps only the first windows. nll is the mean over all scored tokens (not a mean
    of per-window means); ppl = exp(nll).

    Worked example, seq_len = 4, text ids t0..t9 (N = 10):

    - with BOS: windows [BOS t0 t1 t2] [BOS t3 t4 t5] [BOS t6 t7 t8]; t9 is dropped; scored
      t0..t8, 9 tokens, e.g. the first window adds -log p(t0|BOS) - log p(t1|BOS t0)
      - log p(t2|BOS t0 t1);
    - without BOS: windows [t0 t1 t2 t3] [t4 t5 t6 t7]; t8 t9 are dropped; scored t1 t2 t3 t5 t6
      t7, 6 tokens.

    progress(stage, fraction, message) is called with stage "perplexity" after every batch.
    Raises MiPrunError when the text is too short for one window (saying how many tokens are
    needed and found) or `seq_len` exceeds the model's context.
    """
    from mi_prun.config import as_int

    seq_len = as_int(seq_len, "seq_len (one token of context, one predicted)", minimum=2)
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    if max_windows is not None:
        max_windows = as_int(max_windows, "max_windows", minimum=1)
    if not isinstance(text, str):
        raise MiPrunError(f"text must be a str, got {type(text).__name__}.")
    context = model_context(model)
    if context is not None and seq_len > context:
        raise MiPrunError(f"seq_len {seq_len} exceeds the model's context of {context} tokens "
                          f"(max_position_embeddings). Fix: use --seq-len {context} or less.")
    t0 = time.perf_counter()
    bos = _uses_bos(tokenizer, add_bos)
    # verbose=False: a whole corpus is longer than model_max_length on purpose; it is windowed.
    from mi_prun.data import tokenize

    ids = tokenize(tokenizer, text).tolist()
    per_window = seq_len - 1 if bos else seq_len
    n_windows = len(ids) // per_window
    if n_windows == 0:
        raise MiPrunError(f"text too short for one window: {per_window} tokens needed "
                          f"(seq_len {seq_len}{', with BOS' if bos else ''}), {len(ids)} found. "
                          "Fix: give more text or a smaller seq_len.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    tokens = torch.tensor(ids[: n_windows * per_window], dtype=torch.long).view(n_windows, per_window)
    if bos:
        bos_col = torch.full((n_windows, 1), int(tokenizer.bos_token_id), dtype=torch.long)
        tokens = torch.cat([bos_col, tokens], dim=1)
    # tokens: (windows, seq_len); position p predicts position p + 1.
    _warn_if_training(model)
    total_nll, scored = token_nll(model, tokens, batch_size=batch_size, progress=progress, stage="perplexity")
    mean = total_nll / scored
    if not math.isfinite(mean):
        log.warning("perplexity is not finite (nll %s): the model produced NaN/inf logits", mean)
    protocol = (f"non-overlapping windows of {seq_len} tokens, "
                + (f"BOS + {seq_len - 1} text tokens each, every text token scored once"
                   if bos else f"{seq_len} text tokens each, first token of a window not scored")
                + f"; {n_windows} windows, {scored} tokens scored; text tokenised once without "
                "special tokens; incomplete tail dropped")
    return PerplexityResult(ppl=math.exp(mean) if mean < 700 else math.inf, nll=mean,
                            seq_len=seq_len, windows=n_windows, tokens_scored=scored, bos=bos,
                            protocol=protocol, seconds=time.perf_counter() - t0)


def evaluate(model: nn.Module, tokenizer: Any, config: Any = None, *,
             progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of `model` on the text and protocol of `config` (an `EvalConfig`; default: the
    WikiText-2 test split, windows of 256 tokens, all of them)."""
    from dataclasses import replace

    from mi_prun.data import load_text

    cfg = config if config is not None else EvalConfig()
    if not isinstance(cfg, EvalConfig):
        raise MiPrunError(f"config must be an EvalConfig, got {type(cfg).__name__}.")
    text = load_text(cfg.data, purpose="evaluation")
    res = perplexity(model, tokenizer, text.text, seq_len=cfg.seq_len, max_windows=cfg.max_windows,
                     batch_size=cfg.batch_size, progress=progress)
    return replace(res, source=text.source)


def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` (new text only), with a KV cache."""
    enc = tokenizer(prompt, return_tensors="pt")
    device = input_device(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device) if "attention_mask" in enc else None,
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            pad_token_id=pad,
            # Unset sampling knobs a model's generation_config may carry, so greedy is greedy.
            temperature=None, top_p=None, top_k=None,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# size and speed


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
    _warn_if_training(model)
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
        _warn_if_training(m)
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
