"""What the app calls each method, in one place: chart legends, table cells, metrics and widgets.

A method is named the same everywhere a user reads it ("MI-PRUN (FBS) verified", "MI exact
optimum", "ShortGPT (cosine BI)"): `viz` draws legends with these labels and `tables` writes them
into cells, so a table row and a legend entry never disagree. `proposer_label` names the verified
search's proposers (`mi_prun.select.candidates`: "exact:neg-mi#2", "fbs-pool@1", "swap:fbs", ...)
in the same words. `MISSING` is what a table cell shows for a value that is not there.
"""

from __future__ import annotations

import re

METHOD_LABELS: dict[str, str] = {
    "fbs": "MI-PRUN (FBS)",
    "exact": "MI exact optimum",
    "topk": "MI top-k",
    "local": "MI local search",
    "exhaustive": "MI exhaustive",
    "shortgpt": "ShortGPT (cosine BI)",
    "angular": "Angular distance",
    "sleb": "SLEB",
    "mi-guided": "MI-guided greedy",
    "random": "Random",
    "dense": "Dense (unpruned)",
}
MISSING = "—"  # a table cell without a value (a caption says why it is empty)


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def sel_label(method: str, verified: bool = False, healed: bool = False) -> str:
    """A method's label, marked when its selection was verified by forward passes or healed."""
    return label(method) + (" verified" if verified else "") + (" healed" if healed else "")


def proposer_label(name: str | None) -> str:
    """A verified-search proposer in the methods' words: "exact:neg-mi#2" -> "MI exact optimum
    (neg-mi), 2nd best"; "fbs-pool@1" -> "MI-PRUN (FBS) pool, iteration 1"; "swap:fbs" -> "swap
    from MI-PRUN (FBS)"; "put-back:3" -> "block 3 put back". Unknown names are returned as they are."""
    if not name:
        return MISSING
    head, sep, rest = name.partition(":")
    if sep and head in ("swap", "exchange"):
        return f"{head} from {proposer_label(rest)}"
    if sep and head == "put-back":
        return f"block {rest} put back"
    if sep and head == "exact":
        cost, _, rank = rest.partition("#")
        return f"{label('exact')} ({cost})" + (f", {_ordinal(int(rank))} best" if rank.isdigit() and rank != "1" else "")
    m = re.fullmatch(r"fbs-pool@(\d+)", name)
    if m:
        return f"{label('fbs')} pool, iteration {m.group(1)}"
    m = re.fullmatch(r"angular#(\d+)", name)
    if m:
        return f"{label('angular')}, window {m.group(1)}"
    if name == "topk-unprotected":
        return f"{label('topk')}, ends unprotected"
    return label(name)


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


__all__ = ["METHOD_LABELS", "MISSING", "label", "proposer_label", "sel_label"]
