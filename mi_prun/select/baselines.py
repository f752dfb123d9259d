"""Score-based selectors: one ranking or one window scan, no search over sets.

"topk" takes the n blocks with the highest block MI (the starting point that "fbs" and "local"
refine); the baselines, computed from the same capture, are "shortgpt" (lowest cosine Block
Influence), "angular" (the contiguous window with the smallest angular distance, Gromov et al.) and
"random" (seeded). `mi_prun.results.rank_blocks` is the block ordering they share with the search methods.
"""

from __future__ import annotations

import math

import numpy as np

from mi_prun.errors import MiPrunError
from mi_prun.results import rank_blocks
from mi_prun.select.registry import Problem, SelectorOutput, register_selector


@register_selector("topk", description="the n blocks with the highest block MI (lowest importance)")
def _select_topk(p: Problem) -> SelectorOutput:
    return SelectorOutput(tuple(rank_blocks(p.block_mi, among=p.allowed)[: p.n]))


@register_selector("shortgpt", description="ShortGPT: the n blocks with the lowest cosine Block Influence")
def _select_shortgpt(p: Problem) -> SelectorOutput:
    bi = _baseline(p, "cosine_bi", (p.n_blocks,))
    return SelectorOutput(tuple(rank_blocks(bi, descending=False, among=p.allowed)[: p.n]))


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

