"""The one NLL scorer behind every search that runs the model (verified, MI-guided, SLEB-style).

A search asks `scorer.score(removed)` -> (mean next-token NLL in nats of the model with `removed`
skipped, whether it came from the cache); `scorer.dense()` is the unpruned model's NLL and
`scorer.dense_passes` the passes that filled the prefix cache. `PrefixScorer` is the implementation
on a real model:
- each pass runs a weight-sharing `pruned_view` (the shared model is never touched) and, with
  `use_prefix`, starts at the first removed block: one dense pass caches h_b of the tokens at every
  block boundary where a removed set may start, and the blocks before it replay the cached state.
  Memory: (removable blocks) x N x T x d values in the model's dtype (about 220 MB for
  SmolLM2-135M at 16 x 256 tokens in float32);
- `NLLCache` keeps the NLL per removed set for one (model, tokens) pair, whatever n: callers (the
  app's ratio slider) keep it and pass it back, and a set seen before costs no pass.
`model_scorer` does the setup every search shares: model and tokenizer from a `LoadedModel`, the
analysed-model check, the verification tokens (`resolve_tokens`), the cache binding.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch

from mi_prun.config import SelectConfig, as_int
from mi_prun.data import calibration_text, verification_tokens
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import token_nll, token_nll_rows
from mi_prun.models.accept import check_token_ids
from mi_prun.models.blocks import check_context, find_blocks
from mi_prun.models.hooks import forward_overrides, hidden_of, output_hooks
from mi_prun.models.identity import check_same_model
from mi_prun.models.stream import BlockRunner, is_streamed
from mi_prun.models.surgery import pruned_view


def tokens_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """A digest of the verification tokens (what an NLL is only valid for)."""
    h = hashlib.sha256(input_ids.detach().cpu().to(torch.int64).numpy().tobytes())
    h.update(str(tuple(input_ids.shape)).encode())
    if attention_mask is not None:
        h.update(attention_mask.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class NLLCache:
    """Mean verification NLL per removed set, for one model and one set of verification tokens.

    Keep one per (model, tokens) and pass it to every call: a set seen before (at any n) costs no
    forward pass, and the dense hidden states are reused too. Binding it to another model or other
    tokens empties it (an NLL is only valid for its tokens).
    """

    def __init__(self) -> None:
        self.key: tuple[int, str] | None = None
        self.nll: dict[tuple[int, ...], float] = {}
        self.samples: dict[tuple[int, ...], tuple[float, ...]] = {}  # mean NLL per verification sample
        self.fresh: NLLCache | None = None  # draw B of the confirmation (select/confirm.py), for the same model
        self.prefix: Any = None  # the PrefixScorer's dense states, reused across calls
        self.drawn: dict[tuple, Any] = {}  # verification tokens drawn from a calibration text, by draw

    def bind(self, model: Any, key: str) -> None:
        if self.key != (id(model), key):
            self.key, self.nll, self.samples, self.prefix, self.fresh = (id(model), key), {}, {}, None, None

    def get(self, removed: Iterable[int]) -> float | None:
        return self.nll.get(tuple(sorted(removed)))

    def put(self, removed: Iterable[int], nll: float, samples: Iterable[float] | None = None) -> None:
        key = tuple(sorted(removed))
        self.nll[key] = float(nll)
        if samples is not None:
            self.samples[key] = tuple(float(x) for x in samples)
        else:
            self.samples.pop(key, None)

    def sample_nll(self, removed: Iterable[int]) -> tuple[float, ...] | None:
        """The mean NLL of each verification sample for `removed`, when the pass recorded them."""
        return self.samples.get(tuple(sorted(removed)))

    def __len__(self) -> int:
        return len(self.nll)


class PrefixScorer:
    """NLL of `model` with blocks removed, each pass started at the first removed block.

    `starts` are the blocks a removed set may start at; the dense pass (lazy, once) keeps the input
    of each of them, per batch of `batch_size` rows: {b: [tensor (B, T, d)]}.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 batch_size: int, starts: Iterable[int], cache: NLLCache, use_prefix: bool = True,
                 progress: Any = None, provenance: dict[str, Any] | None = None) -> None:
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.use_prefix = bool(use_prefix)
        self.progress = progress  # the caller's progress callback, for the search that uses it
        self.provenance = dict(provenance or {})  # where the tokens came from
        self.batch_size = as_int(batch_size, "batch_size")
        self.starts = sorted({int(b) for b in starts if int(b) >= 1})
        self.cache = cache
        self.dense_nll: float | None = None
        self.dense_passes = 0

    def _states(self) -> dict[str, Any]:
        pre = self.cache.prefix
        if pre is not None and pre["batch_size"] == self.batch_size and set(self.starts) <= set(pre["states"]):
            return pre
        if is_streamed(self.model):
            return self._streamed_states()
        copy = pruned_view(self.model, [])  # hooks go on a weight-sharing copy, never on the shared model
        blocks = find_blocks(copy).blocks
        states: dict[int, list[torch.Tensor]] = {b: [] for b in self.starts}
        formats: dict[int, int] = {}  # block -> 0 (returns a tensor) or the length of its tuple

        def keep(b: int, output: Any) -> None:
            formats[b] = len(output) if isinstance(output, (tuple, list)) else 0
            if b + 1 in states:
                states[b + 1].append(hidden_of(output).detach())

        with output_hooks(dict(enumerate(blocks)), keep):
            total, count = token_nll(copy, self.ids, self.mask, batch_size=self.batch_size)
        self.dense_passes += 1
        self.cache.prefix = {"states": states, "formats": formats, "dense_nll": total / max(count, 1),
                             "batch_size": self.batch_size}
        return self.cache.prefix

    def _streamed_states(self) -> dict[str, Any]:
        """The prefix cache of a streamed model: one block-by-block dense pass (`BlockRunner`)."""
        runner = BlockRunner(self.model, self.ids, self.mask, batch_size=self.batch_size)
        states: dict[int, list[torch.Tensor]] = {}
        hidden = runner.h0
        for b, hidden in runner.run_blocks(runner.h0):
            if b + 1 in self.starts:
                states[b + 1] = hidden
        total, count = runner.nll(hidden)
        self.dense_passes += 1
        self.cache.prefix = {"states": states, "formats": {}, "dense_nll": total / max(count, 1),
                             "batch_size": self.batch_size, "runner": runner}
        return self.cache.prefix

    def _streamed_rows(self, rem: tuple[int, ...], use_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One block-by-block pass from the cached state at the first removed block (streamed model)."""
        pre = self._states()
        runner: BlockRunner = pre["runner"]
        first = rem[0]
        start, hidden = (first, pre["states"][first]) if use_prefix and first in pre["states"] else (0, runner.h0)
        return runner.nll_rows(runner.last(hidden, start, skip=rem))

    def dense(self) -> float:
        """The dense model's mean NLL on the tokens (fills the prefix cache on first use)."""
        return float(self._states()["dense_nll"])

    def nll(self, removed: Iterable[int], use_prefix: bool = True) -> float:
        """Mean NLL (nats) with `removed` skipped; one forward pass (from the first removed block
        with `use_prefix`). Not cached here: `score` is the cached entry point."""
        return self.nll_samples(removed, use_prefix)[0]

    def nll_samples(self, removed: Iterable[int], use_prefix: bool = True) -> tuple[float, tuple[float, ...]]:
        """(mean NLL over every token scored, the mean NLL of each sample) with `removed` skipped."""
        rem = tuple(sorted(int(b) for b in removed))
        sums, counts = self._rows(rem, use_prefix)
        total, count = float(sums.sum()), int(counts.sum())
        if count == 0:
            raise MiPrunError("no verification token to score (all masked). Fix: give longer samples.")
        per = tuple(float(s) / int(c) if int(c) else float("nan") for s, c in zip(sums.tolist(), counts.tolist()))
        return total / count, per

    def _rows(self, rem: tuple[int, ...], use_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL and tokens scored per sample: one pass of the view without `rem`."""
        if is_streamed(self.model):
            return self._streamed_rows(rem, use_prefix)
        view = pruned_view(self.model, rem)
        first = rem[0]
        pre = self._states() if use_prefix and first >= 1 else None
        if pre is not None and first in pre["states"]:  # other starts (e.g. a protected block): a full pass
            batches, fmt = pre["states"][first], pre["formats"][first - 1]
            blocks = find_blocks(view).blocks  # positions 0..first-1 are the original blocks 0..first-1
            calls = [0]

            def passthrough(hidden_states=None, *args, **kwargs):
                return hidden_states if not fmt else (hidden_states,) + (None,) * (fmt - 1)

            def replay(hidden_states=None, *args, **kwargs):
                h = batches[calls[0]]
                if h.shape != hidden_states.shape:
                    raise AssertionError(f"cached state {tuple(h.shape)} does not match the batch "
                                         f"{tuple(hidden_states.shape)}")
                calls[0] += 1
                return h if not fmt else (h,) + (None,) * (fmt - 1)

            # The view's own block copies only: the shared model's blocks are untouched.
            overrides = {blocks[pos]: passthrough for pos in range(first - 1)}
            overrides[blocks[first - 1]] = replay
        else:
            overrides = {}
        with forward_overrides(overrides):
            return token_nll_rows(view, self.ids, self.mask, batch_size=self.batch_size)

    def score(self, removed: Iterable[int]) -> tuple[float, bool]:
        """(mean NLL, whether it came from the cache)."""
        cached = self.cache.get(removed)
        if cached is not None:
            return cached, True
        value, per = self.nll_samples(removed, use_prefix=self.use_prefix)
        self.cache.put(removed, value, per)
        return value, False

    def sample_nll(self, removed: Iterable[int]) -> tuple[float, ...] | None:
        """The mean NLL of each verification sample for a set scored before (None if never scored)."""
        return self.cache.sample_nll(removed)


def resolve_tokens(tokens: Any, tokenizer: Any, analysis: Any, cfg: SelectConfig, cache: NLLCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(input_ids, attention_mask, provenance) of the verification tokens: `tokens` as given (a
    `Calibration`, or an (N, T) tensor), else `cfg.verify_samples` x `cfg.verify_seq_len` drawn
    from the analysis's calibration text apart from the capture's samples (once per `cache`: the
    text is reloaded and tokenised only for a draw the cache has not seen)."""
    if tokens is None:
        if tokenizer is None:
            raise MiPrunError("verification needs the tokenizer (or tokens=...). Fix: pass a LoadedModel.")
        calib = dict(getattr(analysis, "calibration", {}) or {})
        draw = (id(tokenizer), calib.get("source"), calib.get("sha256"), calib.get("seed"), calib.get("n_samples"),
                calib.get("seq_len"), cfg.verify_samples, cfg.verify_seq_len)
        tokens = cache.drawn.get(draw) if cache is not None else None
        if tokens is None:
            tokens = verification_tokens(tokenizer, calibration_text(calib), calib, cfg.verify_samples,
                                         cfg.verify_seq_len)
            if cache is not None:
                cache.drawn[draw] = tokens
    if hasattr(tokens, "input_ids"):
        return tokens.input_ids, getattr(tokens, "attention_mask", None), dict(getattr(tokens, "provenance", {}))
    ids = torch.as_tensor(tokens)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise MiPrunError(f"verification tokens must be (samples, length >= 2); got {tuple(ids.shape)}.")
    return ids, None, {"source": "given", "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}


def unwrap_model(model: Any, tokenizer: Any, config: Any) -> tuple[Any, Any]:
    """(module, tokenizer) from a `LoadedModel` or a module (+ tokenizer); `config` checked."""
    if not isinstance(config, SelectConfig):
        raise MiPrunError(f"config must be a SelectConfig, got {type(config).__name__}.")
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    return model, tokenizer


VERIFY_TOKENS = "verification tokens per sample (verify_seq_len, --verify-tokens)"


def model_scorer(model: Any, analysis: Any, config: SelectConfig, *, n_blocks: int, starts: Iterable[int],
                 tokenizer: Any = None, tokens: Any = None, batch_size: int = 8, cache: NLLCache | None = None,
                 use_prefix: bool = True, progress: Any = None, force: bool = False) -> PrefixScorer:
    """The scorer of a search on `model` (a `LoadedModel` or a module), its tokens' provenance in
    `scorer.provenance`:
    refuses a model other than the one `analysis` was made on (the check `prune` makes), draws
    the verification tokens unless `tokens` are given, and binds `cache` to (model, tokens).
    `force=True` accepts another model with the same block count. Tokens longer than the model's
    context (checked before any text is read) or ids outside its vocabulary are refused."""
    module, tokenizer = unwrap_model(model, tokenizer, config)
    if analysis is not None:
        check_same_model(getattr(analysis, "model", None), n_blocks, module, where="the analysis", force=force)
    elif len(find_blocks(module)) != n_blocks:
        raise MiPrunError(f"the problem has {n_blocks} blocks, the model {len(find_blocks(module))}.")
    cache = cache if cache is not None else NLLCache()
    if tokens is None:
        check_context(module, config.verify_seq_len, VERIFY_TOKENS)
    ids, mask, prov = resolve_tokens(tokens, tokenizer, analysis, config, cache)
    check_context(module, int(ids.shape[1]), VERIFY_TOKENS)
    ids = check_token_ids(ids, module, "verification tokens")
    cache.bind(module, tokens_key(ids, mask))
    return PrefixScorer(module, ids, mask, batch_size, starts, cache, use_prefix=use_prefix, progress=progress,
                        provenance=prov)


__all__ = ["NLLCache", "PrefixScorer", "model_scorer", "resolve_tokens", "tokens_key", "unwrap_model"]
