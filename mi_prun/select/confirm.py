"""Confirmation of the verified search's finalists on fresh tokens (`SelectConfig.verify_confirm`).

Why. The verified search picks the lowest NLL among every set it scored, on one draw of
verification tokens (draw A). At small n the best sets differ by less than that draw's sampling
noise: on smollm2-135m at n = 2, the winner beat the runner-up by 0.012 nats with a paired
standard error of 0.015 over the 16 samples, and 4 sets lay within 2 standard errors
(`benchmarks/task_verify.py`, RESULTS.md). Taking the minimum of many noisy, near-equal estimates
favours whichever set the draw happens to flatter (the winner's curse), and the more sets the
local search scores, the stronger the bias; it is a property of the decision rule, not of a model.

What. The `k` best distinct sets of size n on draw A are the finalists. Each runner-up's gap to
the winner is measured against its own noise: the paired difference of the two sets' NLLs per
verification sample (sample NLLs move together across sets, so the paired standard error is far
smaller than either set's), and a runner-up is *within noise* when its gap is below
`SelectConfig.CONFIRM_Z` (2) paired standard errors. When none is, draw A has decided and nothing
more is spent. Otherwise the winner and the finalists within noise are scored again on draw B,
the next `verify_samples` x `verify_seq_len` samples of the same text (disjoint from A and from
the capture), and the set of lowest NLL over A and B together wins (equal weights: the two draws
have the same size). So the tokens are doubled exactly where the search cannot tell its best
sets apart, on any model and text, and a finalist that only A flattered loses its advantage.
Cost: one pass on B per set re-scored (at most k sets), beyond the search's budget, reported in
`verification["confirm"]`. Draw B's dense blocks run once, as deep as the finalists' first removed
blocks (a lazy prefix: `BlockRunner.prefix(dense=False)`), and each finalist runs from there.

`fresh_tokens` draws B; `confirm` is the decision, a pure function over any scorer
`score_b(removed) -> (nll, cached)` and the per-sample NLLs on A (`samples_a`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from mi_prun.config import SelectConfig
from mi_prun.data import Text, calibration_text, calibration_tokens, load_text, verification_tokens
from mi_prun.errors import MiPrunError, NotEnoughText
from mi_prun.select.selection import ScoredSet


class FreshDrawError(MiPrunError):
    """The text holds too few samples for a fresh draw B: the search's answer stands unconfirmed."""


def fresh_tokens(config: SelectConfig, analysis: Any, tokenizer: Any, draw_a: torch.Tensor,
                 text: Text | None = None) -> torch.Tensor:
    """Draw B: the samples a draw of 2 x `verify_samples` adds to draw A, from the same text (the
    analysis's calibration text apart from the capture's samples, or the `verify_on` text; `text`
    when given, for a calibration text that cannot be reloaded). Too little text raises
    `FreshDrawError`."""
    n, T = config.verify_samples, config.verify_seq_len
    try:
        if config.verify_on is None:
            calib = dict(getattr(analysis, "calibration", {}) or {})
            both = verification_tokens(tokenizer, text if text is not None else calibration_text(calib), calib,
                                       2 * n, T).input_ids
        else:
            both = calibration_tokens(tokenizer, load_text(config.verify_on, purpose="calibration"), 2 * n, T,
                                      seed=0).input_ids
    except NotEnoughText:  # then the rows beyond draw A are too few, said below
        both = draw_a[:0]
    seen = {tuple(r.tolist()) for r in draw_a}
    rows = [r for r in both if tuple(r.tolist()) not in seen]
    if len(rows) < n:
        raise FreshDrawError(f"the verification text holds {len(rows)} samples beyond draw A, not the {n} of a fresh "
                             "draw. Fix: more text, fewer verification samples, or verify_confirm 0.")
    return torch.stack(rows[:n])


def paired_gap(winner: Any, other: Any) -> tuple[float, float] | None:
    """(mean over samples of other - winner, its standard error) from per-sample NLLs, or None when
    either is missing, their lengths differ, or there are fewer than 2 finite pairs."""
    if winner is None or other is None or len(winner) != len(other):
        return None
    d = [o - w for w, o in zip(winner, other) if math.isfinite(w) and math.isfinite(o)]
    if len(d) < 2:
        return None
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def within_noise(gap: tuple[float, float] | None, z: float) -> bool:
    """A runner-up the draw cannot tell from the winner: gap below z paired SE (unknown: True)."""
    if gap is None:
        return True
    mean, se = gap
    return mean < z * se if se > 0 else mean <= 0


