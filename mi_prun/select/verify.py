"""Verified selection: MI candidates checked by a few forward passes (DESIGN.md section 5).

Every one-pass criterion is a proxy for the pruned model's loss and fails on some model. The
verified search takes the candidate sets of all of them (`candidates.propose`, no forward pass),
scores each distinct set by the mean next-token NLL of the pruned view (weights shared, nothing
copied) on verification tokens, calibration text kept apart from the capture's
(`mi_prun.data.verification_tokens`), and returns the best. A budget bounds the passes
(`SelectConfig.verify_budget`: by default a quarter of SLEB-style greedy removal's passes for the
same n): candidates are scored in `propose`'s order until it is spent; what is left goes to local
search from the best set, which needs no proxy at all:
- an exchange, SLEB's step run once backwards and once forwards: every removed block is put back in
  turn (n passes; the one whose return lowers the NLL most stays), then every kept block is tried
  in its place and the best set kept. The first exchange tries the kept blocks in MI's and BI's
  redundancy order; later ones in the order the earlier trials measured (`exchange_order`): what
  adding a block cost is a measurement, and a proxy's order is what made the candidates miss it.
  Exchanges find blocks that no one-pass criterion ranks as redundant;
- when an exchange no longer improves, swap moves (`candidates.neighbours`: a removed block traded
  for an adjacent kept block or the most redundant one by MI), the first improving swap accepted,
  while the NLL falls; an improving swap is followed by exchanges again.
The search stops when the budget is spent or neither an exchange nor a swap improves.

Reused work:
- `PrefixScorer`: one dense pass caches h_b of the verification tokens at every block boundary
  where a removed set may start; a candidate's pass starts at its first removed block (the blocks
  before it replay the cached state). Each such pass counts as one forward pass in
  `forward_passes`; the dense pass that fills the cache is reported apart
  (`verification["dense_passes"]`). Memory: (removable blocks) x N x T x d values in the model's
  dtype (about 220 MB for SmolLM2-135M at 16 x 256 tokens in float32).
- `NLLCache`: NLL per removed set for one (model, tokens) pair, whatever n; callers (the app's
  ratio slider) keep it and pass it back, and a set seen before costs no pass.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from mi_prun.config import SelectConfig, as_int
from mi_prun.errors import MiPrunError
from mi_prun.progress import Progress
from mi_prun.select.candidates import Candidate, exchange_order, nan_last, neighbours, propose
from mi_prun.select.costs import set_cost
from mi_prun.select.registry import VERIFIABLE, check_analysis, make_problem
from mi_prun.select.selection import Selection, make_selection
from mi_prun.select.task_scorer import verification_source

log = logging.getLogger(__name__)

PASS_NOTE = ("forward_passes counts new candidate passes over the verification tokens (a set in the NLL "
             "cache costs none); a pass that starts from the cached dense hidden states at its first "
             "removed block counts as one; the dense pass that fills that cache is counted in dense_passes. "
             "The budget bounds sets_scored (cached or not), so the answer is the same with a cold or a "
             "warm cache, and sets_scored is what the search costs from a cold cache")


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
        self.prefix: Any = None  # the PrefixScorer's dense states, reused across calls
        self.drawn: dict[tuple, Any] = {}  # verification tokens drawn from a calibration text, by draw

    def bind(self, model: Any, key: str) -> None:
        if self.key != (id(model), key):
            self.key, self.nll, self.prefix = (id(model), key), {}, None

    def get(self, removed: Iterable[int]) -> float | None:
        return self.nll.get(tuple(sorted(removed)))

    def put(self, removed: Iterable[int], nll: float) -> None:
        self.nll[tuple(sorted(removed))] = float(nll)

    def __len__(self) -> int:
        return len(self.nll)


class PrefixScorer:
    """NLL of `model` with blocks removed, each pass started at the first removed block.

    `starts` are the blocks a removed set may start at; the dense pass (lazy, once) keeps the input
    of each of them, per batch of `batch_size` rows: {b: [tensor (B, T, d)]}.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 batch_size: int, starts: Iterable[int], cache: NLLCache) -> None:
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.batch_size = as_int(batch_size, "batch_size")
        self.starts = sorted({int(b) for b in starts if int(b) >= 1})
        self.cache = cache
        self.dense_nll: float | None = None
        self.dense_passes = 0

    def _states(self) -> dict[str, Any]:
        pre = self.cache.prefix
        if pre is not None and pre["batch_size"] == self.batch_size and set(self.starts) <= set(pre["states"]):
            return pre
        from mi_prun.evaluate import token_nll
        from mi_prun.models import find_blocks
        from mi_prun.models.surgery import pruned_view

        copy = pruned_view(self.model, [])  # hooks go on a weight-sharing copy, never on the shared model
        blocks = find_blocks(copy).blocks
        states: dict[int, list[torch.Tensor]] = {b: [] for b in self.starts}
        formats: dict[int, int] = {}  # block -> 0 (returns a tensor) or the length of its tuple

        def make_hook(b: int):
            def hook(module, args, output):
                formats[b] = len(output) if isinstance(output, (tuple, list)) else 0
                if b + 1 in states:
                    states[b + 1].append((output[0] if formats[b] else output).detach())
            return hook

        handles = [blk.register_forward_hook(make_hook(b)) for b, blk in enumerate(blocks)]
        try:
            total, count = token_nll(copy, self.ids, self.mask, batch_size=self.batch_size)
        finally:
            for h in handles:
                h.remove()
        self.dense_passes += 1
        self.cache.prefix = {"states": states, "formats": formats, "dense_nll": total / max(count, 1),
                             "batch_size": self.batch_size}
        return self.cache.prefix

    def dense(self) -> float:
        """The dense model's mean NLL on the tokens (fills the prefix cache on first use)."""
        return float(self._states()["dense_nll"])

    def nll(self, removed: Iterable[int], use_prefix: bool = True) -> float:
        """Mean NLL (nats) with `removed` skipped; one forward pass (from the first removed block
        with `use_prefix`). Not cached here: `score` is the cached entry point."""
        from mi_prun.evaluate import token_nll
        from mi_prun.models import find_blocks
        from mi_prun.models.surgery import pruned_view

        rem = tuple(sorted(int(b) for b in removed))
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

            # Instance attributes shadow the class's forward on the view's own block copies only;
            # the shared model's blocks are untouched.
            for pos in range(first - 1):
                blocks[pos].forward = passthrough
            blocks[first - 1].forward = replay
        total, count = token_nll(view, self.ids, self.mask, batch_size=self.batch_size)
        if count == 0:
            raise MiPrunError("no verification token to score (all masked). Fix: give longer samples.")
        return total / count

    def score(self, removed: Iterable[int]) -> tuple[float, bool]:
        """(mean NLL, whether it came from the cache)."""
        cached = self.cache.get(removed)
        if cached is not None:
            return cached, True
        value = self.nll(removed)
        self.cache.put(removed, value)
        return value, False


