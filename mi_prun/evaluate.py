"""Evaluate a (pruned) model: perplexity under a stated protocol, a greedy sample, size and speed.

Perplexities from different papers differ many times over because of sequence length and a
missing BOS token, so `perplexity` returns its protocol with every figure. Nothing here changes
the model: everything runs under `torch.inference_mode()`, the model is never switched to training
mode, moved or cast, so a model shared by other threads or sessions can be evaluated.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from mi_prun.config import EvalConfig, as_int, expect_config
from mi_prun.data import adds_bos, load_text, tokenize
from mi_prun.errors import MiPrunError
from mi_prun.models.accept import as_module, as_tokenizer, check_token_ids
from mi_prun.models.blocks import context_length
from mi_prun.models.memory import peak_memory
from mi_prun.runtime.runner import token_nll_rows as runner_nll_rows
from mi_prun.runtime.sources import input_device, require_whole_model
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
    peak_memory: dict[str, Any] | None = None  # `mi_prun.models.memory.peak_memory()` after the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_context(model: nn.Module) -> int | None:
    """The longest input (in tokens) the model's config allows, or None where it names none."""
    return context_length(getattr(model, "config", None))


def _uses_bos(tokenizer: Any, add_bos: bool | str) -> bool:
    if not (add_bos is True or add_bos is False or add_bos == "auto"):
        raise MiPrunError(f"add_bos must be True, False or 'auto', got {add_bos!r}.")
    if add_bos == "auto":
        return adds_bos(tokenizer)
    if add_bos is True and getattr(tokenizer, "bos_token_id", None) is None:
        raise MiPrunError("add_bos=True but the tokenizer has no BOS token. Fix: use add_bos='auto' "
                          "or False.")
    return bool(add_bos)


def token_nll_rows(model: nn.Module, input_ids: Any, attention_mask: Any | None = None, *, batch_size: int = 8,
                   progress: Progress | None = None, stage: str = "nll") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `input_ids` (B, T): the summed next-token NLL (nats, float64) of `model` and the
    number of tokens scored: every position t >= 1 whose token and predecessor are both unmasked,
    predicted from positions < t of its own row (padding is never scored). The one NLL loop of
    mi-prun: perplexity, SLEB-style search and verification all call it (through `token_nll`
    where only the sum matters; verification keeps the rows, whose paired differences say whether
    two sets can be told apart).

    The log-softmax runs in float32 (bf16 logits lose the small probabilities that dominate NLL).
    `progress(stage, fraction, message)` is called after every batch.
    """
    model = as_module(model)
    ids = check_token_ids(input_ids, model)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise MiPrunError(f"input_ids must be (batch, length >= 2); got {tuple(ids.shape)}.")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask)
    if mask is not None and mask.shape != ids.shape:
        raise MiPrunError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
    return runner_nll_rows(model, ids, mask, batch_size=max(1, int(batch_size)), progress=progress, stage=stage)


def token_nll(model: nn.Module, input_ids: Any, attention_mask: Any | None = None, *, batch_size: int = 8,
              progress: Progress | None = None, stage: str = "nll") -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) of `model` over `input_ids` (B, T) and the number of
    tokens scored (`token_nll_rows` summed over the rows)."""
    sums, counts = token_nll_rows(model, input_ids, attention_mask, batch_size=batch_size, progress=progress,
                                  stage=stage)
    return float(sums.sum()), int(counts.sum())


def warn_if_training(model: nn.Module) -> None:
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
    model, tokenizer = as_module(model), as_tokenizer(tokenizer if tokenizer is not None else model)
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
    ids = tokenize(tokenizer, text)  # (N,) tensor: a list of N Python ints costs ~9x its memory
    per_window = seq_len - 1 if bos else seq_len
    n_windows = len(ids) // per_window
    if n_windows == 0:
        raise MiPrunError(f"text too short for one window: {per_window} tokens needed "
                          f"(seq_len {seq_len}{', with BOS' if bos else ''}), {len(ids)} found. "
                          "Fix: give more text or a smaller seq_len.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    tokens = ids[: n_windows * per_window].to(torch.long).reshape(n_windows, per_window)
    if bos:
        bos_col = torch.full((n_windows, 1), int(tokenizer.bos_token_id), dtype=torch.long)
        tokens = torch.cat([bos_col, tokens], dim=1)
    # tokens: (windows, seq_len); position p predicts position p + 1.
    warn_if_training(model)
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

    cfg = expect_config(config if config is not None else EvalConfig(), EvalConfig)
    text = load_text(cfg.data, purpose="evaluation")
    model, tokenizer = as_module(model), as_tokenizer(tokenizer if tokenizer is not None else model)
    res = perplexity(model, tokenizer, text.text, seq_len=cfg.seq_len, max_windows=cfg.max_windows,
                     batch_size=cfg.batch_size, progress=progress)
    return replace(res, source=text.source, peak_memory=peak_memory())


def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` (new text only), with a KV cache. `model` may be a
    `LoadedModel` (then `tokenizer` may be None)."""
    model, tokenizer = as_module(model), as_tokenizer(tokenizer if tokenizer is not None else model)
    if not isinstance(prompt, str):
        raise MiPrunError(f"prompt must be a str, got {type(prompt).__name__}.")
    require_whole_model(model, "a generation sample")
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
