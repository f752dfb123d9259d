"""Selectors that optimise the MI objective (the sum of run costs of a removed set).

- "exact": dynamic programme over run boundaries, O(L^2 n), optimal for any additive run cost.
- "exhaustive": enumerates every set of n removable blocks (verification for small L).
- "local": best-improvement swap search started from top-k.
- "fbs": Fast-Block-Select (MI-PRUN), with its trajectory.

`best_combination` is the dynamic programme that "exact" runs over every run and "fbs" over the
windows it measured.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from mi_prun.errors import MiPrunError
from mi_prun.results import rank_blocks
from mi_prun.select.costs import SpanOracle, improves, runs_of
from mi_prun.select.registry import Problem, SelectorOutput, register_selector

log = logging.getLogger(__name__)


def best_combination(n_blocks: int, n: int,
                     windows: Mapping[int, Sequence[tuple[int, float]]]) -> tuple[float, list[tuple[int, int]]]:
    """Cheapest set of non-overlapping, non-adjacent windows covering exactly n blocks.

    `windows[start]` lists (end_exclusive, cost). Dynamic programme over g[p][r]: least cost with
    blocks 0..p-1 decided, block p free to start a run (p = 0 or block p-1 kept), r removed.
    A run ending at e < L forces block e to be kept, so the next free position is e + 1: this is
    what keeps two runs from touching (touching runs would be one run with another cost).
    Cost O(n x number of windows). Ties keep the first path found (deterministic).
    Returns (inf, []) when no combination exists.
    """
    L = n_blocks
    INF = math.inf
    g = [[INF] * (n + 1) for _ in range(L + 2)]
    back: list[list[tuple[int, int, int] | None]] = [[None] * (n + 1) for _ in range(L + 2)]
    g[0][0] = 0.0
    final = [INF] * (n + 1)
    final_back: list[tuple[int, int, int] | None] = [None] * (n + 1)
    for p in range(L):
        row = g[p]
        for r in range(n + 1):
            base = row[r]
            if base == INF:
                continue
            # keep block p
            if base < g[p + 1][r]:
                g[p + 1][r] = base
                back[p + 1][r] = (p, r, -1)
            for end, cost in windows.get(p, ()):
                rr = r + (end - p)
                if rr > n or cost == INF:
                    continue
                val = base + cost
                if end >= L:
                    if val < final[rr]:
                        final[rr], final_back[rr] = val, (p, r, end)
                elif val < g[end + 1][rr]:
                    g[end + 1][rr] = val
                    back[end + 1][rr] = (p, r, end)
    # g[L][n]: the last block kept; final[n]: the last run reaches block L-1.
    if g[L][n] <= final[n]:
        best, step = g[L][n], back[L][n]
    else:
        best, step = final[n], final_back[n]
    if best == INF:
        return INF, []
    runs: list[tuple[int, int]] = []
    while step is not None:
        p, r, end = step
        if end >= 0:
            runs.append((p, end))
        step = back[p][r]
    runs.reverse()
    return best, runs

@register_selector("exact", description="optimal removed set for the run cost: dynamic programme "
                                        "over run boundaries, O(L^2 n)")
def _select_exact(p: Problem) -> SelectorOutput:
    allowed = set(p.allowed)
    windows: dict[int, list[tuple[int, float]]] = {}
    for i in range(p.n_blocks):
        if i not in allowed:
            continue
        ends = []
        for j in range(i + 1, min(i + p.n, p.n_blocks) + 1):
            if (j - 1) not in allowed:
                break  # a run cannot cross a protected block
            ends.append((j, float(p.C[i, j])))
        windows[i] = ends
    cost, runs = best_combination(p.n_blocks, p.n, windows)
    if not runs:
        raise MiPrunError(f"no set of {p.n} blocks has a finite cost: the span matrix has too many "
                          "missing entries. Fix: recompute the analysis.")
    removed = tuple(b for s, e in runs for b in range(s, e))
    return SelectorOutput(removed, span_lookups=sum(len(v) for v in windows.values()))


@register_selector("exhaustive", defaults={"max_combinations": 2_000_000, "chunk": 65_536},
                   description="enumerate every set of n blocks (verification for small L)")
def _select_exhaustive(p: Problem, max_combinations: int, chunk: int) -> SelectorOutput:
    count = math.comb(len(p.allowed), p.n)
    if count > max_combinations:
        raise MiPrunError(f"exhaustive search over C({len(p.allowed)}, {p.n}) = {count:,} combinations "
                          f"exceeds the limit of {max_combinations:,}. Fix: use method='exact' (same "
                          "optimum, O(L^2 n)), or raise max_combinations.")
    C = p.C
    combos = itertools.combinations(p.allowed, p.n)
    best, best_set = math.inf, None
    n = p.n
    chunk = max(1, int(chunk))
    while True:
        # Vectorised over a chunk of combinations (rows): a run starts where a block does not
        # follow its predecessor and ends where the next does not follow it; starts and ends pair
        # up in row-major order, so each run's cost goes to its row by bincount.
        flat = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, chunk)), dtype=np.int64)
        if flat.size == 0:
            break
        X = flat.reshape(-1, n)
        brk = X[:, 1:] != X[:, :-1] + 1
        ones = np.ones((X.shape[0], 1), dtype=bool)
        starts = np.concatenate([ones, brk], axis=1)
        ends = np.concatenate([brk, ones], axis=1)
        costs = C[X[starts], X[ends] + 1]
        rows = np.nonzero(starts)[0]
        totals = np.bincount(rows, weights=costs, minlength=X.shape[0])
        k = int(np.argmin(totals))  # first minimum: ties go to the lexicographically first set
        if totals[k] < best:
            best, best_set = float(totals[k]), tuple(int(b) for b in X[k])
    if best_set is None:
        raise MiPrunError(f"no set of {p.n} blocks has a finite cost: the span matrix has too many "
                          "missing entries. Fix: recompute the analysis.")
    return SelectorOutput(best_set, span_lookups=int(np.isfinite(C).sum()),
                          trajectory=[{"combinations": count}])


@register_selector("local", defaults={"max_iter": 1000},
                   description="local search from top-k: best improving swap of a removed and a "
                               "kept block until none improves")
def _select_local(p: Problem, max_iter: int) -> SelectorOutput:
    oracle = SpanOracle(p.C)
    t0 = time.perf_counter()
    current = rank_blocks(p.block_mi, among=p.allowed)[: p.n]
    obj = oracle.set_cost(current)
    traj = [{"iteration": 0, "removed": sorted(current), "swap": None, "objective": obj,
             "elapsed": time.perf_counter() - t0}]
    for it in range(1, int(max_iter) + 1):
        cur_set = set(current)
        kept = [b for b in p.allowed if b not in cur_set]
        best_obj, best_swap = obj, None
        for out in sorted(current):
            rest = cur_set - {out}
            for inn in kept:
                val = oracle.set_cost(rest | {inn})
                # Strict with a tolerance: float noise must not count as an improvement (cycles).
                if improves(val, best_obj):
                    best_obj, best_swap = val, (out, inn)
        if best_swap is None:
            break
        current = sorted((cur_set - {best_swap[0]}) | {best_swap[1]})
        obj = best_obj
        traj.append({"iteration": it, "removed": list(current), "swap": list(best_swap),
                     "objective": obj, "elapsed": time.perf_counter() - t0})
    return SelectorOutput(tuple(current), trajectory=traj, span_lookups=oracle.lookups)


@register_selector("fbs", defaults={"pool": None, "k": 8, "max_iter": 20},
                   description="Fast-Block-Select (MI-PRUN): refine a prune pool by measuring the "
                               "span MI of the coarsely best contiguous candidates")
def _select_fbs(p: Problem, pool: int | None, k: int, max_iter: int) -> SelectorOutput:
    """Fast-Block-Select, as this project reads Algorithm 1 of the MI-PRUN paper (Zhang et al.,
    arXiv 2601.07212; the paper publishes no code).

    P (prune pool, the current choice) starts as the n most redundant blocks; A (alternative pool)
    holds the next `pool` blocks of the redundancy ranking (default n). Each iteration builds every
    contiguous window of length 1..n inside P u A, ranks the windows of each length by the sum of
    their single-block scores -MI_b (coarse), measures the real run cost of the top `k` per length
    and of P's own runs, and picks the cheapest combination of measured windows covering exactly n
    blocks with at least one kept block between windows (so windows are exactly the final runs).
    P's runs are always candidates, hence the new P is never worse; it is accepted only if strictly
    better, which also guarantees termination. A is then recomputed from the new P.
    """
    n, L = p.n, p.n_blocks
    pool = n if pool is None else int(pool)
    k = int(k)
    if pool < 0 or k < 1 or int(max_iter) < 0:
        raise MiPrunError(f"fbs options must satisfy pool >= 0, k >= 1, max_iter >= 0; got "
                          f"pool={pool}, k={k}, max_iter={max_iter}.")
    score = -np.asarray(p.block_mi, dtype=np.float64)  # importance; low = redundant
    ranking = rank_blocks(score, descending=False, among=p.allowed)
    # NaN scores rank last for the pools; in coarse sums they count as +inf (least attractive).
    coarse_score = np.where(np.isnan(score), np.inf, score)
    oracle = SpanOracle(p.C)
    t0 = time.perf_counter()

    def alt_pool(P: frozenset[int]) -> list[int]:
        return [b for b in ranking if b not in P][:pool]

    def record(P: frozenset[int], runs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        return [{"start": s, "end": e, "coarse": float(coarse_score[s:e].sum()),
                 "span_mi": float(p.span[s, e]), "cost": oracle.cost(s, e), "source": "P",
                 "chosen": True} for s, e in runs]

    P = frozenset(ranking[:n])
    obj = oracle.set_cost(P)
    A = alt_pool(P)
    traj: list[dict[str, Any]] = [{
        "iteration": 0, "P": sorted(P), "A": sorted(A), "candidates": record(P, runs_of(P)),
        "objective": obj, "changed": True, "elapsed": time.perf_counter() - t0,
        "span_lookups": oracle.lookups}]
    for it in range(1, int(max_iter) + 1):
        union = P | set(A)
        measured: dict[tuple[int, int], dict[str, Any]] = {}
        for m in range(1, n + 1):
            wins = [(float(coarse_score[s:s + m].sum()), s) for s in range(L - m + 1)
                    if all(b in union for b in range(s, s + m))]
            wins.sort()  # by coarse score, then start: deterministic
            for coarse, s in wins[:k]:
                measured[(s, s + m)] = {"start": s, "end": s + m, "coarse": coarse,
                                        "span_mi": float(p.span[s, s + m]),
                                        "cost": oracle.cost(s, s + m), "source": "window"}
        for s, e in runs_of(P):  # always measurable: P's objective is known
            measured.setdefault((s, e), {"start": s, "end": e,
                                         "coarse": float(coarse_score[s:e].sum()),
                                         "span_mi": float(p.span[s, e]), "cost": oracle.cost(s, e),
                                         "source": "P"})
        windows: dict[int, list[tuple[int, float]]] = {}
        for (s, e) in sorted(measured):
            windows.setdefault(s, []).append((e, measured[(s, e)]["cost"]))
        new_obj, runs = best_combination(L, n, windows)
        Q = frozenset(b for s, e in runs for b in range(s, e))
        chosen = set(runs)
        cands = [dict(c, chosen=(key in chosen)) for key, c in sorted(measured.items())]
        improved = bool(runs) and Q != P and improves(new_obj, obj)
        if improved:
            P, obj = Q, oracle.set_cost(Q)
            A = alt_pool(P)
        traj.append({"iteration": it, "P": sorted(P), "A": sorted(A), "candidates": cands,
                     "objective": obj, "changed": improved, "elapsed": time.perf_counter() - t0,
                     "span_lookups": oracle.lookups})
        log.debug("fbs iteration %d: P=%s objective=%.6g changed=%s", it, sorted(P), obj, improved)
        if not improved:
            break
    return SelectorOutput(tuple(sorted(P)), trajectory=traj, span_lookups=oracle.lookups)