def resolve_tokens(tokens: Any, tokenizer: Any, analysis: Any, cfg: SelectConfig, cache: NLLCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(input_ids, attention_mask, provenance) of the verification tokens: `tokens` as given (a
    `Calibration`, or an (N, T) tensor), else `cfg.verify_samples` x `cfg.verify_seq_len` drawn
    from the analysis's calibration text apart from the capture's samples (once per `cache`: the
    text is reloaded and tokenised only for a draw the cache has not seen)."""
    if tokens is None:
        from mi_prun.data import calibration_text, verification_tokens

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


def _better(a: float, b: float | None) -> bool:
    """NLL a beats b (NaN never wins; ties keep the earlier set)."""
    return not math.isnan(a) and (b is None or math.isnan(b) or a < b)


def unwrap_model(model: Any, tokenizer: Any, config: Any) -> tuple[Any, Any]:
    """(module, tokenizer) from a `LoadedModel` or a module (+ tokenizer); `config` checked."""
    if not isinstance(config, SelectConfig):
        raise MiPrunError(f"config must be a SelectConfig, got {type(config).__name__}.")
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    return model, tokenizer


def verified_search(problem: Any, cands: list[Candidate], nll: Callable[[tuple[int, ...]], tuple[float, bool]],
                    budget: int, progress: Progress | None = None) -> dict[str, Any]:
    """The search of `verified_select` on any NLL: `cands` scored in order, then exchanges and swaps
    from the best set (module docstring), at most `budget` distinct sets scored.

    `nll(removed)` returns (mean NLL, whether it was cached). The budget counts sets scored, cached
    or not, so the answer never depends on what a cache held. Returns {"best": the winning row,
    "scored": every row in order ({removed, proposers, objective, nll, cached, stage}), "passes":
    uncached calls, "sets_by_stage": sets scored per stage}.
    """
    budget = as_int(budget, "verification budget", minimum=1)
    scored: list[dict[str, Any]] = []
    seen: dict[tuple[int, ...], float] = {}
    stages = {"candidate": 0, "exchange": 0, "swap": 0}
    state: dict[str, Any] = {"best": None, "passes": 0}

    def score(cand: Candidate, stage: str) -> float | None:
        """NLL of a candidate (None once the budget is spent); a set of n blocks may become the
        best, a smaller one (an exchange's put-back step) is measured only."""
        if cand.removed in seen:
            return seen[cand.removed]
        if len(seen) >= budget:
            return None
        value, cached = nll(cand.removed)
        state["passes"] += 0 if cached else 1
        stages[stage.split(" ")[0]] += 1
        row = {"removed": list(cand.removed), "proposers": list(cand.proposers), "objective": cand.objective,
               "nll": float(value), "cached": bool(cached), "stage": stage}
        scored.append(row)
        seen[cand.removed] = row["nll"]
        best = state["best"]
        if len(cand.removed) == problem.n and (best is None or _better(row["nll"], best["nll"])):
            state["best"] = row
        if progress is not None and not cached:
            progress("verify", min(1.0, len(seen) / budget), f"set {len(seen)}/{budget}: NLL {value:.4f}")
        log.debug("verify %s %s: NLL %.4f%s", stage, list(cand.removed), value, " (cached)" if cached else "")
        return row["nll"]

    def make(removed: Iterable[int], proposer: str) -> Candidate:
        key = tuple(sorted(removed))
        return Candidate(key, [proposer], set_cost(key, problem.C))

    def swaps() -> bool:
        """First-improvement swap moves from the best set while the NLL falls; True when one
        improved (False also when the budget ran out)."""
        improved = False
        while True:
            before = state["best"]
            for nb in neighbours(tuple(before["removed"]), problem):
                if score(make(nb, f"swap:{before['proposers'][0]}"), "swap") is None:
                    return improved
                if state["best"] is not before:
                    improved = True
                    break
            else:
                return improved

    added: dict[int, float] = {}  # block -> NLL(base + block) - NLL(base) in the latest exchange that tried it

    def exchange() -> bool:
        """One exchange from the best set (module docstring); True when it improved."""
        before = state["best"]
        cur = tuple(before["removed"])
        back: list[tuple[float, int]] = []
        for b in cur if len(cur) > 1 else ():  # n = 1: put back the only block (the dense model)
            value = score(make([x for x in cur if x != b], f"put-back:{b}"), "exchange (put back)")
            if value is None:
                return False
            back.append((value, b))
        best_back = min(back, key=lambda t: (*nan_last(t[0]), t[1])) \
            if back else (0.0, cur[0])  # n = 1: every trial starts from the dense model, a common base
        returned = best_back[1]
        base = [x for x in cur if x != returned]
        for k in exchange_order(base, returned, problem, added):
            value = score(make(base + [k], f"exchange:{before['proposers'][0]}"), "exchange")
            if value is None:
                break
            if k != returned:
                added[k] = value - best_back[0]
        return state["best"] is not before

    for cand in cands:
        score(cand, "candidate")
    if state["best"] is None:
        raise MiPrunError("the verified search scored no set of the right size. Fix: give a budget of at least 1.")
    while len(seen) < budget and problem.n < len(problem.allowed):
        if not exchange() and not swaps():
            break
    return {"best": state["best"], "scored": scored, "passes": state["passes"], "sets_by_stage": stages}


def verified_select(model: Any, analysis: Any, config: SelectConfig = SelectConfig(), *, tokenizer: Any = None,
                    tokens: Any = None, batch_size: int = 8, cache: NLLCache | None = None,
                    progress: Progress | None = None) -> Selection:
    """The config's one-pass answer checked against every criterion's candidates, then improved by
    local search (exchanges, swaps), with at most `config.verify_budget(n, removable)` sets scored
    by forward passes on verification tokens; the set of lowest NLL wins (`verified_search`).

    `model` is a `LoadedModel` (its tokenizer draws the tokens) or a module (then `tokenizer` or
    `tokens`). With verify_passes 0, or a method outside `VERIFIABLE`, this is `select`'s answer.
    The model is only read: every pass runs a weight-sharing `pruned_view`.
    `progress("verify", fraction, message)` is called after every pass.
    """
    from mi_prun.models import find_blocks
    from mi_prun.select.registry import select

    t0 = time.perf_counter()
    model, tokenizer = unwrap_model(model, tokenizer, config)
    one = select(analysis, config=config.replace(verify_passes=0))
    if not config.verifies or config.method not in VERIFIABLE:
        return one
    problem = make_problem(analysis, config)
    if len(find_blocks(model)) != problem.n_blocks:
        raise MiPrunError(f"the analysis has {problem.n_blocks} blocks, the model {len(find_blocks(model))}. "
                          "Fix: verify with the model the analysis was made on.")
    cache = cache if cache is not None else NLLCache()
    task = None
    if tokens is None:  # config.verify_on: another text's tokens, or a task's scorer (task_scorer)
        tokens, task = verification_source(config, model, tokenizer, cache, batch_size)
    if task is None:
        ids, mask, tok_prov = resolve_tokens(tokens, tokenizer, analysis, config, cache)
        cache.bind(model, tokens_key(ids, mask))
        scorer: Any = PrefixScorer(model, ids, mask, batch_size, problem.allowed, cache)
    else:
        scorer, tok_prov = task, task.provenance
    _, _, span_norm = check_analysis(analysis)
    cands = propose(problem, span_norm, one.removed, config.method)
    budget = config.verify_budget(problem.n, len(problem.allowed))
    out = verified_search(problem, cands, scorer.score, budget, progress)
    best, scored, passes = out["best"], out["scored"], out["passes"]
    if progress is not None:
        progress("verify", 1.0, f"{len(scored)} sets scored, {passes} new passes")
    one_nll = next((r["nll"] for r in scored if tuple(r["removed"]) == one.removed), None)
    dense_nll = cache.prefix["dense_nll"] if cache.prefix is not None else None
    gap = None if one_nll is None else one_nll - best["nll"]
    winner = tuple(best["removed"])
    result = make_selection(
        config.method, problem.n, problem.n_blocks, winner, set_cost(winner, problem.C), config.run_cost,
        time.perf_counter() - t0, forward_passes=passes, span_lookups=one.span_lookups, ratio=one.ratio,
        trajectory=one.trajectory, options={**one.options, "verify_passes": config.verify_passes,
                                           "verify_samples": config.verify_samples,
                                           "verify_seq_len": config.verify_seq_len,
                                           **({"verify_on": config.verify_on} if config.verify_on else {})},
        provenance=one.provenance)
    log.info("verified %s: removed %s (NLL %.4f, proposed by %s) after %d of %d sets (%d new passes); "
             "one-pass %s NLL %s", config.method, list(winner), best["nll"], best["proposers"][0], len(scored),
             budget, passes, list(one.removed), one_nll)
    return replace(result, verified=True, nll=best["nll"], candidates=scored,
                   winner_source=best["proposers"][0], one_pass_removed=one.removed, one_pass_nll=one_nll,
                   verification={
                       "budget": budget, "budget_rule": config.verify_passes, "passes": passes,
                       "sets_scored": len(scored), "sets_by_stage": out["sets_by_stage"],
                       "dense_passes": scorer.dense_passes,
                       "candidates_proposed": len(cands), "dense_nll": dense_nll,
                       "one_pass_gap_nats": gap, "one_pass_ppl_ratio": None if gap is None else math.exp(gap),
                       "tokens": tok_prov, "note": PASS_NOTE,
                       **({"task": task.report(winner, one.removed if one_nll is not None else None)}
                          if task is not None else {})})


__all__ = ["NLLCache", "PASS_NOTE", "PrefixScorer", "resolve_tokens", "tokens_key", "verified_search",
           "verified_select"]
