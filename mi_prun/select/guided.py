"""MI-guided greedy removal: SLEB's steps, each scoring only c blocks instead of all L.

SLEB (`sleb.sleb_search`) removes one block per step, trying every remaining block: O(L n) passes.
Here each step tries only the c most redundant remaining blocks by the analysis's one-pass scores,
MI (highest first) and cosine Block Influence (lowest first) taken in turn, so a step costs c
passes. Passes run through the NLL scorer (`scorer.PrefixScorer`: each starts at its first removed
block, and an `NLLCache`, so a set seen before is free).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from mi_prun.config import SelectConfig, as_int
from mi_prun.progress import Progress
from mi_prun.select.candidates import guided_order, nan_last
from mi_prun.select.counts import allowed_blocks, resolve_n
from mi_prun.select.registry import Problem, SelectorOutput, make_problem, register_selector, run_selector
from mi_prun.select.scorer import model_scorer
from mi_prun.select.selection import Selection

DEFAULT_C = 4


def guided_search(n_blocks: int, n: int, nll_without: Callable[[tuple[int, ...]], tuple[float, bool]],
                  block_mi: np.ndarray, bi: np.ndarray | None, c: int = DEFAULT_C,
                  protect_ends: bool | int | float = SelectConfig.protect_ends, progress: Progress | None = None,
                  *, allowed: Sequence[int] | None = None) -> tuple[tuple[int, ...], list[dict[str, Any]], int]:
    """n greedy steps; each removes, of the c blocks `guided_order` picks, the one whose removal (on
    top of those removed) gives the lowest NLL. `nll_without(removed)` returns (NLL, cached); an
    uncached call is one pass. Ties go to the earlier-tried block; NaN never wins.
    Returns (removed sorted, trajectory, forward_passes <= c n)."""
    L = int(n_blocks)
    c = as_int(c, "c (blocks tried per step)", minimum=1)
    count = resolve_n(L, n, protect_ends=protect_ends)
    allowed = list(allowed) if allowed is not None else allowed_blocks(L, protect_ends)
    removed: list[int] = []
    traj: list[dict[str, Any]] = []
    passes, t0 = 0, time.perf_counter()
    if progress is not None:  # the start, so that a shell's time-left estimate counts every step
        progress("guided", 0.0, f"step 1 of {count}")
    for step in range(count):
        tried = guided_order([b for b in allowed if b not in removed], block_mi, bi, c)
        cands = []
        for b in tried:
            nll, cached = nll_without(tuple(sorted(removed + [b])))
            passes += 0 if cached else 1
            cands.append({"block": b, "nll": float(nll), "cached": cached})
            if progress is not None:
                progress("guided", (step + len(cands) / len(tried)) / count, f"step {step + 1} of {count}, block {len(cands)} of {len(tried)}")
        best = min(cands, key=lambda r: nan_last(r["nll"]))
        removed.append(best["block"])
        traj.append({"step": step, "removed_block": best["block"], "removed": sorted(removed),
                     "nll": best["nll"], "candidates": cands, "elapsed": time.perf_counter() - t0})
    return tuple(sorted(removed)), traj, passes


@register_selector("mi-guided", defaults={"c": DEFAULT_C}, needs_model=True,
                   description="SLEB's greedy steps trying only the c most redundant blocks by MI and BI "
                               "(forward passes of the model: needs --model)")
def _select_guided(p: Problem, c: int = DEFAULT_C) -> SelectorOutput:
    scorer = p.scorer
    removed, traj, passes = guided_search(p.n_blocks, p.n, scorer.score, p.block_mi, p.baselines.get("cosine_bi"),
                                          c, allowed=p.allowed, progress=scorer.progress)
    return SelectorOutput(removed, trajectory=traj, forward_passes=passes,
                          options={"tokens": scorer.provenance, "dense_passes": scorer.dense_passes})


def guided_select(model: Any, analysis: Any, config: SelectConfig | None = None, *, tokenizer: Any = None,
                  tokens: Any = None, c: int = DEFAULT_C, batch_size: int = 8, cache: Any = None,
                  progress: Progress | None = None, force: bool = False) -> Selection:
    """`guided_search` on a real model, scored on the verification tokens of `scorer.resolve_tokens`
    (the analysis's calibration text apart from the capture's, unless `tokens` is given): the
    registered "mi-guided" selector with the model's NLL scorer (which refuses another model
    unless `force`)."""
    cfg = (config or SelectConfig()).replace(method="mi-guided", options={"c": c})
    problem = make_problem(analysis, cfg)
    scorer = model_scorer(model, analysis, cfg, n_blocks=problem.n_blocks, starts=problem.allowed,
                          tokenizer=tokenizer, tokens=tokens, batch_size=batch_size, cache=cache, progress=progress,
                          force=force)
    return run_selector(analysis, cfg, scorer)


__all__ = ["DEFAULT_C", "guided_order", "guided_search", "guided_select"]
