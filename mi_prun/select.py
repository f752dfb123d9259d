"""Choose which blocks to remove: MI-based selectors, baselines and an exact optimum.

Blocks are numbered from 0. Removing the maximal contiguous run of blocks i..j-1 means h_i feeds
block j directly; the run is judged by its own span entry M[i, j] = I(h_i; h_j) through a *run cost*
(lower = better). The objective of a removed set is the sum of the costs of its maximal runs, so two
runs must be separated by at least one kept block (adjacent runs are one run, judged by one span).

Pieces, each usable on its own:

- `resolve_n` turns `n` or `ratio` into a validated block count.
- `RUN_COSTS` maps a run-cost name to a vectorised function of (span, span_norm, i, j);
  `cost_matrix` evaluates it once per problem into C[i, j] (i < j); `runs_of` and `set_cost` give
  the runs of a removed set and its objective.
- `SELECTORS` (registry; `register_selector`) and `select(analysis, method, ...)` -> `Selection`:
  "topk", "fbs" (Fast-Block-Select, with trajectory), "local", "exact" (dynamic programme,
  O(L^2 n), optimal for any additive run cost), "exhaustive", and the baselines "shortgpt",
  "angular", "random". Every `Selection` reports its MI objective under the chosen run cost, so all
  methods are comparable; `compare` tabulates their gap to the exact optimum.
- "sleb" needs a model and calibration tokens: `sleb_search` (the search, given any NLL oracle) and
  `sleb_select` (runs the model with blocks skipped).

`forward_passes` counts full passes over the calibration set (0 for score-based methods);
`span_lookups` counts distinct span entries a method read (what a lazy span oracle would have had
to estimate).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

# The library-wide progress protocol (as in mi_prun.capture): (stage, fraction in [0, 1], message).
Progress = Callable[[str, float, str], None]
RunCostFn = Callable[[np.ndarray, "np.ndarray | None", Any, Any], Any]

# Relative tolerance under which two objectives count as equal (float noise, not improvement).
_TOL = 1e-12


def _improves(new: float, old: float) -> bool:
    """new is better than old by more than float noise (any finite value beats +inf)."""
    if not math.isfinite(old):
        return new < old
    return new < old - _TOL * max(1.0, abs(old))


# ==============================================================================================
# block counts


def resolve_n(n_blocks: int, n: int | None = None, ratio: float | None = None,
              protect_ends: bool | int | float = False) -> int:
    """The number of blocks to remove: `n`, or round(ratio * n_blocks) (halves round up).

    Raises `MiPrunError` (saying how to fix it) when neither or both are given, ratio is outside
    (0, 1), the count is <= 0 or >= n_blocks (never remove every block), or exceeds the removable
    blocks when the ends are protected (see `n_protected`).
    """
    L = int(n_blocks)
    if L < 1:
        raise MiPrunError(f"the model has {L} blocks; nothing can be removed.")
    if (n is None) == (ratio is None):
        raise MiPrunError("give exactly one of n (number of blocks to remove) and ratio "
                          f"(fraction of the {L} blocks); got n={n!r}, ratio={ratio!r}.")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
            raise MiPrunError(f"ratio must be a number in (0, 1); got {ratio!r}.")
        r = float(ratio)
        if not (0.0 < r < 1.0):
            raise MiPrunError(f"ratio must lie strictly between 0 and 1; got {ratio!r}. "
                              f"Fix: e.g. ratio=0.25 removes {math.floor(0.25 * L + 0.5)} of {L} blocks.")
        # Round half up (Python's round() rounds 2.5 to 2); the epsilon absorbs 0.1 * 30 = 3.0000...4.
        count = math.floor(r * L + 0.5 + 1e-9)
        if count <= 0:
            raise MiPrunError(f"ratio {r} of {L} blocks rounds to 0 blocks. "
                              f"Fix: use ratio >= {1 / (2 * L):.3g} or give n.")
        source = f"ratio {r} (round({r} x {L}) = {count})"
    else:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise MiPrunError(f"n must be a whole number of blocks; got {n!r}.")
        count = int(n)
        source = f"n={count}"
        if count <= 0:
            raise MiPrunError(f"{source}: the number of blocks to remove must be at least 1.")
    if count >= L:
        raise MiPrunError(f"{source} would remove all {L} blocks (blocks are numbered 0..{L - 1}). "
                          f"Fix: remove at most {L - 1}.")
    k = n_protected(L, protect_ends)
    removable = max(L - 2 * k, 0) if k else L - 1
    if k and count > removable:
        raise MiPrunError(f"{source} exceeds the {removable} removable blocks when the first and last {k} "
                          f"block(s) are protected. Fix: remove at most {removable}, or protect fewer.")
    return count


def n_protected(n_blocks: int, protect_ends: bool | int | float) -> int:
    """Blocks protected at each end: False/0 none, True 1, an int k, or a fraction in (0, 0.5) of L
    (rounded, at least 1) — the first and last blocks of most LLMs do work the middle ones do not."""
    if isinstance(protect_ends, bool):
        return int(protect_ends)
    if isinstance(protect_ends, (int, np.integer)):
        k = int(protect_ends)
    elif isinstance(protect_ends, (float, np.floating)) and 0.0 < float(protect_ends) < 0.5:
        k = max(1, math.floor(float(protect_ends) * n_blocks + 0.5))
    else:
        raise MiPrunError(f"protect_ends must be a bool, a block count or a fraction in (0, 0.5); "
                          f"got {protect_ends!r}.")
    if k < 0 or 2 * k >= n_blocks:
        raise MiPrunError(f"cannot protect {k} block(s) at each end of a {n_blocks}-block model. "
                          f"Fix: protect at most {(n_blocks - 1) // 2}.")
    return k


def _allowed_blocks(n_blocks: int, protect_ends: bool | int | float) -> list[int]:
    k = n_protected(n_blocks, protect_ends)
    return [b for b in range(n_blocks) if k <= b < n_blocks - k]


# ==============================================================================================
# runs and run costs


def runs_of(removed: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs of a removed set as (start, end_exclusive), in order.

    >>> runs_of([5, 1, 2, 7, 6])
    [(1, 3), (5, 8)]
    """
    blocks = sorted({int(b) for b in removed})
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def set_cost(removed: Iterable[int], cost_matrix: np.ndarray) -> float:
    """Objective of a removed set: the sum of C[start, end] over its maximal runs (0 if empty)."""
    total = 0.0
    for start, end in runs_of(removed):
        total += float(cost_matrix[start, end])
    return total


