"""Candidate removed sets for the verified search, all from one analysis (no forward pass).

Every one-pass criterion proposes sets: Fast-Block-Select's answer and the prune pools it visited,
the k best sets under each run cost (`k_best_combinations`, the exact dynamic programme extended to
its k best solutions), MI top-k with and without protected ends, ShortGPT's set and the best few
angular windows. `propose` merges them into distinct `Candidate`s, each with every criterion that
proposed it, in the order the verified search scores them. `neighbours` lists the swap moves of
local refinement, `exchange_order` the blocks an exchange tries (measured ones by their measurement)
and `guided_order` the blocks a step of the MI-guided greedy tries (both: MI's and BI's redundancy
rankings interleaved).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from mi_prun.errors import MiPrunError
from mi_prun.results import rank_blocks
from mi_prun.select.costs import RUN_COSTS, cost_matrix, set_cost
from mi_prun.select.registry import Problem, SELECTORS


@dataclass
class Candidate:
    """A removed set (sorted), who proposed it (first = the one that counts) and its MI objective."""

    removed: tuple[int, ...]
    proposers: list[str] = field(default_factory=list)
    objective: float = math.nan


def k_best_combinations(n_blocks: int, n: int, windows: Mapping[int, Sequence[tuple[int, float]]],
                        k: int) -> list[tuple[float, list[tuple[int, int]]]]:
    """The k cheapest distinct sets of non-overlapping, non-adjacent windows covering n blocks.

    The dynamic programme of `search.best_combination` with a sorted list of up to k (cost, runs)
    per state g[p][r] instead of one value: every transition goes forward (p -> p+1 or end+1), so
    g[p] is final when p is reached. Cost O(k log k x n x number of windows). Ties keep the first
    path found. Returns [(cost, runs)] cheapest first (fewer than k when fewer sets exist).
    """
    L, k = n_blocks, max(1, int(k))
    g: list[list[list[tuple[float, tuple[tuple[int, int], ...]]]]] = [[[] for _ in range(n + 1)]
                                                                     for _ in range(L + 2)]
    final: list[tuple[float, tuple[tuple[int, int], ...]]] = []

    def push(lst: list, cost: float, runs: tuple[tuple[int, int], ...]) -> None:
        if len(lst) == k and cost >= lst[-1][0]:
            return
        bisect.insort(lst, (cost, runs), key=lambda item: item[0])
        del lst[k:]

    g[0][0].append((0.0, ()))
    for p in range(L):
        for r in range(n + 1):
            for base, runs in g[p][r]:
                push(g[p + 1][r], base, runs)  # keep block p
                for end, cost in windows.get(p, ()):
                    rr = r + (end - p)
                    if rr > n or not math.isfinite(cost):
                        continue
                    target = final if end >= L else g[end + 1][rr]
                    if end >= L and rr != n:
                        continue
                    push(target, base + cost, runs + ((p, end),))
    merged: list[tuple[float, tuple[tuple[int, int], ...]]] = []
    for cost, runs in g[L][n] + final:
        push(merged, cost, runs)
    return [(cost, list(runs)) for cost, runs in merged]


def all_windows(problem: Problem, C: np.ndarray) -> dict[int, list[tuple[int, float]]]:
    """Every run of at most n removable blocks, as `windows[start] = [(end, cost)]`."""
    allowed = set(problem.allowed)
    windows: dict[int, list[tuple[int, float]]] = {}
    for i in problem.allowed:
        ends = []
        for j in range(i + 1, min(i + problem.n, problem.n_blocks) + 1):
            if (j - 1) not in allowed:
                break
            ends.append((j, float(C[i, j])))
        windows[i] = ends
    return windows


def _run(problem: Problem, name: str) -> tuple[tuple[int, ...], list]:
    sel = SELECTORS[name]
    assert sel.fn is not None
    out = sel.fn(problem, **dict(sel.defaults))
    return tuple(sorted(out.removed)), out.trajectory


def proposals(problem: Problem, span_norm: np.ndarray | None, k_best: int = 4,
              n_angular: int = 3) -> list[tuple[str, tuple[int, ...]]]:
    """(proposer, removed) pairs of every one-pass criterion; a criterion whose data the analysis
    lacks (a baseline, normalised MI) proposes nothing."""
    out: list[tuple[str, tuple[int, ...]]] = []
    fbs, traj = _run(problem, "fbs")
    out.append(("fbs", fbs))
    for step in traj[1:]:
        out.append((f"fbs-pool@{step['iteration']}", tuple(sorted(step["P"]))))
    for cost_name in RUN_COSTS:
        try:
            C = cost_matrix(problem.span, span_norm, cost_name)
        except MiPrunError:
            continue  # needs normalised MI that this estimator lacks
        for rank, (_, runs) in enumerate(k_best_combinations(problem.n_blocks, problem.n,
                                                             all_windows(problem, C), k_best)):
            out.append((f"exact:{cost_name}#{rank + 1}", tuple(b for s, e in runs for b in range(s, e))))
    everywhere = replace(problem, allowed=tuple(range(problem.n_blocks)))
    out.append(("topk", _run(problem, "topk")[0]))
    out.append(("topk-unprotected", _run(everywhere, "topk")[0]))
    if "cosine_bi" in problem.baselines:
        out.append(("shortgpt", _run(problem, "shortgpt")[0]))
    if "angular" in problem.baselines:
        ang = np.asarray(problem.baselines["angular"], dtype=np.float64)
        allowed = set(problem.allowed)
        starts = [s for s in range(problem.n_blocks - problem.n + 1)
                  if all(b in allowed for b in range(s, s + problem.n)) and np.isfinite(ang[s, s + problem.n])]
        starts.sort(key=lambda s: (float(ang[s, s + problem.n]), s))
        for rank, s in enumerate(starts[:n_angular]):
            out.append((f"angular#{rank + 1}", tuple(range(s, s + problem.n))))
    return out


def propose(problem: Problem, span_norm: np.ndarray | None, one_pass: tuple[int, ...], one_pass_method: str,
            k_best: int = 4, n_angular: int = 3, respect_protection: bool = True) -> list[Candidate]:
    """Distinct candidates in scoring order: the one-pass answer; then the first set of each
    criterion (FBS, each run cost's optimum, top-k, ShortGPT, angular), by MI objective; then the
    rest by MI objective. Seeding each criterion first keeps a small budget from being spent on
    near-duplicates of MI's answer before the sets that catch MI's failures are checked.

    `respect_protection` drops sets that remove a protected block (the unprotected top-k among
    them), so that `protect_ends` holds for the verified answer as for every other one."""
    found: dict[tuple[int, ...], Candidate] = {}
    order: list[tuple[int, ...]] = []
    allowed = set(problem.allowed)

    def add(name: str, removed: Iterable[int]) -> None:
        key = tuple(sorted(int(b) for b in removed))
        if len(key) != problem.n or (respect_protection and not allowed.issuperset(key)):
            return
        if key not in found:
            found[key] = Candidate(key, [], set_cost(key, problem.C))
            order.append(key)
        if name not in found[key].proposers:
            found[key].proposers.append(name)

    add(one_pass_method, one_pass)
    props = proposals(problem, span_norm, k_best, n_angular)
    families_seen: set[str] = set()
    seeds: list[tuple[int, ...]] = []
    for name, removed in props:
        family = name.split("#")[0].split("@")[0]
        add(name, removed)
        if tuple(sorted(removed)) in found and family not in families_seen and family != "fbs-pool":
            families_seen.add(family)
            seeds.append(tuple(sorted(removed)))
    first = order[0]
    rank = {key: i for i, key in enumerate(order)}  # ties in objective: proposal order
    by_obj = lambda key: (not math.isfinite(found[key].objective), found[key].objective, rank[key])  # noqa: E731
    seed_keys = sorted({k for k in seeds if k != first}, key=by_obj)
    rest = sorted((k for k in order if k != first and k not in set(seed_keys)), key=by_obj)
    return [found[k] for k in [first, *seed_keys, *rest]]


def neighbours(removed: Sequence[int], problem: Problem) -> list[tuple[int, ...]]:
    """Sets one swap away from `removed`: a removed block traded for an adjacent kept block or for
    the most redundant (by MI) kept block, within the removable blocks; ordered by MI objective."""
    cur = set(removed)
    allowed = set(problem.allowed)
    ranking = [b for b in rank_blocks(problem.block_mi, among=problem.allowed) if b not in cur]
    nxt = ranking[0] if ranking else None
    out: dict[tuple[int, ...], float] = {}
    for b in sorted(cur):
        for new in (b - 1, b + 1, nxt):
            if new is None or new in cur or new not in allowed:
                continue
            key = tuple(sorted((cur - {b}) | {new}))
            out.setdefault(key, set_cost(key, problem.C))
    return sorted(out, key=lambda k: (not math.isfinite(out[k]), out[k], k))


def guided_order(remaining: Sequence[int], block_mi: np.ndarray, bi: np.ndarray | None, c: int) -> list[int]:
    """The c blocks a step tries: MI's and BI's redundancy rankings interleaved, duplicates dropped."""
    by_mi = rank_blocks(block_mi, among=remaining)
    by_bi = rank_blocks(np.asarray(bi, dtype=np.float64), descending=False, among=remaining) if bi is not None else []
    out: list[int] = []
    for pair in zip(by_mi, by_bi) if bi is not None else ((b,) for b in by_mi):
        for b in pair:
            if b not in out:
                out.append(b)
    out += [b for b in by_mi if b not in out]
    return out[:c]


def exchange_order(base: Sequence[int], returned: int, problem: Problem,
                   measured: Mapping[int, float] | None = None) -> list[int]:
    """The blocks an exchange tries beside `base` (the removed set less the block `returned`): every
    other removable block, `returned` last (trying it again re-measures the set the exchange
    started from).

    Without `measured`, MI's and BI's redundancy rankings interleaved (`guided_order`). `measured`
    maps blocks to what adding them cost in earlier exchanges (NLL of base + block minus the base's
    NLL): a measurement beats a proxy, so the better half of the measured blocks goes first, best
    first, then the blocks never measured in MI/BI order, then the worse half of the measured ones.
    """
    skip = set(base) | {returned}
    kept = [b for b in problem.allowed if b not in skip]
    order = guided_order(kept, problem.block_mi, problem.baselines.get("cosine_bi"), len(kept))
    known = sorted((b for b in order if measured and b in measured and not math.isnan(measured[b])),
                   key=lambda b: (measured[b], b))  # type: ignore[index]
    if known:
        half, measured_set = (len(known) + 1) // 2, set(known)
        order = known[:half] + [b for b in order if b not in measured_set] + known[half:]
    return order + [returned]


def nan_last(nll: float) -> tuple[bool, float]:
    """Sort key of an NLL: lowest first, NaN (a broken pass) after every number."""
    return (math.isnan(nll), 0.0 if math.isnan(nll) else nll)
