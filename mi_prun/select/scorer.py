"""The one NLL scorer behind every search that runs the model (verified, MI-guided, SLEB-style).

A search asks `scorer.score(removed)` -> (mean next-token NLL in nats of the model with `removed`
skipped, whether it came from the cache); `scorer.dense()` is the unpruned model's NLL and
`scorer.dense_passes` the passes that filled the prefix cache. `PrefixScorer` is the implementation
on a real model:
- each pass runs the one block runner (`mi_prun.runtime`: the shared model is never touched,
  whatever holds its weights) and, with `use_prefix`, starts at the first removed block: one dense
  pass caches h_b of the tokens at every block boundary where a removed set may start.
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

from mi_prun.config import SelectConfig, as_int, expect_config
from mi_prun.data import calibration_text, verification_tokens
from mi_prun.errors import MiPrunError
from mi_prun.models.accept import check_token_ids
from mi_prun.models.blocks import check_context, find_blocks
from mi_prun.runtime.identity import check_same_model
from mi_prun.runtime.runner import BlockRunner


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
        # sets a race scored on some groups only (select/race.py: removed -> Partial), continued on a later need
        self.partial: dict[tuple[int, ...], Any] = {}

    def bind(self, model: Any, key: str) -> None:
        if self.key != (id(model), key):
            self.key, self.nll, self.samples, self.prefix, self.fresh = (id(model), key), {}, {}, None, None
            self.partial = {}

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

    One `BlockRunner` (`mi_prun.runtime`) holds the verification tokens in batches of `batch_size`
    rows (the `groups`); its dense pass (lazy, once, shared through `cache`) keeps h_b at every
    block in `starts`, and a set whose first removed block is b runs from there, whatever holds the
    weights. `rows(removed, groups)` scores some groups only (a race stops scoring a set early).
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 batch_size: int, starts: Iterable[int], cache: NLLCache, use_prefix: bool = True,
                 progress: Any = None, provenance: dict[str, Any] | None = None, dense: bool = True) -> None:
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.use_prefix = bool(use_prefix)
        self.dense_pass = bool(dense)  # False: a lazy prefix (run as deep as the sets scored need), no dense NLL
        self.progress = progress  # the caller's progress callback, for the search that uses it
        self.provenance = dict(provenance or {})  # where the tokens came from
        self.batch_size = as_int(batch_size, "batch_size")
        self.starts = sorted({int(b) for b in starts if int(b) >= 1})
        self.cache = cache
        self.dense_nll: float | None = None
        self.dense_passes = 0

    def _states(self) -> dict[str, Any]:
        pre = self.cache.prefix
        if pre is not None and pre["batch_size"] == self.batch_size and set(self.starts) <= pre["prefix"].want \
                and (pre["dense_nll"] is not None or not self.dense_pass):
            return pre
        runner = BlockRunner(self.model, self.ids, self.mask, batch_size=self.batch_size)
        prefix = runner.prefix(self.starts, dense=self.dense_pass)
        dense_nll = None
        if prefix.dense_rows is not None:
            sums, counts = prefix.dense_rows
            self.dense_passes += 1
            dense_nll = float(sums.sum()) / max(int(counts.sum()), 1)
        self.cache.prefix = {"prefix": prefix, "runner": runner, "batch_size": self.batch_size, "dense_nll": dense_nll}
        return self.cache.prefix

    @property
    def groups(self) -> list[list[int]]:
        """The verification sample indices of each group (a batch of `batch_size` rows)."""
        return self._states()["runner"].groups

    def dense(self) -> float:
        """The dense model's mean NLL on the tokens (fills the prefix cache on first use)."""
        pre = self._states()
        if pre["dense_nll"] is None:
            raise MiPrunError("this scorer runs no dense pass (dense=False), so it has no dense NLL. "
                              "Fix: a PrefixScorer with dense=True.")
        return float(pre["dense_nll"])

    def rows(self, removed: Iterable[int], groups: Iterable[int] | None = None,
             use_prefix: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample of the given groups (all when None), in the order of the groups given: the summed
        next-token NLL (float64) and the tokens scored with `removed` skipped; one pass over those
        groups, from the cached dense state at the first removed block."""
        pre = self._states()
        use = self.use_prefix if use_prefix is None else use_prefix
        which = None if groups is None else [int(g) for g in groups]
        return pre["runner"].rows_without(removed, pre["prefix"] if use else None, which)

    def units(self, removed: Iterable[int], groups: Iterable[int] | None = None) -> int:
        """Token-block units `rows(removed, groups)` spends from the dense prefix (tokens x (blocks run +
        the head)); less really runs when a kept run's states serve (`work`)."""
        pre = self._states()
        which = None if groups is None else [int(g) for g in groups]
        return pre["runner"].units(removed, pre["prefix"] if self.use_prefix else None, which)

    @property
    def work(self) -> int:
        """Token-block units really run by this scorer's passes so far (the dense pass not included)."""
        pre = self.cache.prefix
        return 0 if pre is None else int(pre["runner"].work)

    @property
    def run_states(self) -> Any:
        """The kept runs' states (`mi_prun.runtime.runner.RunStates`: hits, blocks_saved, bytes)."""
        return self._states()["prefix"].runs

    def nll(self, removed: Iterable[int], use_prefix: bool = True) -> float:
        """Mean NLL (nats) with `removed` skipped; one forward pass (from the first removed block
        with `use_prefix`). Not cached here: `score` is the cached entry point."""
        return self.nll_samples(removed, use_prefix)[0]

    def nll_samples(self, removed: Iterable[int], use_prefix: bool = True) -> tuple[float, tuple[float, ...]]:
        """(mean NLL over every token scored, the mean NLL of each sample) with `removed` skipped."""
        sums, counts = self.rows(removed, None, use_prefix)
        total, count = float(sums.sum()), int(counts.sum())
        if count == 0:
            raise MiPrunError("no verification token to score (all masked). Fix: give longer samples.")
        per = tuple(float(s) / int(c) if int(c) else float("nan") for s, c in zip(sums.tolist(), counts.tolist()))
        return total / count, per

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
    expect_config(config, SelectConfig)
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
