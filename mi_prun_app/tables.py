"""The DataFrames behind the app's tables (every table can be downloaded as CSV).

Blocks and ranks are numbered from 0, as everywhere in mi-prun: rank 0 is the block a criterion
removes first (its most redundant block), as in `mi_prun.results.rank_blocks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from mi_prun.results import rank_blocks
from mi_prun_app.labels import MISSING, label, proposer_label, sel_label


def csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode("utf-8")


def displayed(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """(`df` as a table shows it, whether a cell had no value). Streamlit draws a missing value as
    "None" (and an empty text as nothing): such cells read `MISSING` instead, and the numbers of
    their column are written with 6 significant digits (the column turns to text). The CSV
    download keeps `df` itself (missing = empty)."""
    out, missing = df.copy(), False
    for col in out.columns:
        values = out[col]
        absent = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
        if not absent.any():
            continue
        missing = True
        out[col] = [MISSING if gone else (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v)
                    for v, gone in zip(values, absent)]
    return out, missing


def block_ranks(scores: Any, descending: bool) -> np.ndarray:
    """ranks[b] = position of block b in `rank_blocks(scores, descending)` (0 = removed first)."""
    order = rank_blocks(scores, descending=descending)
    ranks = np.empty(len(order), dtype=int)
    ranks[order] = np.arange(len(order))
    return ranks


def angular_per_block(analysis: Any) -> np.ndarray | None:
    """The angular distance of each single block (its input against its output), or None."""
    ang = (analysis.baselines or {}).get("angular")
    return None if ang is None else np.diagonal(np.asarray(ang, dtype=float), 1).copy()


def ranking_frame(analysis: Any) -> pd.DataFrame:
    """One row per block: block MI and the baselines' scores, and each criterion's redundancy rank
    (0 = removed first: highest block MI, lowest Block Influence, lowest angular distance)."""
    L = analysis.n_blocks
    mi = np.asarray(analysis.block_mi, dtype=float)
    df = pd.DataFrame({"block": np.arange(L), "block_mi": mi, "rank_mi": block_ranks(mi, descending=True)})
    bi = (analysis.baselines or {}).get("cosine_bi")
    if bi is not None:
        bi = np.asarray(bi, dtype=float)
        df["cosine_bi"] = bi
        df["rank_cosine_bi"] = block_ranks(bi, descending=False)
    single = angular_per_block(analysis)
    if single is not None:
        df["angular_distance"] = single
        df["rank_angular"] = block_ranks(single, descending=False)
    return df


def span_frame(analysis: Any) -> pd.DataFrame:
    """Every span i < j: the blocks it covers, its MI, normalised MI and DPI bound."""
    span = np.asarray(analysis.span, dtype=float)
    bound = (analysis.dpi or {}).get("bound")
    bound = np.asarray(bound, dtype=float) if bound is not None else None
    norm = np.asarray(analysis.span_norm, dtype=float) if analysis.span_norm is not None else None
    rows = []
    n = span.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            rows.append({"i": i, "j": j, "first_block": i, "last_block": j - 1, "n_blocks": j - i,
                         "span_mi": span[i, j],
                         "span_nmi": None if norm is None else norm[i, j],
                         "dpi_bound": None if bound is None or not np.isfinite(bound[i, j]) else bound[i, j]})
    return pd.DataFrame(rows)


def violations_frame(analysis: Any) -> pd.DataFrame:
    """The worst DPI violations: the cell, its value, its bound, the excess and the bounding cell."""
    worst = (analysis.dpi or {}).get("worst") or []
    cols = ["i", "j", "value", "bound", "excess", "bound_cell"]
    return pd.DataFrame([{k: (str(w.get(k)) if k == "bound_cell" else w.get(k)) for k in cols}
                         for w in worst], columns=cols)


def stability_frame(analysis: Any) -> pd.DataFrame:
    """Block MI per calibration group, one row per block."""
    batches = analysis.block_mi_batches
    if batches is None:
        return pd.DataFrame()
    batches = np.asarray(batches, dtype=float)
    df = pd.DataFrame(batches, columns=[f"group_{g}" for g in range(batches.shape[1])])
    df.insert(0, "block", np.arange(batches.shape[0]))
    return df


def trajectory_frame(selection: Any) -> pd.DataFrame:
    """FBS iterations: prune pool P, alternative pool A, candidates measured, objective, time."""
    rows = []
    for step in selection.trajectory:
        rows.append({"iteration": step.get("iteration"), "P": " ".join(map(str, step.get("P", []))),
                     "A": " ".join(map(str, step.get("A", []))),
                     "candidates_measured": len(step.get("candidates", []) or []),
                     "objective": step.get("objective"), "changed": step.get("changed"),
                     "elapsed_s": step.get("elapsed")})
    return pd.DataFrame(rows)


def candidates_frame(step: Mapping[str, Any]) -> pd.DataFrame:
    """The candidate runs FBS measured at one iteration (blocks start..end-1)."""
    cols = ["start", "end", "coarse", "span_mi", "cost", "source", "chosen"]
    rows = [{k: c.get(k) for k in cols} for c in step.get("candidates", []) or []]
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        df.insert(2, "blocks", [f"{s}..{e - 1}" for s, e in zip(df["start"], df["end"])])
    return df


def comparison_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """`select.compare` rows as a table (removed blocks as text, so that the CSV stays flat)."""
    out = []
    for r in rows:
        r = dict(r)
        r["removed"] = " ".join(map(str, r["removed"])) if r.get("removed") is not None else ""
        r["method"] = label(str(r.get("method")))  # the legends' words
        out.append(r)
    return pd.DataFrame(out)


def verified_candidates_frame(selection: Any) -> pd.DataFrame:
    """The sets the verified search scored, in the order it scored them: blocks removed, who
    proposed each (the first proposer counts), its MI objective, its verification NLL and the
    perplexity exp(NLL) on the verification tokens (for a set a raced search dropped, the paired
    estimate from the samples it was scored on), whether it was cached, and which set won."""
    winner = tuple(selection.removed)
    one = None if selection.one_pass_removed is None else tuple(selection.one_pass_removed)
    cols = ["order", "removed", "proposed_by", "proposers", "stage", "objective", "nll", "ppl",
            "nll_vs_winner", "samples", "cached", "winner", "one_pass"]
    rows = []
    for k, c in enumerate(selection.candidates or []):
        nll = None if c.nll is None or not np.isfinite(c.nll) else c.nll
        rows.append({"order": k, "removed": " ".join(map(str, c.removed)),
                     "proposed_by": proposer_label(c.proposers[0] if c.proposers else None),
                     "proposers": "; ".join(map(proposer_label, c.proposers)), "stage": c.stage,
                     "objective": c.objective, "nll": nll,
                     "ppl": None if nll is None else float(np.exp(nll)),
                     "nll_vs_winner": None if nll is None or selection.nll is None else nll - selection.nll,
                     # raced searches: the samples a dropped set was scored on ("all" when complete)
                     "samples": "all" if c.complete else str(c.samples),
                     "cached": bool(c.cached), "winner": c.removed == winner,
                     "one_pass": one is not None and c.removed == one})
    return pd.DataFrame(rows, columns=cols)


def ppl_frame(points: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Perplexity points as one row per (method, n, removed set, verified): the method as the chart's
    legend names it, unhealed and healed perplexity side by side, and healed / unhealed (below 1 =
    the bridge recovered quality); no healed value where healing was off or refused."""
    cols = ["n", "method", "verified", "removed", "ppl", "ppl_healed", "healed_ratio"]
    merged: dict[tuple, dict[str, Any]] = {}
    for p in points:
        key = (int(p["n"]), str(p["method"]), bool(p.get("verified", False)), str(p.get("removed", "")))
        row = merged.setdefault(key, dict(zip(cols[:4], key), ppl=None, ppl_healed=None, healed_ratio=None))
        row["ppl_healed" if p.get("healed") else "ppl"] = float(p["ppl"])
    for row in merged.values():
        if row["ppl"] and row["ppl_healed"] is not None:
            row["healed_ratio"] = row["ppl_healed"] / row["ppl"]
    df = pd.DataFrame(list(merged.values()), columns=cols).sort_values(["n", "method", "verified"],
                                                                        ignore_index=True)
    df["method"] = [sel_label(m, v) for m, v in zip(df["method"], df["verified"])]
    return df
