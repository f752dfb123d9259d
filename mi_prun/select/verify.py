"""Verified selection: MI candidates checked by a few forward passes of the pruned model.

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

Passes run through the one NLL scorer (`mi_prun.select.scorer`: `PrefixScorer`, each pass started
at its first removed block, and `NLLCache`). Each such pass counts as one forward pass in
`forward_passes`; the dense pass that fills the prefix cache is reported apart
(`verification["dense_passes"]`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from mi_prun.config import SelectConfig, as_int, expect_config
from mi_prun.errors import MiPrunError
from mi_prun.models.accept import check_token_ids
from mi_prun.models.memory import peak_memory
from mi_prun.runtime.sources import weight_source
from mi_prun.progress import Progress
from mi_prun.select.candidates import (
    Candidate,
    exchange_order,
    nan_last,
    neighbours,
    propose,
)
from mi_prun.select.costs import set_cost
from mi_prun.select.confirm import FreshDrawError, confirm, fresh_tokens
from mi_prun.select.registry import VERIFIABLE, check_analysis, make_problem, run_selector
from mi_prun.select.scorer import NLLCache, PrefixScorer, resolve_tokens, tokens_key, unwrap_model
from mi_prun.select.selection import Selection, make_selection
from mi_prun.select.task_scorer import TaskScorer, verification_scorer

log = logging.getLogger(__name__)

PASS_NOTE = ("forward_passes counts new candidate passes over the verification tokens (a set in the NLL "
             "cache costs none); a pass that starts from the cached dense hidden states at its first "
             "removed block counts as one; the dense pass that fills that cache is counted in dense_passes. "
             "The budget bounds sets_scored (cached or not), so the answer is the same with a cold or a "
             "warm cache, and sets_scored is what the search costs from a cold cache")


def _better(a: float, b: float | None) -> bool:
    """NLL a beats b (NaN never wins; ties keep the earlier set)."""
    return not math.isnan(a) and (b is None or math.isnan(b) or a < b)


def verified_search(problem: Any, cands: list[Candidate], nll: Callable[[tuple[int, ...]], tuple[float, bool]],
                    budget: int, progress: Progress | None = None, *, stop_early: bool = True) -> dict[str, Any]:
    """The search of `verified_select` on any NLL: `cands` scored in order, then exchanges and swaps
    from the best set (module docstring), at most `budget` distinct sets scored.

    `nll(removed)` returns (mean NLL, whether it was cached). The budget counts sets scored, cached
    or not, so the answer never depends on what a cache held. Returns {"best": the winning row,
    "scored": every row in order ({removed, proposers, objective, nll, cached, stage}), "passes":
    uncached calls, "sets_by_stage": sets scored per stage}.

    `stop_early` (the default) ends the search when what is left of the budget cannot reach a set
    of n blocks: an exchange scores its smaller put-back sets (never the answer) before any set of
    n, so once the budget left is no more than the put-back sets not yet scored, every later pass
    would be a put-back pass and the answer is already final. The answer is the same either way
    (tests/test_verify.py); only the sets scored after it are saved.
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
            progress("verify", min(1.0, len(seen) / budget), f"set {len(seen)} of at most {budget} "
                     f"({budget - len(seen)} left in the budget): NLL {value:.4f}")
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
        unseen = sum(tuple(x for x in cur if x != b) not in seen for b in cur) if len(cur) > 1 else 0
        if stop_early and budget - len(seen) <= unseen:
            state["final"] = True  # the put-back sets would spend the rest: no set of n blocks is reached
            return False
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

    if progress is not None:
        progress("verify", 0.0, f"0 of at most {budget} sets scored")
    for cand in cands:
        score(cand, "candidate")
    if state["best"] is None:
        raise MiPrunError("the verified search scored no set of the right size. Fix: give a budget of at least 1.")
    while len(seen) < budget and problem.n < len(problem.allowed):
        if not exchange() and (state.get("final") or not swaps()):
            break
    return {"best": state["best"], "scored": scored, "passes": state["passes"], "sets_by_stage": stages}


