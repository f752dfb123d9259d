"""What the confirmation on a fresh draw costs, before and after its lazy prefix, side by side in one run.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/confirm_cost.py --model smollm2-135m --ns 2,4,6
    python benchmarks/confirm_cost.py --quick          # tiny random model, seconds (used by the tests)

The verified search re-scores its finalists within noise on draw B (`mi_prun.select.confirm`). Its
scorer on B used to run a dense pass over every block and the head before the first finalist (the
prefix cache's, though each finalist then ran from the embeddings); it now keeps a lazy prefix
(`PrefixScorer(dense=False)`): B's dense blocks run once, only as deep as the finalists' first
removed blocks, and each finalist starts there. Per n: the shipped verified selection from a cold
NLL cache (timed: the prune as a user runs it), then the finalists it re-scored on B scored again,
both ways on a fresh cache each, alternately (before, after, after, before; the faster of each
pair's two times is kept); the NLLs of the two ways must be equal to the last bit. Per row: the
finalists re-scored, the seconds and token-block units of each way (dense blocks and sets'
blocks, the head counted as one block per token, as the race's units), and the seconds saved as a
share of the prune's.

Writes benchmarks/results/<name>.json and .md (default confirm-cost-<model>[-quick]).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from mi_prun.config import SelectConfig  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.select.confirm import fresh_tokens  # noqa: E402
from mi_prun.select.registry import make_problem  # noqa: E402
from mi_prun.select.scorer import PrefixScorer, resolve_tokens, tokens_key  # noqa: E402
from race_bench import common_parser, finish_args, load_and_analyze, peak_rss_mb, run_and_write  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = common_parser(__doc__)
    return finish_args(ap, ap.parse_args(argv), "confirm-cost", {"verify_samples": 8, "verify_seq_len": 32})


def score_b(loaded: Any, ids_b: torch.Tensor, allowed: Any, sets: list[tuple[int, ...]], lazy: bool
            ) -> tuple[float, list[float], int, int]:
    """(seconds, NLL per set, dense token-block units, the sets' units really run) on a fresh cache:
    lazy, as the confirmation now scores draw B; else as it did (a dense pass with the head, then
    every set from the embeddings)."""
    cache = NLLCache()
    cache.bind(loaded.model, tokens_key(ids_b, None))
    scorer = PrefixScorer(loaded.model, ids_b, None, 8, allowed, cache, use_prefix=lazy, dense=not lazy)
    t0 = time.perf_counter()
    nll = [scorer.score(s)[0] for s in sets]
    seconds = time.perf_counter() - t0
    pre = cache.prefix
    runner, tokens = pre["runner"], int(ids_b.numel())
    dense = tokens * (pre["prefix"].reached[0] if lazy else runner.n_blocks + 1)
    return seconds, nll, dense, int(runner.work)


def run(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    loaded, analysis, result = load_and_analyze(args, "confirm_cost.py")
    rows: list[dict[str, Any]] = result["rows"]
    for n in args.n_list:
        if not 0 < n < loaded.n_blocks:
            continue
        cfg = SelectConfig(n=n, **args.select)
        t0 = time.perf_counter()
        sel = select(analysis, config=cfg, model=loaded, cache=NLLCache())
        prune_s = time.perf_counter() - t0
        rec = sel.verification.get("confirm") or {}
        sets = [tuple(f["removed"]) for f in rec.get("finalists", []) if f.get("nll_b") is not None]
        row: dict[str, Any] = {"n": n, "removed": list(sel.removed), "prune_seconds": round(prune_s, 2),
                               "rescored": [list(s) for s in sets]}
        if sets:
            ids_a = resolve_tokens(None, loaded.tokenizer, analysis, cfg)[0]
            ids_b = fresh_tokens(cfg, analysis, loaded.tokenizer, ids_a)
            allowed = make_problem(analysis, cfg).allowed
            runs = {False: [], True: []}
            for lazy in (False, True, True, False):
                runs[lazy].append(score_b(loaded, ids_b, allowed, sets, lazy))
            for lazy, name in ((False, "before"), (True, "after")):
                best = min(runs[lazy], key=lambda r: r[0])
                row[name] = {"seconds": round(best[0], 2), "dense_units": best[2], "set_units": best[3],
                             "units": best[2] + best[3]}
            nlls = {tuple(r[1]) for rs in runs.values() for r in rs}
            if len(nlls) != 1:
                raise SystemExit(f"n = {n}: the two ways gave different NLLs on draw B: {sorted(nlls)}")
            row["nll_b"] = list(nlls.pop())
            if [f["nll_b"] for f in rec["finalists"] if f.get("nll_b") is not None] != row["nll_b"]:
                raise SystemExit(f"n = {n}: the benchmark's NLLs on draw B are not the search's")
            row["saved_seconds"] = round(row["before"]["seconds"] - row["after"]["seconds"], 2)
            row["units_after_over_before"] = round(row["after"]["units"] / row["before"]["units"], 3)
            row["saved_share_of_prune"] = round(row["saved_seconds"] / (prune_s + row["saved_seconds"]), 3)
        rows.append(row)
        if save is not None:
            save(result)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def markdown(result: dict[str, Any]) -> str:
    out = [f"# The confirmation's cost on draw B: {result['model'].get('spec', result['model'])}", "",
           f"`{result['command']}`", "", f"Analysis {result['analysis_seconds']} s; torch threads "
           f"{result['torch_threads']}; peak RSS {result.get('peak_rss_mb')} MB.", "",
           "| n | removed | prune s (after) | finalists re-scored | before: s, units | after: s, units | units after / before | s saved, share of the prune before |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if not r["rescored"]:
            out.append(f"| {r['n']} | {' '.join(map(str, r['removed']))} | {r['prune_seconds']} | none (draw A "
                       "decided) | - | - | - | - |")
            continue
        b, a = r["before"], r["after"]
        out.append(f"| {r['n']} | {' '.join(map(str, r['removed']))} | {r['prune_seconds']} | "
                   f"{'; '.join(' '.join(map(str, s)) for s in r['rescored'])} | {b['seconds']}, {b['units']:,} | "
                   f"{a['seconds']}, {a['units']:,} | {r['units_after_over_before']} | {r['saved_seconds']}, "
                   f"{r['saved_share_of_prune']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_write(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