def confirm(n: int, scored: Sequence[ScoredSet], score_b: Callable[[tuple[int, ...]], tuple[float, bool]],
            k: int, samples_a: Callable[[tuple[int, ...]], Any] | None = None, z: float = SelectConfig.CONFIRM_Z
            ) -> tuple[ScoredSet, dict[str, Any]]:
    """(winning row, record): the `k` best distinct sets of size `n` in `scored` (NLL on draw A,
    NaN last) are the finalists; the runners-up within `z` paired standard errors of the winner
    on A (`samples_a(removed)`: per-sample NLLs; without them every runner-up counts as within
    noise) are re-scored with `score_b` beside the winner, and the lowest mean of the two NLLs
    wins, ties to the set better on A. When no runner-up is within noise, `score_b` is never
    called. The record lists every finalist ({removed, proposers, nll_a, gap_a, se_a, within_noise,
    nll_b, nll_ab}; nll_b and nll_ab None when not re-scored), the passes spent and the rule."""
    rows = [r for r in scored if len(r.removed) == n and not math.isnan(r.nll)]
    finalists: list[ScoredSet] = []
    for r in sorted(rows, key=lambda r: r.nll):
        if all(r.removed != f.removed for f in finalists):
            finalists.append(r)
        if len(finalists) == k:
            break
    if not finalists:
        raise MiPrunError("no finite NLL among the sets scored, nothing to confirm. Fix: check the model's outputs.")
    per = {r.removed: (samples_a(r.removed) if samples_a is not None else None) for r in finalists}
    lead = per[finalists[0].removed]
    out = []
    for i, r in enumerate(finalists):
        gap = None if i == 0 else paired_gap(lead, per[r.removed])
        out.append({"removed": list(r.removed), "proposers": list(r.proposers), "nll_a": float(r.nll),
                    "gap_a": None if gap is None else gap[0], "se_a": None if gap is None else gap[1],
                    "within_noise": i == 0 or within_noise(gap, z), "nll_b": None, "nll_ab": None})
    contested = [i for i, f in enumerate(out) if f["within_noise"]]
    passes, best = 0, 0
    if len(contested) > 1:
        for i in contested:
            nll_b, cached = score_b(tuple(out[i]["removed"]))
            passes += 0 if cached else 1
            out[i]["nll_b"] = float(nll_b)
            out[i]["nll_ab"] = (out[i]["nll_a"] + float(nll_b)) / 2
        best = min(contested, key=lambda i: (math.isnan(out[i]["nll_ab"]), out[i]["nll_ab"], i))
    return finalists[best], {
        "finalists": out, "passes": passes, "winner": out[best]["removed"], "changed": best != 0,
        "rescored": len(contested) if len(contested) > 1 else 0, "z": z,
        "rule": (f"runners-up within {z:g} paired SE of the winner on draw A re-scored on a fresh draw B with the "
                 "winner; the lowest mean NLL over A and B wins" if len(contested) > 1 else
                 f"no runner-up within {z:g} paired SE of the winner on draw A: decided by draw A")}


def describe_confirmation(record: dict[str, Any]) -> str:
    """One sentence on a confirmation record (`verification["confirm"]`), for the CLI and the app."""
    if "finalists" not in record:
        return f"Confirmation: {record.get('note', 'not run')}."
    z = record.get("z", SelectConfig.CONFIRM_Z)
    if not record.get("rescored"):
        return (f"Confirmation: no runner-up within {z:g} paired SE of the winner on the verification tokens, "
                "so they decided (0 passes).")
    again = [f["removed"] for f in record["finalists"] if f.get("nll_b") is not None]
    return (f"Confirmation: {len(again)} finalists within {z:g} paired SE re-scored on a fresh draw of the same "
            f"text (+{record.get('passes', 0)} passes): {again}; "
            + (f"the winner changed to {record['winner']}." if record.get("changed") else "the search's winner kept."))


__all__ = ["FreshDrawError", "describe_confirmation", "confirm", "fresh_tokens", "paired_gap", "within_noise"]