def _finite_offdiag(span: np.ndarray) -> np.ndarray:
    mask = ~np.eye(span.shape[0], dtype=bool) & np.isfinite(span)
    return span[mask]


def _mi_scale(span: np.ndarray) -> float:
    """Largest finite off-diagonal |M|; 1 when there is none (so the scale never divides by 0)."""
    vals = np.abs(_finite_offdiag(span))
    scale = float(vals.max()) if vals.size else 0.0
    return scale if scale > 0 else 1.0


def _need_norm(span_norm: np.ndarray | None, name: str) -> np.ndarray:
    if span_norm is None:
        raise MiPrunError(f"run cost {name!r} needs normalised MI (analysis.span_norm), which this "
                          "estimator does not provide. Fix: use run_cost='neg-mi', or an estimator "
                          "that defines normalised MI.")
    return span_norm


def _cost_neg_mi(span: np.ndarray, span_norm: np.ndarray | None, i: Any, j: Any) -> Any:
    # Divided by the largest MI so that costs of runs (and objectives of estimators with different
    # units) live on one scale; the ranking of sets does not change.
    return -span[i, j] / _mi_scale(span)


def _cost_info_loss(span: np.ndarray, span_norm: np.ndarray | None, i: Any, j: Any) -> Any:
    return 1.0 - _need_norm(span_norm, "info-loss")[i, j]


def _cost_neg_log_nmi(span: np.ndarray, span_norm: np.ndarray | None, i: Any, j: Any) -> Any:
    # Clipped so that NMI = 0 costs a large finite amount instead of inf (it stays comparable).
    nmi = np.clip(_need_norm(span_norm, "neg-log-nmi")[i, j], 1e-12, None)
    return -np.log(nmi)


# name -> cost(span, span_norm, i, j). i and j may be integer arrays (numpy indexing): functions
# must be vectorised so that `cost_matrix` evaluates a whole problem in one call.
RUN_COSTS: dict[str, RunCostFn] = {
    "neg-mi": _cost_neg_mi,
    "info-loss": _cost_info_loss,
    "neg-log-nmi": _cost_neg_log_nmi,
}


