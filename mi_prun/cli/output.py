"""What the CLI prints: progress bars and the text of analyses, selections and comparisons."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mi_prun.progress import TimeLeft, time_left_text
from mi_prun.select.confirm import describe_confirmation
from mi_prun.select import one_pass_estimate, stop_note
from mi_prun.results import rank_blocks

BLOCK_NOTE = "Blocks are numbered from 0."


class TqdmProgress:
    """Adapts the library's progress(stage, fraction, message) callback to one tqdm bar per stage,
    with the time left estimated from the stage's own progress (`mi_prun.progress.TimeLeft`)."""

    def __init__(self, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.time_left = TimeLeft(clock)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        left = self.time_left.update(stage, fraction)
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=1000, desc=stage, file=sys.stderr, leave=True,
                                          bar_format="{desc:>10}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        bar.n = int(max(0.0, min(1.0, fraction)) * 1000)
        bar.set_postfix_str(self.postfix(message, left, fraction), refresh=False)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()
            del self.bars[stage]  # the same stage run again gets a new bar

    @staticmethod
    def postfix(message: str, left: float | None, fraction: float) -> str:
        """The bar's text: the library's message, then the time left (none once done)."""
        return message if fraction >= 1.0 else (f"{message} - " if message else "") + time_left_text(left)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def format_analysis(analysis) -> str:
    """Blocks ranked by redundancy (rank 0 = highest MI) next to the baselines' scores."""
    L = analysis.n_blocks
    bi = analysis.baselines.get("cosine_bi")
    ang = analysis.baselines.get("angular")
    bi_rank = {b: r for r, b in enumerate(rank_blocks(bi, descending=False))} if bi is not None else {}
    rows = []
    for rank, b in enumerate(analysis.ranking()):
        rows.append({
            "rank": rank, "block": b, "MI (nats)": float(analysis.block_mi[b]),
            "cosine BI": float(bi[b]) if bi is not None else np.nan,
            "BI rank": bi_rank.get(b, -1),
            "angular d(b,b+1)": float(ang[b, b + 1]) if ang is not None else np.nan,
        })
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}")
    m, c = analysis.model, analysis.calibration
    dpi = analysis.dpi or {}
    tol = dpi.get("tolerance")
    tol_text = (f"rtol {tol.get('rtol')}, atol {tol.get('atol')}" if isinstance(tol, dict) else str(tol))
    lines = [
        f"model: {m.get('spec')} ({m.get('architecture')}, {L} blocks)   estimator: {analysis.estimator} "
        f"{json.dumps(analysis.estimator_options)}",
        f"calibration: {c.get('source')} N={c.get('n_samples')} T={c.get('seq_len')} seed={c.get('seed')} "
        f"positions kept={c.get('positions_kept')} drop_first={c.get('drop_first')}",
        f"{BLOCK_NOTE} Rank 0 = most redundant (highest MI); BI rank 0 = lowest cosine Block "
        "Influence (most redundant for ShortGPT).",
        table,
        f"DPI: {dpi.get('n_violations', '?')} of {dpi.get('n_cells', '?')} span cells break the inequality "
        f"beyond tolerance ({tol_text})",
    ]
    tau = (analysis.stability or {}).get("kendall_tau_halves")
    if tau is not None:
        lines.append(f"stability: Kendall tau between block rankings of two calibration halves = {tau:.3f}")
    for note in analysis.notes or []:
        lines.append(f"note: {note}")
    if analysis.timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in analysis.timings.items()
                                          if isinstance(v, (int, float)) and not k.startswith("score_")))
    return "\n".join(lines)


def format_runs(runs) -> str:
    return ", ".join(f"{s}-{e - 1}" if e - s > 1 else f"{s}" for s, e in runs)