def verified_select(model: Any, analysis: Any, config: SelectConfig | None = None, *, tokenizer: Any = None,
                    tokens: Any = None, batch_size: int = 8, cache: NLLCache | None = None,
                    progress: Progress | None = None, force: bool = False, confirm_tokens: Any = None) -> Selection:
    """The config's one-pass answer checked against every criterion's candidates, then improved by
    local search (exchanges, swaps), with at most `config.verify_budget(n, removable)` sets scored
    by forward passes on verification tokens; the set of lowest NLL wins (`verified_search`).

    `model` is a `LoadedModel` (its tokenizer draws the tokens) or a module (then `tokenizer` or
    `tokens`). With verify_passes 0, or a method outside `VERIFIABLE`, this is `select`'s answer.
    The model is only read: every pass runs a weight-sharing `pruned_view`. A model other than the
    analysed one is refused (`force=True`: accepted with the same block count, as `prune --force`).
    `progress("verify", fraction, message)` is called after every pass.

    With `config.verify_confirm` (3, the default) the finalists that the verification tokens
    cannot tell from the winner are re-scored on a fresh draw of the same text (`confirm`); it is
    drawn here, or given as `confirm_tokens` (needed when `tokens` are given).
    """
    t0 = time.perf_counter()
    config = config if config is not None else SelectConfig()
    expect_config(config, SelectConfig)
    one = run_selector(analysis, config.replace(verify_passes=0))
    if not config.verifies or config.method not in VERIFIABLE:
        return one
    problem = make_problem(analysis, config)
    # model_scorer, or the text / task of config.verify_on (task_scorer)
    scorer = verification_scorer(model, analysis, config, n_blocks=problem.n_blocks, starts=problem.allowed,
                                 tokenizer=tokenizer, tokens=tokens, batch_size=batch_size, cache=cache, force=force)
    cache, tok_prov = scorer.cache, scorer.provenance
    _, _, span_norm = check_analysis(analysis)
    cands = propose(problem, span_norm, one.removed, config.method)
    budget = config.verify_budget(problem.n, len(problem.allowed))
    out = verified_search(problem, cands, scorer.score, budget, progress)
    best, scored, passes = out["best"], out["scored"], out["passes"]
    confirmed = None
    if config.verify_confirm:  # finalists within noise on a fresh draw of the same text (select/confirm.py)
        if not isinstance(scorer, PrefixScorer) or (tokens is not None and confirm_tokens is None):
            confirmed = {"note": "not confirmed: only tokens drawn here from a text can be drawn again "
                                 "(or give confirm_tokens)"}
        else:
            fresh: dict[str, PrefixScorer] = {}

            def score_b(removed: tuple[int, ...]) -> tuple[float, bool]:
                if not fresh:  # drawn only when a runner-up is within noise
                    draw_b = confirm_tokens if confirm_tokens is not None else fresh_tokens(
                        config, analysis, unwrap_model(model, tokenizer, config)[1], scorer.ids)
                    ids_b = check_token_ids(torch.as_tensor(getattr(draw_b, "input_ids", draw_b)), scorer.model,
                                            "confirmation tokens")
                    if cache.fresh is None:
                        cache.fresh = NLLCache()
                    cache.fresh.bind(scorer.model, tokens_key(ids_b, None))
                    fresh["b"] = PrefixScorer(scorer.model, ids_b, None, batch_size, problem.allowed, cache.fresh,
                                              use_prefix=False)
                return fresh["b"].score(removed)

            try:
                best, confirmed = confirm(problem.n, scored, score_b, config.verify_confirm,
                                          samples_a=scorer.sample_nll, z=config.CONFIRM_Z)
                passes += confirmed["passes"]
            except FreshDrawError as e:  # the search's answer stands, and the record says why
                log.warning("verified search not confirmed: %s", e)
                confirmed = {"note": f"not confirmed: {e}"}
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
                       "tokens": tok_prov, "note": PASS_NOTE, "offload": weight_source(scorer.model).describe()["streamed"],
                       "peak_memory": peak_memory(),
                       **({"task": scorer.report(winner, one.removed if one_nll is not None else None)}
                          if isinstance(scorer, TaskScorer) else {}),
                       **({"confirm": confirmed} if confirmed is not None else {})})


__all__ = ["NLLCache", "PASS_NOTE", "PrefixScorer", "resolve_tokens", "tokens_key", "verified_search",
           "verified_select"]  # the scorer's names stay importable from here