def register_run_cost(name: str, fn: RunCostFn) -> None:
    """Add a run cost; refuses a name that is taken."""
    if name in RUN_COSTS:
        raise MiPrunError(f"run cost {name!r} is already registered.")
    RUN_COSTS[name] = fn


def _run_cost_fn(name: str) -> RunCostFn:
    if name not in RUN_COSTS:
        raise MiPrunError(f"unknown run cost {name!r}: choose one of {', '.join(sorted(RUN_COSTS))}.")
    return RUN_COSTS[name]


def cost_matrix(span: np.ndarray, span_norm: np.ndarray | None = None,
                run_cost: str = "neg-mi") -> np.ndarray:
    """C[i, j] = cost of removing the run i..j-1, for 0 <= i < j <= L; +inf elsewhere.

    A non-finite cost (a missing or broken span estimate) becomes +inf, so no selector removes
    that run unless nothing else is feasible; a warning names how many entries were affected.
    """
    span = np.asarray(span, dtype=np.float64)
    if span.ndim != 2 or span.shape[0] != span.shape[1] or span.shape[0] < 2:
        raise MiPrunError(f"span matrix must be square (L+1, L+1) with L >= 1; got shape {span.shape}.")
    norm = None if span_norm is None else np.asarray(span_norm, dtype=np.float64)
    if norm is not None and norm.shape != span.shape:
        raise MiPrunError(f"span_norm has shape {norm.shape}, span {span.shape}; they must match.")
    fn = _run_cost_fn(run_cost)
    iu, ju = np.triu_indices(span.shape[0], k=1)
    values = np.asarray(fn(span, norm, iu, ju), dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        log.warning("%d of %d span entries give a non-finite %s cost; those runs are never chosen",
                    int(bad.sum()), values.size, run_cost)
        values = np.where(bad, np.inf, values)
    C = np.full(span.shape, np.inf)
    C[iu, ju] = values
    return C


class _SpanOracle:
    """Looks up run costs and counts distinct spans read: what a lazy estimator would measure."""

    def __init__(self, C: np.ndarray):
        self.C = C
        self.seen: set[tuple[int, int]] = set()

    def cost(self, i: int, j: int) -> float:
        self.seen.add((i, j))
        return float(self.C[i, j])

    def set_cost(self, removed: Iterable[int]) -> float:
        return sum((self.cost(s, e) for s, e in runs_of(removed)), 0.0)

    @property
    def lookups(self) -> int:
        return len(self.seen)


def _best_combination(n_blocks: int, n: int,
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


# ==============================================================================================
# the result


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy -> Python, tuples -> lists, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True)
class Selection:
    """Which blocks to remove, how they were chosen, and what it cost. Blocks numbered from 0.

    objective: sum of run costs of `removed` under `run_cost` (lower = better); NaN only where no
        span matrix was available (e.g. `sleb_select` without an analysis).
    forward_passes: full passes over the calibration set (0 for score-based methods).
    span_lookups: distinct span entries the method read.
    trajectory: method-specific steps (JSON-serialisable), e.g. FBS iterations or SLEB steps.
    """

    method: str
    n: int
    n_blocks: int
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    runs: list[tuple[int, int]]
    objective: float
    run_cost: str
    seconds: float
    forward_passes: int = 0
    span_lookups: int = 0
    ratio: float | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
        return _plain({
            "method": self.method, "n": self.n, "n_blocks": self.n_blocks,
            "removed": list(self.removed), "kept": list(self.kept),
            "runs": [list(r) for r in self.runs], "objective": self.objective,
            "run_cost": self.run_cost, "seconds": self.seconds,
            "forward_passes": self.forward_passes, "span_lookups": self.span_lookups,
            "ratio": self.ratio, "trajectory": self.trajectory, "options": self.options,
        })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """Inverse of `to_dict`."""
        try:
            objective = d["objective"]
            return cls(
                method=str(d["method"]), n=int(d["n"]), n_blocks=int(d["n_blocks"]),
                removed=tuple(int(b) for b in d["removed"]), kept=tuple(int(b) for b in d["kept"]),
                runs=[(int(s), int(e)) for s, e in d["runs"]],
                objective=math.nan if objective is None else float(objective),
                run_cost=str(d["run_cost"]), seconds=float(d["seconds"]),
                forward_passes=int(d.get("forward_passes", 0)),
                span_lookups=int(d.get("span_lookups", 0)),
                ratio=None if d.get("ratio") is None else float(d["ratio"]),
                trajectory=list(d.get("trajectory", [])), options=dict(d.get("options", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MiPrunError(f"not a saved selection ({type(exc).__name__}: {exc}).") from exc


def _make_selection(method: str, n: int, L: int, removed: Iterable[int], objective: float,
                    run_cost: str, seconds: float, *, forward_passes: int = 0, span_lookups: int = 0,
                    ratio: float | None = None, trajectory: list[dict[str, Any]] | None = None,
                    options: dict[str, Any] | None = None) -> Selection:
    rem = tuple(sorted(int(b) for b in removed))
    if len(set(rem)) != n or any(b < 0 or b >= L for b in rem):
        # A selector bug, not a user problem: fail loudly.
        raise AssertionError(f"{method} returned {rem}, expected {n} distinct blocks in 0..{L - 1}")
    gone = set(rem)
    kept = tuple(b for b in range(L) if b not in gone)
    return Selection(method=method, n=n, n_blocks=L, removed=rem, kept=kept, runs=runs_of(rem),
                     objective=float(objective), run_cost=run_cost, seconds=float(seconds),
                     forward_passes=int(forward_passes), span_lookups=int(span_lookups),
                     ratio=None if ratio is None else float(ratio),
                     trajectory=_plain(trajectory or []), options=_plain(options or {}))


# ==============================================================================================
# selector registry


@dataclass(frozen=True)
class Problem:
    """What a selector sees: scores, the cost matrix and the constraint, for one (analysis, cost)."""

    n_blocks: int
    n: int
    block_mi: np.ndarray  # (L,)
    span: np.ndarray  # (L+1, L+1)
    C: np.ndarray  # (L+1, L+1) run costs, +inf off the upper triangle
    allowed: tuple[int, ...]  # removable blocks (protect_ends drops 0 and L-1)
    baselines: Mapping[str, np.ndarray]
    seed: int


@dataclass
class SelectorOutput:
    """A selector's answer; `select` adds the objective, timing and bookkeeping."""

    removed: tuple[int, ...]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    span_lookups: int = 0


SelectorFn = Callable[..., SelectorOutput]


@dataclass(frozen=True)
class Selector:
    name: str
    fn: SelectorFn | None  # fn(problem, **options); None where a model is needed
    defaults: Mapping[str, Any]
    description: str
    needs_model: bool = False


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, defaults: Mapping[str, Any] | None = None, description: str = "",
                      needs_model: bool = False) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator adding `fn(problem, **options) -> SelectorOutput` under `name`; refuses duplicates.

    `defaults` lists every option the selector accepts; `select` rejects any other.
    """

    def deco(fn: SelectorFn) -> SelectorFn:
        if name in SELECTORS:
            raise MiPrunError(f"selector {name!r} is already registered.")
        SELECTORS[name] = Selector(name, None if needs_model else fn, dict(defaults or {}),
                                   description, needs_model)
        return fn

    return deco


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise MiPrunError(f"unknown selection method {name!r}: choose one of "
                          f"{', '.join(sorted(SELECTORS))}.")
    return SELECTORS[name]


def _rank_ascending(values: np.ndarray, blocks: Iterable[int]) -> list[int]:
    """Blocks by value ascending, NaN last, ties by index."""
    return sorted(blocks, key=lambda b: (bool(np.isnan(values[b])), float(values[b]) if
                                         not np.isnan(values[b]) else 0.0, b))


# ------------------------------------------------------------------------------ score-based


@register_selector("topk", description="the n blocks with the highest block MI (lowest importance)")
def _select_topk(p: Problem) -> SelectorOutput:
    return SelectorOutput(tuple(_rank_ascending(-p.block_mi, p.allowed)[: p.n]))


@register_selector("shortgpt", description="ShortGPT: the n blocks with the lowest cosine Block Influence")
def _select_shortgpt(p: Problem) -> SelectorOutput:
    bi = _baseline(p, "cosine_bi", (p.n_blocks,))
    return SelectorOutput(tuple(_rank_ascending(bi, p.allowed)[: p.n]))


@register_selector("angular", description="Gromov et al.: the contiguous window of n blocks with the "
                                          "smallest angular distance between its input and output")
def _select_angular(p: Problem) -> SelectorOutput:
    ang = _baseline(p, "angular", (p.n_blocks + 1, p.n_blocks + 1))
    allowed = set(p.allowed)
    best, best_start, traj = math.inf, None, []
    for s in range(p.n_blocks - p.n + 1):
        if not all(b in allowed for b in range(s, s + p.n)):
            continue
        d = float(ang[s, s + p.n])
        traj.append({"start": s, "end": s + p.n, "angular": d})
        if np.isfinite(d) and d < best:  # strict: the first (lowest) start wins ties
            best, best_start = d, s
    if best_start is None:
        raise MiPrunError("baselines['angular'] has no finite entry for any window of "
                          f"{p.n} blocks. Fix: recompute the analysis.")
    return SelectorOutput(tuple(range(best_start, best_start + p.n)), trajectory=traj)


@register_selector("random", description="n blocks drawn uniformly at random (seeded)")
def _select_random(p: Problem) -> SelectorOutput:
    rng = np.random.default_rng(p.seed)
    picked = rng.choice(np.asarray(p.allowed), size=p.n, replace=False)
    return SelectorOutput(tuple(sorted(int(b) for b in picked)))


def _baseline(p: Problem, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in p.baselines:
        raise MiPrunError(f"the analysis has no baselines[{name!r}] (it has: "
                          f"{', '.join(sorted(p.baselines)) or 'none'}). Fix: rerun the analysis "
                          "with baselines enabled.")
    arr = np.asarray(p.baselines[name], dtype=np.float64)
    if arr.shape != shape:
        raise MiPrunError(f"baselines[{name!r}] has shape {arr.shape}, expected {shape}.")
    return arr


# ------------------------------------------------------------------------------ MI objective


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
    cost, runs = _best_combination(p.n_blocks, p.n, windows)
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
    oracle = _SpanOracle(p.C)
    t0 = time.perf_counter()
    current = _rank_ascending(-p.block_mi, p.allowed)[: p.n]
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
                if _improves(val, best_obj):
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
    """Fast-Block-Select, as DESIGN.md section 3 reads the paper's Algorithm 1.

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
    ranking = _rank_ascending(score, p.allowed)
    # NaN scores rank last for the pools; in coarse sums they count as +inf (least attractive).
    coarse_score = np.where(np.isnan(score), np.inf, score)
    oracle = _SpanOracle(p.C)
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
        new_obj, runs = _best_combination(L, n, windows)
        Q = frozenset(b for s, e in runs for b in range(s, e))
        chosen = set(runs)
        cands = [dict(c, chosen=(key in chosen)) for key, c in sorted(measured.items())]
        improved = bool(runs) and Q != P and _improves(new_obj, obj)
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


@register_selector("sleb", needs_model=True,
                   description="SLEB: iteratively remove the block whose removal raises calibration "
                               "perplexity least (needs the model; use sleb_select)")
def _select_sleb(p: Problem) -> SelectorOutput:  # never called: needs_model
    raise AssertionError("unreachable")


# ==============================================================================================
# entry points


def _validated_options(sel: Selector, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(sel.defaults))
    if unknown:
        valid = ", ".join(sorted(sel.defaults)) or "none"
        raise MiPrunError(f"method {sel.name!r} does not take option(s) {', '.join(unknown)}; "
                          f"its options: {valid}.")
    return {**sel.defaults, **options}


def _check_analysis(analysis: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    block_mi = np.asarray(analysis.block_mi, dtype=np.float64)
    span = np.asarray(analysis.span, dtype=np.float64)
    L = block_mi.shape[0]
    if block_mi.ndim != 1 or L < 1:
        raise MiPrunError(f"block_mi must have shape (L,) with L >= 1; got {block_mi.shape}.")
    if span.shape != (L + 1, L + 1):
        raise MiPrunError(f"span matrix has shape {span.shape}; {L} blocks need ({L + 1}, {L + 1}).")
    norm = getattr(analysis, "span_norm", None)
    return block_mi, span, None if norm is None else np.asarray(norm, dtype=np.float64)


def select(analysis: Any, method: str, n: int | None = None, ratio: float | None = None,
           run_cost: str = "neg-mi", protect_ends: bool | int | float = False, seed: int = 0,
           **options: Any) -> Selection:
    """Choose blocks to remove from an `Analysis` with `method` (see `SELECTORS`).

    Give exactly one of `n` and `ratio`. `run_cost` names the entry of `RUN_COSTS` that the MI
    objective uses (optimised by "fbs", "local", "exact", "exhaustive"; reported for every method).
    `protect_ends` keeps the ends: True never removes block 0 or block L-1, an int k the first and
    last k blocks, a float in (0, 0.5) that fraction of L. `seed` drives "random" only; every other
    method is deterministic. Method options (e.g. fbs: pool, k, max_iter) go in `options`.
    """
    sel = get_selector(method)
    if sel.needs_model:
        raise MiPrunError(f"method {method!r} needs the model and calibration tokens, which an "
                          "analysis does not hold. Fix: call mi_prun.select.sleb_select(model, "
                          "input_ids, n) instead.")
    opts = _validated_options(sel, options)
    t0 = time.perf_counter()
    block_mi, span, span_norm = _check_analysis(analysis)
    L = block_mi.shape[0]
    count = resolve_n(L, n, ratio, protect_ends=protect_ends)
    C = cost_matrix(span, span_norm, run_cost)
    problem = Problem(n_blocks=L, n=count, block_mi=block_mi, span=span, C=C,
                      allowed=tuple(_allowed_blocks(L, protect_ends)),
                      baselines=dict(getattr(analysis, "baselines", {}) or {}), seed=int(seed))
    assert sel.fn is not None
    out = sel.fn(problem, **opts)
    seconds = time.perf_counter() - t0
    result = _make_selection(method, count, L, out.removed, set_cost(out.removed, C), run_cost,
                             seconds, forward_passes=out.forward_passes,
                             span_lookups=out.span_lookups, ratio=ratio, trajectory=out.trajectory,
                             options={"protect_ends": protect_ends, "seed": int(seed), **opts})
    log.info("%s removed %s (objective %.6g, %s) in %.3fs", method, list(result.removed),
             result.objective, run_cost, seconds)
    return result


def compare(analysis: Any, n: int | None = None, ratio: float | None = None,
            run_cost: str = "neg-mi",
            methods: Sequence[str] = ("fbs", "local", "exact", "exhaustive"),
            protect_ends: bool | int | float = False, seed: int = 0,
            options: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per method: removed, objective, gap to the exact optimum, time, feasibility.

    Rows: {"method", "removed", "objective", "gap", "rel_gap", "seconds", "forward_passes",
    "span_lookups", "feasible", "reason"}. gap = objective - exact objective (>= 0);
    rel_gap = gap / |exact| (None when exact is 0). A method that refuses (e.g. exhaustive past
    its limit, a missing baseline) gives a row with feasible False and the reason.
    """
    L = int(np.asarray(analysis.block_mi).shape[0])
    count = resolve_n(L, n, ratio, protect_ends=protect_ends)  # bad n fails once, up front
    options = options or {}
    exact = select(analysis, "exact", n=count, run_cost=run_cost, protect_ends=protect_ends,
                   seed=seed, **options.get("exact", {}))
    rows = []
    for method in methods:
        try:
            s = exact if method == "exact" and not options.get("exact") else select(
                analysis, method, n=count, run_cost=run_cost, protect_ends=protect_ends, seed=seed,
                **options.get(method, {}))
        except MiPrunError as exc:
            rows.append({"method": method, "removed": None, "objective": None, "gap": None,
                         "rel_gap": None, "seconds": None, "forward_passes": None,
                         "span_lookups": None, "feasible": False, "reason": str(exc)})
            continue
        gap = s.objective - exact.objective
        rel = gap / abs(exact.objective) if exact.objective != 0 else None
        rows.append({"method": method, "removed": list(s.removed), "objective": s.objective,
                     "gap": gap, "rel_gap": rel, "seconds": s.seconds,
                     "forward_passes": s.forward_passes, "span_lookups": s.span_lookups,
                     "feasible": True, "reason": None})
    return rows


# ==============================================================================================
# SLEB


def sleb_search(n_blocks: int, n: int, nll_without: Callable[[tuple[int, ...]], float],
                protect_ends: bool | int | float = False, progress: Progress | None = None
                ) -> tuple[tuple[int, ...], list[dict[str, Any]], int]:
    """SLEB-style greedy removal (Song et al., 2024): n steps; each removes the remaining block
    whose removal (on top of those already removed) gives the lowest calibration NLL.

    `nll_without(removed)` returns the calibration mean NLL of the model with the sorted tuple of
    blocks `removed` skipped; each call is one calibration pass. Ties go to the lowest block;
    a NaN NLL is never preferred. Returns (removed sorted, trajectory, forward_passes), where
    forward_passes = sum over steps of the candidates tried (L + (L-1) + ... for n steps).
    `progress("sleb", fraction, message)` is called after every pass.
    """
    L = int(n_blocks)
    count = resolve_n(L, n, protect_ends=protect_ends)
    allowed = _allowed_blocks(L, protect_ends)
    total = sum(len(allowed) - t for t in range(count))
    removed: list[int] = []
    traj: list[dict[str, Any]] = []
    passes = 0
    t0 = time.perf_counter()
    for step in range(count):
        cands = []
        for b in allowed:
            if b in removed:
                continue
            nll = float(nll_without(tuple(sorted(removed + [b]))))
            passes += 1
            cands.append({"block": b, "nll": nll})
            if progress is not None:
                progress("sleb", passes / total, f"step {step + 1}/{count}, pass {passes}/{total}")
        best = min(cands, key=lambda c: (math.isnan(c["nll"]), c["nll"] if not math.isnan(c["nll"])
                                         else 0.0, c["block"]))
        removed.append(best["block"])
        nll = best["nll"]
        traj.append({"step": step, "removed_block": best["block"], "removed": sorted(removed),
                     "nll": nll, "ppl": math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf,
                     "candidates": cands, "elapsed": time.perf_counter() - t0})
        log.info("sleb step %d: removed block %d (calibration NLL %.4f)", step, best["block"], nll)
    return tuple(sorted(removed)), traj, passes


def calibration_nll(model: Any, input_ids: Any, attention_mask: Any | None = None,
                    batch_size: int = 8) -> float:
    """Token-weighted mean next-token NLL (nats) of `model` over `input_ids` (B, T).

    Every position t >= 1 whose token and predecessor are both unmasked is scored once, predicted
    from positions < t of its own row; padding (attention_mask == 0) is never scored.
    """
    import torch

    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise MiPrunError(f"input_ids must be (batch, length >= 2); got {tuple(ids.shape)}.")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.shape != ids.shape:
        raise MiPrunError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[0], max(1, int(batch_size))):
            x = ids[start:start + batch_size].to(device)
            m = mask[start:start + batch_size].to(device)
            logits = model(input_ids=x, attention_mask=m, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = x[:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            valid = (m[:, 1:] > 0) & (m[:, :-1] > 0)
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
    if count == 0:
        raise MiPrunError("no calibration token to score (all masked). Fix: give longer sequences.")
    return total / count


def sleb_select(model: Any, input_ids: Any, n: int | None = None, attention_mask: Any | None = None,
                batch_size: int = 8, protect_ends: bool | int | float = False, progress: Progress | None = None,
                *, ratio: float | None = None, analysis: Any | None = None,
                run_cost: str = "neg-mi") -> Selection:
    """SLEB on a real model: `sleb_search` with the calibration NLL of `model` with blocks skipped.

    The model is not changed (blocks are skipped through `prune.pruned_view`, which shares weights). Costs
    sum_{t<n} (L' - t) calibration passes (L' removable blocks). Give `analysis` to also report
    the MI objective under `run_cost`; without it the objective is NaN.
    """
    from mi_prun.models import find_blocks
    from mi_prun.prune import pruned_view

    t0 = time.perf_counter()
    L = len(find_blocks(model))
    count = resolve_n(L, n, ratio, protect_ends=protect_ends)

    def nll_without(removed: tuple[int, ...]) -> float:
        # A structural copy sharing the weights: the shared model is never touched, so other
        # threads (app sessions) can run it while SLEB searches.
        view = pruned_view(model, removed) if removed else model
        return calibration_nll(view, input_ids, attention_mask, batch_size)

    removed, traj, passes = sleb_search(L, count, nll_without, protect_ends=protect_ends,
                                        progress=progress)
    objective = math.nan
    if analysis is not None:
        block_mi, span, span_norm = _check_analysis(analysis)
        if block_mi.shape[0] != L:
            raise MiPrunError(f"the analysis has {block_mi.shape[0]} blocks, the model {L}.")
        objective = set_cost(removed, cost_matrix(span, span_norm, run_cost))
    return _make_selection("sleb", count, L, removed, objective, run_cost, time.perf_counter() - t0,
                           forward_passes=passes, ratio=ratio, trajectory=traj,
                           options={"protect_ends": protect_ends, "batch_size": int(batch_size),
                                    "calibration_shape": list(np.shape(input_ids))})
