"""SLEB (Song et al., 2024): greedy block removal judged by calibration NLL, with forward passes.

`sleb_search` is the search given any NLL oracle; the registered "sleb" selector runs it with the
problem's NLL scorer (`mi_prun.select.scorer`, full passes of weight-sharing views), so
`select(analysis, method="sleb", model=...)` works like any selector; `sleb_select` is the same on
calibration tokens given directly; `calibration_nll` scores a model on tokens.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mi_prun.config import SelectConfig, as_int, expect_config
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import token_nll
from mi_prun.models.blocks import find_blocks
from mi_prun.progress import Progress
from mi_prun.select.counts import allowed_blocks, resolve_n
from mi_prun.select.registry import Problem, SelectorOutput, register_selector, run_selector
from mi_prun.select.scorer import model_scorer, unwrap_model
from mi_prun.select.selection import Selection

log = logging.getLogger(__name__)


@register_selector("sleb", needs_model=True,
                   description="SLEB: iteratively remove the block whose removal raises calibration "
                               "perplexity least (forward passes of the model: needs --model)")
def _select_sleb(p: Problem) -> SelectorOutput:
    scorer = p.scorer
    removed, traj, passes = sleb_search(p.n_blocks, p.n, lambda r: scorer.score(r)[0], allowed=p.allowed,
                                        progress=scorer.progress)
    return SelectorOutput(removed, trajectory=traj, forward_passes=passes,
                          options={"batch_size": scorer.batch_size, "tokens": scorer.provenance,
                                   "calibration_shape": list(scorer.ids.shape)})


def sleb_search(n_blocks: int, n: int, nll_without: Callable[[tuple[int, ...]], float],
                protect_ends: bool | int | float = False, progress: Progress | None = None, *,
                allowed: Sequence[int] | None = None) -> tuple[tuple[int, ...], list[dict[str, Any]], int]:
    """SLEB-style greedy removal (Song et al., 2024): n steps; each removes the remaining block
    whose removal (on top of those already removed) gives the lowest calibration NLL.

    `nll_without(removed)` returns the calibration mean NLL of the model with the sorted tuple of
    blocks `removed` skipped; each call is one calibration pass. Ties go to the lowest block;
    a NaN NLL is never preferred. Returns (removed sorted, trajectory, forward_passes), where
    forward_passes = sum over steps of the candidates tried (L + (L-1) + ... for n steps).
    `progress("sleb", fraction, message)` is called after every pass. `allowed`: the removable
    blocks (default: those `protect_ends` leaves).
    """
    L = int(n_blocks)
    count = resolve_n(L, n, protect_ends=protect_ends)
    allowed = list(allowed) if allowed is not None else allowed_blocks(L, protect_ends)
    total = sum(len(allowed) - t for t in range(count))
    removed: list[int] = []
    traj: list[dict[str, Any]] = []
    passes = 0
    t0 = time.perf_counter()
    if progress is not None:  # the start, so that a shell's time-left estimate counts every pass
        progress("sleb", 0.0, f"pass 0 of {total}")
    for step in range(count):
        cands = []
        for b in allowed:
            if b in removed:
                continue
            nll = float(nll_without(tuple(sorted(removed + [b]))))
            passes += 1
            cands.append({"block": b, "nll": nll})
            if progress is not None:
                progress("sleb", passes / total, f"step {step + 1}/{count}, pass {passes} of {total} "
                         f"({total - passes} left)")
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
    total, count = token_nll(model, input_ids, attention_mask, batch_size=batch_size)
    if count == 0:
        raise MiPrunError("no calibration token to score (all masked). Fix: give longer sequences.")
    return total / count


def sleb_select(model: Any, input_ids: Any, n: int | None = None, attention_mask: Any | None = None,
                batch_size: int = 8, protect_ends: bool | int | float = SelectConfig.protect_ends,
                progress: Progress | None = None, *, ratio: float | None = None, analysis: Any | None = None,
                run_cost: str = SelectConfig.run_cost, config: Any = None, force: bool = False) -> Selection:
    """SLEB on a real model, scored on the given calibration tokens (`input_ids` (B, T)): the
    registered "sleb" selector with the model's NLL scorer (`mi_prun.select.scorer`).

    The model is not changed (blocks are skipped through weight-sharing views). Costs
    sum_{t<n} (L' - t) calibration passes (L' removable blocks). Give `analysis` to also report
    the MI objective under `run_cost` (and to refuse another model, unless `force` and it has the
    same block count); without it the objective is NaN.
    """
    if config is not None:
        expect_config(config, SelectConfig)
        protect_ends, run_cost = config.protect_ends, config.run_cost
        if n is None and ratio is None:
            n, ratio = config.n, config.ratio
    if n is None and ratio is None:
        ratio = SelectConfig.DEFAULT_RATIO
    cfg = SelectConfig(method="sleb", n=n, ratio=ratio, protect_ends=protect_ends, run_cost=run_cost,
                       verify_passes=0)
    module, _ = unwrap_model(model, None, cfg)
    ids = torch.as_tensor(input_ids)
    tokens = SimpleNamespace(input_ids=ids, attention_mask=attention_mask, provenance={
        "source": "given", "shape": list(ids.shape)})
    target = analysis if analysis is not None else _bare_analysis(len(find_blocks(module)))
    scorer = model_scorer(module, analysis, cfg, n_blocks=target.block_mi.shape[0],
                          starts=(), tokens=tokens, batch_size=as_int(batch_size, "batch_size"),
                          use_prefix=False, progress=progress, force=force)
    sel = run_selector(target, cfg, scorer)
    return sel if analysis is not None else replace(sel, objective=math.nan, provenance={})


def _bare_analysis(L: int) -> Any:
    """A stand-in analysis for a search without one (its MI objective is reported as NaN)."""
    return SimpleNamespace(block_mi=np.zeros(L), span=np.zeros((L + 1, L + 1)), span_norm=np.ones((L + 1, L + 1)),
                           baselines={}, span_unexplained=np.zeros((L + 1, L + 1)),
                           model=None, estimator=None, estimator_options=None, calibration=None)
