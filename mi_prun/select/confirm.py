"""Confirmation of the verified search's finalists on fresh tokens (`SelectConfig.verify_confirm`).

Why. The verified search picks the lowest NLL among every set it scored, on one draw of
verification tokens (draw A). At small n the best sets differ by less than that draw's sampling
noise: on smollm2-135m at n = 2, the winner beat the runner-up by 0.012 nats with a paired
standard error of 0.015 over the 16 samples, and 4 sets lay within 2 standard errors
(`benchmarks/task_verify.py`, RESULTS.md). Taking the minimum of many noisy, near-equal estimates
favours whichever set the draw happens to flatter (the winner's curse), and the more sets the
local search scores, the stronger the bias; it is a property of the decision rule, not of a model.

What. The `k` best distinct sets of size n on draw A (the finalists) are scored again on draw B,
the next `verify_samples` x `verify_seq_len` samples of the same text (disjoint from A and from
the capture), and the set of lowest NLL over A and B together wins (equal weights: the two draws
have the same size). The tokens are doubled exactly where the search cannot tell the candidates
apart, and a finalist that only A flattered loses its advantage. Cost: one dense pass on B (its
prefix cache) and k passes, beyond the search's budget, reported in `verification["confirm"]`.

`fresh_tokens` draws B; `confirm` is the decision, a pure function over any scorer
`score_b(removed) -> (nll, cached)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mi_prun.config import SelectConfig
from mi_prun.data import calibration_text, calibration_tokens, load_text, verification_tokens
from mi_prun.errors import MiPrunError


def fresh_tokens(config: SelectConfig, analysis: Any, tokenizer: Any, draw_a: torch.Tensor) -> torch.Tensor:
    """Draw B: the samples a draw of 2 x `verify_samples` adds to draw A, from the same text (the
    analysis's calibration text apart from the capture's samples, or the `verify_on` text)."""
    n, T = config.verify_samples, config.verify_seq_len
    if config.verify_on is None:
        calib = dict(getattr(analysis, "calibration", {}) or {})
        both = verification_tokens(tokenizer, calibration_text(calib), calib, 2 * n, T).input_ids
    else:
        both = calibration_tokens(tokenizer, load_text(config.verify_on, purpose="calibration"), 2 * n, T,
                                  seed=0).input_ids
    seen = {tuple(r.tolist()) for r in draw_a}
    rows = [r for r in both if tuple(r.tolist()) not in seen]
    if len(rows) < n:
        raise MiPrunError(f"not enough verification text for a fresh draw of {n} samples ({len(rows)} found). "
                          "Fix: more text, fewer verification samples, or verify_confirm 0.")
    return torch.stack(rows[:n])


def confirm(n: int, scored: list[dict[str, Any]], score_b: Callable[[tuple[int, ...]], tuple[float, bool]],
            k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(winning row, record): the `k` best distinct sets of size `n` in `scored` (NLL on draw A,
    NaN last) re-scored with `score_b`; the lowest mean of the two NLLs wins, ties to the set better
    on A. The record lists every finalist ({removed, nll_a, nll_b, nll_ab}) and the passes spent."""
    rows = [r for r in scored if len(r["removed"]) == n and not math.isnan(r["nll"])]
    finalists: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: r["nll"]):
        if all(r["removed"] != f["removed"] for f in finalists):
            finalists.append(r)
        if len(finalists) == k:
            break
    if not finalists:
        raise MiPrunError("no finite NLL among the sets scored, nothing to confirm. Fix: check the model's outputs.")
    out, passes = [], 0
    for r in finalists:
        nll_b, cached = score_b(tuple(r["removed"]))
        passes += 0 if cached else 1
        out.append({"removed": list(r["removed"]), "proposers": list(r["proposers"]), "nll_a": float(r["nll"]),
                    "nll_b": float(nll_b), "nll_ab": (float(r["nll"]) + float(nll_b)) / 2})
    best = min(range(len(out)), key=lambda i: (math.isnan(out[i]["nll_ab"]), out[i]["nll_ab"], i))
    winner = finalists[best]
    return winner, {"finalists": out, "passes": passes, "winner": out[best]["removed"],
                    "changed": best != 0, "rule": "lowest mean NLL over draw A and a fresh draw B"}


__all__ = ["confirm", "fresh_tokens"]
