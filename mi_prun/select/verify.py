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
The search stops when the budget is spent or neither an exchange nor a swap improves;
`verification["stopped"]` says which ("budget" or "converged"), and `stop_note` what to do about a
budget that ran out.

Passes run through the one NLL scorer (`mi_prun.select.scorer`: `PrefixScorer`, each pass started
at its first removed block, and `NLLCache`). Each such pass counts as one forward pass in
`forward_passes`; the dense pass that fills the prefix cache is reported apart
(`verification["dense_passes"]`).

Racing (`SelectConfig.verify_race`, `mi_prun.select.race`): with a scorer that scores groups of
samples (`scoring.RowScorer`), every set is raced against the best complete set so far (an
exchange's put-back sets against the best put-back set of that exchange) and dropped once it is
clearly worse; only complete sets can win or reach the confirmation. A stage's sets (the
candidates, an exchange's put-back sets, its trials) race as a field: first looks first, then the
best-looking first (`race.RaceRule.order`). "units" spends a budget of
token-block units (the auto passes x the mean units of a full pass of the candidates), "sets" (the default) the
budget in sets as unraced, "off" is the unraced search exactly. `verification["race"]` records the
rule, the units charged and run, what the same sets would cost unraced and the sets dropped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
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
from mi_prun.select.race import Race, RaceRule
from mi_prun.select.registry import VERIFIABLE, Problem, check_analysis, make_problem, run_selector
from mi_prun.select.scorer import NLLCache, PrefixScorer, resolve_tokens, tokens_key, unwrap_model
from mi_prun.select.scoring import can_race
from mi_prun.select.selection import ScoredSet, Selection, make_selection
from mi_prun.select.task_scorer import TaskScorer, is_task_spec, verification_scorer

log = logging.getLogger(__name__)

PASS_NOTE = ("forward_passes counts new candidate passes over the verification tokens (a set in the NLL "
             "cache costs none); a pass that starts from the cached dense hidden states at its first "
             "removed block counts as one (raced: a set scored on some groups only, too); the dense pass "
             "that fills that cache is counted in dense_passes. The budget bounds sets_scored (cached or "
             "not), or raced in units the token-block units charged as from a cold cache (race.units), so "
             "the answer is the same with a cold or a warm cache")


def _better(a: float, b: float | None) -> bool:
    """NLL a beats b (NaN never wins; ties keep the earlier set)."""
    return not math.isnan(a) and (b is None or math.isnan(b) or a < b)


@dataclass(frozen=True)
class SearchOutcome:
    """What `verified_search` found: the winning set, every set scored in order, the sets that cost
    new forward work (`passes`), the sets scored per stage, and for a raced search the token-block
    units charged and the race's record (`Race.record`)."""

    best: ScoredSet
    scored: list[ScoredSet]
    passes: int
    sets_by_stage: dict[str, int]
    units: int | None = None
    race: dict[str, Any] | None = None
    # "converged": no exchange or swap improved the best set (or nothing was left to search); "budget":
    # the budget ran out first, so a longer search might have found a better set (`stop_note`)
    stopped: str = "converged"


def verified_search(problem: Problem, cands: list[Candidate],
                    nll: Callable[[tuple[int, ...]], tuple[float, bool]] | None, budget: int,
                    progress: Progress | None = None, *, stop_early: bool = True, race: Race | None = None,
                    unit_budget: int | None = None) -> SearchOutcome:
    """The search of `verified_select` on any NLL: `cands` scored in order, then exchanges and swaps
    from the best set (module docstring), at most `budget` distinct sets scored.

    `nll(removed)` returns (mean NLL, whether it was cached). The budget counts sets scored, cached
    or not, so the answer never depends on what a cache held.

    With a `race` (`mi_prun.select.race`), sets are scored by `race.score(removed, against)` instead
    of `nll`: a set of n blocks is raced against the best complete set so far, an exchange's
    put-back set against the best complete put-back set of that exchange, and only complete sets
    can become the best. With the race's order "field" a stage's sets within the budget (the same
    sets the one-by-one search would reach, in sets) all run their first look, then race
    best-looking first (`score_stage`). Then `unit_budget`, when given, replaces `budget`: the
    search stops when the token-block units charged (as from a cold cache, so the answer still never
    depends on a cache) reach it; a stage admits its sets while their first looks fit in what is
    left, and a set once started is raced to its end, so the charge may pass the budget by the rest
    of one stage's admitted sets (one set's units with the order "sequence"). Without a race the
    search is exactly the unraced one.

    `stop_early` (the default) ends the search when what is left of the budget cannot reach a set
    of n: an exchange scores its smaller put-back sets (never the answer) before any set of n, so
    once the budget left is no more than the put-back sets not yet scored (in units: the least
    they can be charged, `Race.first_look_cost`), every later pass would be a put-back pass and the
    answer is already final. The answer is the same either way (tests/test_verify.py); only the
    sets scored after it are saved.
    """
    budget = as_int(budget, "verification budget", minimum=1)
    if race is None and (nll is None or unit_budget is not None):
        raise MiPrunError("an unraced verified search needs an NLL and a budget in sets. Fix: give nll, or a race.")
    if unit_budget is not None:
        unit_budget = as_int(unit_budget, "verification budget in token-block units", minimum=1)
    scored: list[ScoredSet] = []
    seen: dict[tuple[int, ...], ScoredSet] = {}
    stages = {"candidate": 0, "exchange": 0, "swap": 0}
    state: dict[str, Any] = {"best": None, "passes": 0}

    def spent() -> bool:
        if unit_budget is not None and race is not None:
            return race.units >= unit_budget
        return len(seen) >= budget

    def report(row: ScoredSet) -> None:
        if progress is None or row.cached:
            return
        best = state["best"]
        what = (f"NLL {row.nll:.4f}" + ("" if row.complete else f" (dropped after {row.samples} samples)")
                + ("" if best is None else f"; best so far removes {', '.join(map(str, best.removed))} "
                   f"(NLL {best.nll:.4f})"))  # a verified answer to show while the search goes on
        if unit_budget is not None and race is not None:
            progress("verify", min(1.0, race.units / unit_budget), f"set {len(seen)}, "
                     f"{max(0, unit_budget - race.units):,} of {unit_budget:,} token-block units left in the budget: "
                     + what)
        else:
            progress("verify", min(1.0, len(seen) / budget), f"set {len(seen)} of at most {budget} "
                     f"({budget - len(seen)} left in the budget): " + what)

    def score(cand: Candidate, stage: str, against: tuple[int, ...] | None = None,
              admitted: bool = False) -> ScoredSet | None:
        """The row of a candidate (None once the budget is spent, unless `admitted` by its stage); a
        complete set of n blocks may become the best, a smaller one (an exchange's put-back step) is
        measured only."""
        if cand.removed in seen:
            return seen[cand.removed]
        if not admitted and spent():
            state["ran_out"] = True
            return None
        if race is None:
            assert nll is not None
            value, cached = nll(cand.removed)
            row = ScoredSet(cand.removed, tuple(cand.proposers), cand.objective, float(value), bool(cached), stage)
        else:
            out = race.score(cand.removed, against)
            row = ScoredSet(cand.removed, tuple(cand.proposers), cand.objective, float(out.nll), out.cached, stage,
                            complete=out.complete, samples=out.samples, units=out.units)
        state["passes"] += 0 if row.cached else 1
        stages[stage.split(" ")[0]] += 1
        scored.append(row)
        seen[cand.removed] = row
        best = state["best"]
        if len(cand.removed) == problem.n and row.complete and (best is None or _better(row.nll, best.nll)):
            state["best"] = row
        report(row)
        log.debug("verify %s %s: NLL %.4f%s", stage, list(cand.removed), row.nll, " (cached)" if row.cached else "")
        return row

    def incumbent() -> tuple[int, ...] | None:
        return state["best"].removed if state["best"] is not None else None

    def admit(cands: list[Candidate]) -> tuple[list[int], list[int]]:
        """The stage's sets that the budget reaches, as the one-by-one search would score them (indices;
        sets scored before are free), and among them the first index of each set not scored before;
        in units, sets while the first looks of those admitted fit."""
        keep: list[int] = []
        fresh: list[int] = []
        new, charge = set(), 0
        for i, cand in enumerate(cands):
            if cand.removed not in seen and cand.removed not in new:
                if (race.units + charge >= unit_budget if unit_budget is not None and race is not None
                        else len(seen) + len(new) >= budget):
                    state["ran_out"] = True
                    break
                new.add(cand.removed)
                fresh.append(i)
                if unit_budget is not None and race is not None:
                    charge += race.first_look_cost(cand.removed)
            keep.append(i)
        return keep, fresh

    def score_stage(cands: list[Candidate], stage: str,
                    ref: Callable[[list[ScoredSet]], tuple[int, ...] | None]) -> list[ScoredSet | None]:
        """Score one stage's sets (the candidates, an exchange's put-back sets or its trials), each
        raced against `ref(rows done so far in the stage)`; rows in the order given, None past the
        budget. One by one in that order, or with the race's order "field": the sets the budget
        reaches all run their first look, then are raced best-looking first, so the set completed
        first is the stage's likely best and the others race against it instead of against weaker
        sets completed before it (race.py)."""
        rows: list[ScoredSet | None] = [None] * len(cands)
        if race is None or race.rule.order == "sequence" or not race.n_looks:  # no look: nothing to order for
            done: list[ScoredSet] = []
            for i, cand in enumerate(cands):
                row = score(cand, stage, ref(done))
                if row is None:
                    break
                rows[i] = row
                done.append(row)
            return rows
        idx, fresh = admit(cands)
        done = [seen[cands[i].removed] for i in idx if cands[i].removed in seen]

        def looked(k: int) -> None:  # progress (and the app's cancel) while the first looks run
            if progress is not None:
                frac = min(1.0, (race.units / unit_budget) if unit_budget is not None
                           else (len(seen) + 0.25 * (k + 1)) / budget)  # a first look: a quarter of the samples
                progress("verify", frac, f"{stage}: first look of set {k + 1} of {len(fresh)} ({len(seen)} sets "
                                         "scored so far)")

        order = race.field_order([cands[i].removed for i in fresh], looked) if len(fresh) > 1 \
            else range(len(fresh))
        for i in (fresh[k] for k in order):
            row = score(cands[i], stage, ref(done), admitted=True)
            assert row is not None
            done.append(row)
        if fresh:  # listed in the stage's order (the one-pass answer first), whatever order they ran in
            scored[-len(fresh):] = [seen[cands[i].removed] for i in fresh]
        for i in idx:
            rows[i] = seen[cands[i].removed]
        return rows

    def make(removed: Iterable[int], proposer: str) -> Candidate:
        key = tuple(sorted(removed))
        return Candidate(key, [proposer], set_cost(key, problem.C))

    def swaps() -> bool:
        """First-improvement swap moves from the best set while the NLL falls; True when one
        improved (False also when the budget ran out)."""
        improved = False
        while True:
            before = state["best"]
            for nb in neighbours(before.removed, problem):
                if score(make(nb, f"swap:{before.proposers[0]}"), "swap", incumbent()) is None:
                    return improved
                if state["best"] is not before:
                    improved = True
                    break
            else:
                return improved

    added: dict[int, float] = {}  # block -> NLL(base + block) - NLL(base) in the latest exchange that tried it

    def put_backs_left(cur: tuple[int, ...]) -> bool:
        """Whether the budget left can get past the put-back sets not yet scored (module docstring)."""
        sets = [tuple(x for x in cur if x != b) for b in cur] if len(cur) > 1 else []
        unseen = [s for s in sets if s not in seen]
        if unit_budget is not None and race is not None:
            return unit_budget - race.units > sum(race.first_look_cost(s) for s in unseen)
        return budget - len(seen) > len(unseen)

    def exchange() -> bool:
        """One exchange from the best set (module docstring); True when it improved."""
        before = state["best"]
        cur = before.removed
        if stop_early and not put_backs_left(cur):
            state["final"] = True  # the put-back sets would spend the rest: no set of n blocks is reached
            return False

        def put_back(row: ScoredSet) -> int:
            return next(x for x in cur if x not in row.removed)

        def best_back(done: list[ScoredSet]) -> tuple[int, ...] | None:
            fine = [r for r in done if r.complete and not math.isnan(r.nll)]
            return min(fine, key=lambda r: (r.nll, put_back(r))).removed if fine else None

        blocks = list(cur) if len(cur) > 1 else []  # n = 1: put back the only block (the dense model)
        rows = score_stage([make([x for x in cur if x != b], f"put-back:{b}") for b in blocks],
                           "exchange (put back)", best_back)
        if any(row is None for row in rows):
            return False
        back = [(row.nll, b, row) for b, row in zip(blocks, rows) if row is not None]
        chosen = min(((v, b) for v, b, _ in back), key=lambda t: (*nan_last(t[0]), t[1])) \
            if back else (0.0, cur[0])  # n = 1: every trial starts from the dense model, a common base
        returned = chosen[1]
        base = [x for x in cur if x != returned]
        order = exchange_order(base, returned, problem, added)
        trials = score_stage([make(base + [k], f"exchange:{before.proposers[0]}") for k in order], "exchange",
                             lambda done: incumbent())
        for k, row in zip(order, trials):
            if row is None:
                break
            if k != returned:
                added[k] = row.nll - chosen[0]
        return state["best"] is not before

    if progress is not None:
        progress("verify", 0.0, "0 sets scored" if unit_budget is not None else f"0 of at most {budget} sets scored")
    score_stage(list(cands), "candidate", lambda done: incumbent())
    if state["best"] is None:
        raise MiPrunError("the verified search scored no set of the right size. Fix: give a budget of at least 1.")
    while problem.n < len(problem.allowed):
        if spent():
            state["ran_out"] = True
            break
        if not exchange() and (state.get("final") or not swaps()):
            break
    ran_out = bool(state.get("ran_out") or state.get("final"))
    return SearchOutcome(state["best"], scored, state["passes"], stages,
                         units=None if race is None else race.units, race=None if race is None else race.record(),
                         stopped="budget" if ran_out else "converged")


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
    # a task's choice NLL is no mean over samples: it cannot race (task_scorer), and keeps its batch size
    racing = config.verify_race != "off" and not (config.verify_on is not None and tokens is None
                                                  and is_task_spec(config.verify_on))
    # model_scorer, or the text / task of config.verify_on (task_scorer); a raced search scores
    # groups of verify_race_group samples, one batch each
    scorer = verification_scorer(model, analysis, config, n_blocks=problem.n_blocks, starts=problem.allowed,
                                 tokenizer=tokenizer, tokens=tokens, cache=cache, force=force,
                                 batch_size=min(batch_size, config.verify_race_group) if racing else batch_size)
    cache, tok_prov = scorer.cache, scorer.provenance
    _, _, span_norm = check_analysis(analysis)
    cands = propose(problem, span_norm, one.removed, config.method)
    budget = config.verify_budget(problem.n, len(problem.allowed))
    race = Race(scorer, RaceRule(config.verify_race_alpha, config.RACE_MIN_SAMPLES, config.RACE_LOOKS,
                                   config.RACE_ORDER)) \
        if racing and can_race(scorer) else None
    unit_budget = None
    if race is not None and config.verify_race == "units":  # budget x the mean full pass of the candidates
        unit_budget = max(1, round(budget * sum(race.full_cost(c.removed) for c in cands) / len(cands)))
    out = verified_search(problem, cands, None if race is not None else scorer.score, budget, progress,
                          race=race, unit_budget=unit_budget)
    best, scored, passes = out.best, out.scored, out.passes
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
                    # a lazy prefix: draw B's dense blocks run once, only as deep as the finalists' first
                    # removed blocks (no dense pass to the end, no dense NLL), and finalists that remove the
                    # same blocks so far share their runs
                    fresh["b"] = PrefixScorer(scorer.model, ids_b, None, batch_size, problem.allowed, cache.fresh,
                                              dense=False)
                return fresh["b"].score(removed)

            try:  # a set the race dropped is many standard errors behind: never a finalist
                best, confirmed = confirm(problem.n, [r for r in scored if r.complete], score_b,
                                          config.verify_confirm, samples_a=scorer.sample_nll, z=config.CONFIRM_Z)
                passes += confirmed["passes"]
            except FreshDrawError as e:  # the search's answer stands, and the record says why
                log.warning("verified search not confirmed: %s", e)
                confirmed = {"note": f"not confirmed: {e}"}
    if progress is not None:
        progress("verify", 1.0, f"{len(scored)} sets scored, {passes} new passes")
    one_row = next((r for r in scored if r.removed == one.removed), None)
    one_nll = None if one_row is None else one_row.nll
    dense_nll = cache.prefix["dense_nll"] if cache.prefix is not None else None
    gap = None if one_nll is None else one_nll - best.nll
    winner = best.removed
    result = make_selection(
        config.method, problem.n, problem.n_blocks, winner, set_cost(winner, problem.C), config.run_cost,
        time.perf_counter() - t0, forward_passes=passes, span_lookups=one.span_lookups, ratio=one.ratio,
        trajectory=one.trajectory, options={**one.options, "verify_passes": config.verify_passes,
                                           "verify_samples": config.verify_samples,
                                           "verify_seq_len": config.verify_seq_len,
                                           **({"verify_race": config.verify_race,
                                               "verify_race_alpha": config.verify_race_alpha,
                                               "verify_race_group": config.verify_race_group} if race else {}),
                                           **({"verify_on": config.verify_on} if config.verify_on else {})},
        provenance=one.provenance)
    log.info("verified %s: removed %s (NLL %.4f, proposed by %s) after %d of %d sets (%d new passes); "
             "one-pass %s NLL %s", config.method, list(winner), best.nll, best.proposers[0], len(scored),
             budget, passes, list(one.removed), one_nll)
    return replace(result, verified=True, nll=best.nll, candidates=scored,
                   winner_source=best.proposers[0], one_pass_removed=one.removed, one_pass_nll=one_nll,
                   verification={
                       "budget": budget, "budget_rule": config.verify_passes, "passes": passes,
                       "sets_scored": len(scored), "sets_by_stage": out.sets_by_stage, "stopped": out.stopped,
                       "dense_passes": scorer.dense_passes,
                       "candidates_proposed": len(cands), "dense_nll": dense_nll,
                       "one_pass_gap_nats": gap, "one_pass_ppl_ratio": None if gap is None else math.exp(gap),
                       # when the race dropped the one-pass answer, the samples its NLL rests on (it is
                       # then the paired estimate of its full NLL, `race.Outcome.nll`); None: scored in full
                       "one_pass_dropped_after": None if one_row is None or one_row.complete else one_row.samples,
                       "tokens": tok_prov, "note": PASS_NOTE, "offload": weight_source(scorer.model).describe()["streamed"],
                       "peak_memory": peak_memory(),
                       **({"race": {**out.race, "mode": config.verify_race, "unit_budget": unit_budget}}
                          if out.race is not None else {"race": {"mode": "off" if config.verify_race == "off" else
                                                                 "off (the scorer cannot race)"}}),
                       **({"task": scorer.report(winner, one.removed if one_nll is not None else None)}
                          if isinstance(scorer, TaskScorer) else {}),
                       **({"confirm": confirmed} if confirmed is not None else {})})


def one_pass_estimate(verification: dict[str, Any] | None) -> str:
    """"" when the one-pass answer's NLL is measured on every verification sample; else what it is (the
    race dropped it early: a paired estimate on its first samples)."""
    v = verification or {}
    after = v.get("one_pass_dropped_after")
    if not after:
        return ""
    total = ((v.get("tokens") or {}).get("n_samples")) or "all"
    return (f" (estimated on {after} of {total} verification samples: the race dropped it as clearly worse than "
            "a complete set)")


def stop_note(verification: dict[str, Any] | None) -> str | None:
    """Whether a verified search stopped at its budget before it converged, in a sentence (None when it
    converged): then a longer search might find a better set (a larger budget; in the budget of sets,
    racing in units, which spends what the race saves on more exchanges and swaps)."""
    v = verification or {}
    if v.get("stopped") != "budget":
        return None
    return (f"The search stopped at its budget ({v.get('budget')} passes) before it converged: a longer search "
            "may find a better set.")


__all__ = ["NLLCache", "PASS_NOTE", "PrefixScorer", "SearchOutcome", "one_pass_estimate", "resolve_tokens", "stop_note",
           "tokens_key", "verified_search", "verified_select"]  # the scorer's names stay importable from here
