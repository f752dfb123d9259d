"""MI-guided greedy removal: SLEB's steps, each scoring only c blocks instead of all L.

SLEB (`sleb.sleb_search`) removes one block per step, trying every remaining block: O(L n) passes.
Here each step tries only the c most redundant remaining blocks by the analysis's one-pass scores,
MI (highest first) and cosine Block Influence (lowest first) taken in turn, so a step costs c
passes. Passes run through `verify.PrefixScorer` (each starts at its first removed block) and an
`NLLCache`, so a set seen before is free.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from mi_prun.config import SelectConfig, as_int
from mi_prun.models.accept import check_token_ids
from mi_prun.models.blocks import check_context
from mi_prun.progress import Progress
from mi_prun.results import check_same_model
from mi_prun.select.candidates import guided_order, nan_last
from mi_prun.select.counts import allowed_blocks, resolve_n
from mi_prun.select.registry import make_problem
from mi_prun.select.selection import Selection, make_selection

DEFAULT_C = 4


def guided_search(n_blocks: int, n: int, nll_without: Callable[[tuple[int, ...]], tuple[float, bool]],
                  block_mi: np.ndarray, bi: np.ndarray | None, c: int = DEFAULT_C,
                  protect_ends: bool | int | float = SelectConfig.protect_ends, progress: Progress | None = None
                  ) -> tuple[tuple[int, ...], list[dict[str, Any]], int]:
    """n greedy steps; each removes, of the c blocks `guided_order` picks, the one whose removal (on
    top of those removed) gives the lowest NLL. `nll_without(removed)` returns (NLL, cached); an
    uncached call is one pass. Ties go to the earlier-tried block; NaN never wins.
    Returns (removed sorted, trajectory, forward_passes <= c n)."""
    L = int(n_blocks)
    c = as_int(c, "c (blocks tried per step)", minimum=1)
    count = resolve_n(L, n, protect_ends=protect_ends)
    allowed = allowed_blocks(L, protect_ends)
    removed: list[int] = []
    traj: list[dict[str, Any]] = []
    passes, t0 = 0, time.perf_counter()
    for step in range(count):
        tried = guided_order([b for b in allowed if b not in removed], block_mi, bi, c)
        cands = []
        for b in tried:
            nll, cached = nll_without(tuple(sorted(removed + [b])))
            passes += 0 if cached else 1
            cands.append({"block": b, "nll": float(nll), "cached": cached})
            if progress is not None:
                progress("guided", (step + len(cands) / len(tried)) / count, f"step {step + 1}/{count}")
        best = min(cands, key=lambda r: nan_last(r["nll"]))
        removed.append(best["block"])
        traj.append({"step": step, "removed_block": best["block"], "removed": sorted(removed),
                     "nll": best["nll"], "candidates": cands, "elapsed": time.perf_counter() - t0})
    return tuple(sorted(removed)), traj, passes


def guided_select(model: Any, analysis: Any, config: SelectConfig = SelectConfig(), *, tokenizer: Any = None,
                  tokens: Any = None, c: int = DEFAULT_C, batch_size: int = 8, cache: Any = None,
                  progress: Progress | None = None, force: bool = False) -> Selection:
    """`guided_search` on a real model, scored on the verification tokens of `verify.resolve_tokens`
    (the analysis's calibration text apart from the capture's, unless `tokens` is given). A model
    other than the analysed one is refused like `verified_select` (`force=True`: same block count)."""
    from mi_prun.select.costs import set_cost
    from mi_prun.select.verify import NLLCache, PrefixScorer, resolve_tokens, tokens_key, unwrap_model

    t0 = time.perf_counter()
    model, tokenizer = unwrap_model(model, tokenizer, config)
    problem = make_problem(analysis, config)
    check_same_model(getattr(analysis, "model", None), problem.n_blocks, model, force=force, where="the analysis")
    cache = cache if cache is not None else NLLCache()
    if tokens is None:
        check_context(model, config.verify_seq_len, "verification tokens per sample (verify_seq_len, --verify-tokens)")
    ids, mask, tok_prov = resolve_tokens(tokens, tokenizer, analysis, config, cache)
    check_context(model, int(ids.shape[1]), "verification tokens per sample (verify_seq_len, --verify-tokens)")
    ids = check_token_ids(ids, model, "verification tokens")
    cache.bind(model, tokens_key(ids, mask))
    scorer = PrefixScorer(model, ids, mask, batch_size, problem.allowed, cache)
    bi = problem.baselines.get("cosine_bi")
    removed, traj, passes = guided_search(problem.n_blocks, problem.n, scorer.score, problem.block_mi, bi, c,
                                          config.protect_ends, progress)
    return make_selection("mi-guided", problem.n, problem.n_blocks, removed, set_cost(removed, problem.C),
                          config.run_cost, time.perf_counter() - t0, forward_passes=passes,
                          ratio=config.count.get("ratio"), trajectory=traj,
                          options={"protect_ends": config.protect_ends, "c": c, "tokens": tok_prov,
                                   "dense_passes": scorer.dense_passes},
                          provenance={k: getattr(analysis, k, None) for k in ("model", "estimator", "calibration")})


__all__ = ["DEFAULT_C", "guided_order", "guided_search", "guided_select"]