def format_selection(sel) -> str:
    ratio = f" (ratio {sel.ratio})" if getattr(sel, "ratio", None) is not None else ""
    lines = [f"method {sel.method}: remove {sel.n} of {sel.n_blocks} blocks{ratio}: {list(sel.removed)}",
             f"runs: {format_runs(sel.runs)}   objective ({sel.run_cost}): {sel.objective:.6g}   "
             f"time {sel.seconds * 1000:.1f} ms   forward passes {sel.forward_passes}"]
    lines += format_verification(sel)
    lines.append(BLOCK_NOTE)
    return "\n".join(lines)


def _scored_on(tokens: dict) -> str:
    """What the verification passes scored: a task's items, or samples x tokens of a text."""
    if tokens.get("kind") == "task":
        names = ", ".join(str(t.get("task")) for t in tokens.get("tasks") or [] if isinstance(t, dict)) or "a task"
        return f"{tokens.get('items')} items of {names}"
    return f"{tokens.get('n_samples')} x {tokens.get('seq_len')} verification tokens"


def format_verification(sel) -> list[str]:
    """Lines on the verified search: passes spent, the winner's proposer, the one-pass answer's gap."""
    v = getattr(sel, "verification", None) or {}
    if not getattr(sel, "verified", False):
        return ["unverified (no --model): one-pass answer"] if v.get("note") else []
    race = v.get("race") or {}
    raced = race.get("units") is not None
    rule = " (auto)" if v.get("budget_rule") == "auto" else ""
    stages = v.get("sets_by_stage") or {}
    split = ", ".join(f"{k} {c}" for k, c in stages.items() if c)
    scored = v.get("sets_scored", v.get("passes"))
    conf = v.get("confirm") or {}
    search_passes = (v.get("passes") or 0) - (conf.get("passes") or 0)
    of = "" if raced and race.get("unit_budget") else f" of {v.get('budget')}{rule}"
    lines = [f"verified: {scored}{of} sets scored"
             + (f" ({split})" if split else "") + f", {search_passes} new forward passes"
             + f" on {_scored_on(v.get('tokens') or {})} (+{v.get('dense_passes', 0)} dense pass for the prefix "
             f"cache); winner proposed by "
             f"{sel.winner_source}, NLL {sel.nll:.4f}"]
    if raced:
        budget = (f" of a budget of {race['unit_budget']:,} ({v.get('budget')}{rule} passes x a full pass)"
                  if race.get("unit_budget") else "")
        lines.append(f"raced: {race.get('dropped', 0)} sets dropped before their last sample; "
                     f"{race['units']:,} token-block units{budget}, {race.get('units_unraced', 0):,} unraced")
    if sel.one_pass_nll is not None:
        same = tuple(sel.one_pass_removed or ()) == tuple(sel.removed)
        lines.append(f"one-pass answer {list(sel.one_pass_removed or [])}: NLL {sel.one_pass_nll:.4f}"
                     + (" (the winner)" if same else f", {v.get('one_pass_gap_nats', 0):.4f} nats worse "
                        f"(perplexity x{v.get('one_pass_ppl_ratio', 1):.3f})") + one_pass_estimate(v))
    lines += [describe_confirmation(conf)] if conf else []
    note = stop_note(v)
    if note:
        lines.append(note + (" Give a larger --verify-passes." if race.get("mode") == "units" else
                             " --verify-race units spends what the race saves on a longer search, for about the "
                             "unraced search's cost (on Gemma 3 270M at n = 6 it found a set of half the test "
                             "perplexity; benchmarks/RESULTS.md); or give a larger --verify-passes."))
    return lines


def format_compare(rows, n: int, n_blocks: int, run_cost: str) -> str:
    out = [f"n = {n} of {n_blocks} blocks, run cost {run_cost}. {BLOCK_NOTE}"]
    table = pd.DataFrame([r for r in rows if r.get("feasible", True)])
    cols = [c for c in ("method", "removed", "objective", "gap", "rel_gap", "seconds", "span_lookups")
            if c in table.columns]
    out.append(table[cols].to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    for r in rows:
        if not r.get("feasible", True):
            out.append(f"{r['method']}: not run: {r.get('reason')}")
    return "\n".join(out)
