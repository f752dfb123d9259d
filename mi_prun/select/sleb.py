"""SLEB (Song et al., 2024): greedy block removal judged by calibration NLL, with forward passes.

`sleb_search` is the search given any NLL oracle; `calibration_nll` scores a model on calibration
tokens; `sleb_select` runs the search on a real model (blocks skipped through weight-sharing views)
and returns a `Selection`. The "sleb" registry entry only tells `select` that it needs a model.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np

from mi_prun.config import SelectConfig, as_int
from mi_prun.errors import MiPrunError
from mi_prun.progress import Progress
from mi_prun.select.costs import analysis_stats, cost_matrix, set_cost
from mi_prun.select.counts import allowed_blocks, resolve_n
from mi_prun.select.registry import Problem, SelectorOutput, check_analysis, register_selector
from mi_prun.select.selection import Selection, make_selection

log = logging.getLogger(__name__)


@register_selector("sleb", needs_model=True,
                   description="SLEB: iteratively remove the block whose removal raises calibration "
                               "perplexity least (needs the model; use sleb_select)")
def _select_sleb(p: Problem) -> SelectorOutput:  # never called: needs_model
    raise AssertionError("unreachable")


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
    allowed = allowed_blocks(L, protect_ends)
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
    """Token-weighted mean next-token NLL (nats) of `model` over `input_ids` (B, T); see
    `mi_prun.evaluate.token_nll` for which positions are scored."""
    from mi_prun.evaluate import token_nll

    total, count = token_nll(model, input_ids, attention_mask, batch_size=batch_size)
    if count == 0:
        raise MiPrunError("no calibration token to score (all masked). Fix: give longer sequences.")
    return total / count


def sleb_select(model: Any, input_ids: Any, n: int | None = None, attention_mask: Any | None = None,
                batch_size: int = 8, protect_ends: bool | int | float = SelectConfig.protect_ends,
                progress: Progress | None = None, *, ratio: float | None = None, analysis: Any | None = None,
                run_cost: str = SelectConfig.run_cost, config: Any = None) -> Selection:
    """SLEB on a real model: `sleb_search` with the calibration NLL of `model` with blocks skipped.

    The model is not changed (blocks are skipped through `prune.pruned_view`, which shares weights). Costs
    sum_{t<n} (L' - t) calibration passes (L' removable blocks). Give `analysis` to also report
    the MI objective under `run_cost`; without it the objective is NaN.
    """
    from mi_prun.models import find_blocks
    from mi_prun.models.surgery import pruned_view

    if config is not None:
        if not isinstance(config, SelectConfig):
            raise MiPrunError(f"config must be a SelectConfig, got {type(config).__name__}.")
        protect_ends, run_cost = config.protect_ends, config.run_cost
        if n is None and ratio is None:
            n, ratio = config.n, config.ratio
    if n is None and ratio is None:
        ratio = SelectConfig.DEFAULT_RATIO
    batch_size = as_int(batch_size, "batch_size")
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
        block_mi, span, span_norm = check_analysis(analysis)
        if block_mi.shape[0] != L:
            raise MiPrunError(f"the analysis has {block_mi.shape[0]} blocks, the model {L}.")
        objective = set_cost(removed, cost_matrix(span, span_norm, run_cost, stats=analysis_stats(analysis)))
    return make_selection("sleb", count, L, removed, objective, run_cost, time.perf_counter() - t0,
                          forward_passes=passes, ratio=ratio, trajectory=traj,
                          provenance={} if analysis is None else {
                              k: getattr(analysis, k, None) for k in ("model", "estimator", "calibration")},
                          options={"protect_ends": protect_ends, "batch_size": int(batch_size),
                                   "calibration_shape": list(np.shape(input_ids))})
