"""Run costs: what removing one maximal contiguous run of blocks costs, and a removed set's objective.

Removing the run i..j-1 (h_i then feeds block j) is judged by its span entry M[i, j] = I(h_i; h_j)
through a run cost (lower = better). `RUN_COSTS` maps a name to a `RunCost` (a vectorised function
of (span, span_norm, i, j), a one-line description, the analysis statistics it needs);
`register_run_cost` adds one. `cost_matrix` evaluates a run cost once per
problem into C[i, j] (i < j). `runs_of` splits a removed set into its maximal runs and `set_cost`
sums their costs: the objective every selector is judged by. `SpanOracle` reads C while counting
the distinct spans read; `improves` compares objectives up to float noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

RunCostFn = Callable[[np.ndarray, "np.ndarray | None", Any, Any], Any]

# Relative tolerance under which two objectives count as equal (float noise, not improvement).
_TOL = 1e-12


def improves(new: float, old: float) -> bool:
    """new is better than old by more than float noise (any finite value beats +inf)."""
    if not math.isfinite(old):
        return new < old
    return new < old - _TOL * max(1.0, abs(old))


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


def _cost_linear_unexplained(span: np.ndarray, span_norm: np.ndarray | None, i: Any, j: Any, *,
                             span_unexplained: np.ndarray) -> Any:
    return span_unexplained[i, j]


@dataclass(frozen=True)
class RunCost:
    """One run cost: `fn(span, span_norm, i, j, **stats)` (i and j may be integer arrays: numpy
    indexing, so `cost_matrix` evaluates a whole problem in one call), a one-line `description`
    for help texts, and the names of the analysis statistics it `needs` as keywords."""

    fn: RunCostFn
    description: str = ""
    needs: tuple[str, ...] = ()


# The one registry of run costs: name -> RunCost.
RUN_COSTS: dict[str, RunCost] = {
    "neg-mi": RunCost(_cost_neg_mi, "-M[i, j] / (largest MI): rewards span MI, but splitting a run always "
                                    "lowers the sum"),
    "info-loss": RunCost(_cost_info_loss, "1 - NMI[i, j]: the share of information the run loses (needs "
                                          "normalised MI)"),
    "neg-log-nmi": RunCost(_cost_neg_log_nmi, "-log NMI[i, j]: nearly additive along the chain, so contiguous "
                                              "runs compete with scattered blocks (needs normalised MI)"),
    "linear-unexplained": RunCost(_cost_linear_unexplained, "share of h_j's variance the best linear map from "
                                                            "h_i leaves unexplained: what healing cannot give "
                                                            "back (needs an analysis with span_unexplained)",
                                  needs=("span_unexplained",)),
}


def run_cost_descriptions() -> dict[str, str]:
    """name -> one line for help texts, for every registered run cost."""
    return {name: rc.description for name, rc in RUN_COSTS.items()}


def register_run_cost(name: str, fn: RunCostFn, description: str = "", needs: tuple[str, ...] = ()) -> None:
    """Add a run cost (with a one-line `description` for help texts); refuses a name that is taken.
    `needs`: names of analysis statistics (e.g. "span_unexplained") passed to `fn` as keywords."""
    if name in RUN_COSTS:
        raise MiPrunError(f"run cost {name!r} is already registered.")
    RUN_COSTS[name] = RunCost(fn, description, tuple(needs))


def analysis_stats(analysis: Any) -> dict[str, Any]:
    """The statistics of an `Analysis` that run costs may need (their `needs`)."""
    return {name: getattr(analysis, name, None) for rc in RUN_COSTS.values() for name in rc.needs}


def _run_cost(name: str) -> RunCost:
    if name not in RUN_COSTS:
        raise MiPrunError(f"unknown run cost {name!r}: choose one of {', '.join(sorted(RUN_COSTS))}.")
    return RUN_COSTS[name]


def cost_matrix(span: np.ndarray, span_norm: np.ndarray | None = None,
                run_cost: str = SelectConfig.run_cost, stats: Any = None) -> np.ndarray:
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
    rc = _run_cost(run_cost)
    extra = {}
    for name in rc.needs:
        value = (stats or {}).get(name)
        if value is None:
            raise MiPrunError(f"run cost {run_cost!r} needs analysis.{name}, which this analysis lacks. Fix: "
                              "run the analysis again with this mi-prun version, or use another run cost.")
        extra[name] = np.asarray(value, dtype=np.float64)
        if extra[name].shape != span.shape:
            raise MiPrunError(f"analysis.{name} has shape {extra[name].shape}, span {span.shape}; they must match.")
    iu, ju = np.triu_indices(span.shape[0], k=1)
    values = np.asarray(rc.fn(span, norm, iu, ju, **extra), dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        log.warning("%d of %d span entries give a non-finite %s cost; those runs are never chosen",
                    int(bad.sum()), values.size, run_cost)
        values = np.where(bad, np.inf, values)
    C = np.full(span.shape, np.inf)
    C[iu, ju] = values
    return C


class SpanOracle:
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
