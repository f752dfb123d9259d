"""Are block rankings stable across calibration data? Kendall tau between disjoint subsets.

    python benchmarks/stability.py [--model smollm2-135m] [--calib wikitext2]
                                   [--subsets 3] [--samples 16] [--seq-len 256] [--quick] [--out PATH]

One draw of subsets x samples chunks of seq_len tokens (`calibration_tokens`, non-overlapping
chunks, seed 0) is split into `subsets` disjoint groups: group k is the k-th run of the drawn chunks
in text order, so the groups come from different parts of the corpus. Each group is captured on its
own; per group the script scores every block with the shipped MI estimator (`AnalysisConfig()`'s
estimator and options, first position dropped as it ships; high MI = redundant) and with cosine
Block Influence (ShortGPT, low BI = redundant), then reports per method: Kendall tau-b of the block
scores for every pair of groups and their mean, the overlap of the top-k most redundant blocks, and
the overlap of the blocks the shipped selection (`SelectConfig()`: method, run cost, end protection)
removes at the default ratio (MI) or ShortGPT removes with every block removable (BI). Writes
benchmarks/results/stability.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mi_prun.capture import capture
from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.data import calibration_tokens, load_text
from mi_prun.runtime import load_model

ROOT = Path(__file__).resolve().parent


def top_redundant(scores: np.ndarray, k: int, high_is_redundant: bool) -> list[int]:
    """The k most redundant blocks, ties to the lower block number."""
    order = sorted(range(len(scores)), key=lambda b: ((-scores[b]) if high_is_redundant else scores[b], b))
    return sorted(order[:k])


def pairwise(values: list[Any], fn) -> list[dict[str, Any]]:
    return [{"pair": [i, j], "value": fn(values[i], values[j])}
            for i, j in itertools.combinations(range(len(values)), 2)]


def overlap(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / max(1, len(a))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    vals = [r["value"] for r in rows]
    finite = [v for v in vals if v is not None and np.isfinite(v)]
    return {"pairs": rows, "mean": float(np.mean(finite)) if finite else None,
            "min": float(np.min(finite)) if finite else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default smollm2-135m (--quick: tiny-llama)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--calib", default=None, help="default wikitext2 (--quick: builtin)")
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--samples", type=int, default=None, help="samples per subset (default 16; --quick 3)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 256; --quick 32)")
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top", type=int, default=None, help="top-k overlap (default 8; --quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny random model, small sizes (seconds)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/stability.json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny-llama" if q else "smollm2-135m")
    args.calib = args.calib or ("builtin" if q else "wikitext2")
    args.samples = args.samples or (3 if q else 16)
    args.seq_len = args.seq_len or (32 if q else 256)
    args.top = args.top or (3 if q else 8)
    if args.subsets < 2:
        ap.error("--subsets must be at least 2 (rankings are compared between subsets)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import transformers

    from mi_prun.estimators import get_estimator
    from mi_prun.scores import cosine_block_influence, kendall_tau
    from mi_prun.select import resolve_n, select

    args = parse_args(argv)
    t_all = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    L = loaded.n_blocks
    k = min(args.top, L - 1)
    shipped, shipped_sel = AnalysisConfig(), SelectConfig()
    n_remove = resolve_n(L, **shipped_sel.count, protect_ends=shipped_sel.protect_ends)
    sel_cfg = shipped_sel.replace(n=n_remove)
    total = args.subsets * args.samples
    calib = calibration_tokens(loaded.tokenizer, load_text(args.calib, purpose="calibration"), total,
                               args.seq_len, seed=args.seed)
    est = get_estimator(shipped.estimator, **shipped.estimator_options)
    subsets = []
    for s in range(args.subsets):
        rows = slice(s * args.samples, (s + 1) * args.samples)
        cap = capture(loaded.model, calib.input_ids[rows], calib.attention_mask[rows],
                      max_positions=args.max_positions, drop_first=shipped.drop_first, seed=args.seed,
                      batch_size=args.batch_size)
        H = cap.hidden
        span, span_norm = est.span_matrix(H)
        mi = np.array([span[b, b + 1] for b in range(L)])
        bi = cosine_block_influence(H)
        analysis = SimpleNamespace(block_mi=mi, span=span, span_norm=span_norm, baselines={"cosine_bi": bi})
        chosen = select(analysis, config=sel_cfg)
        subsets.append({"subset": s, "samples": [s * args.samples, (s + 1) * args.samples - 1],
                        "positions": cap.m, "capture_seconds": cap.seconds,
                        "block_mi": mi.tolist(), "cosine_bi": bi.tolist(),
                        "mi_top": top_redundant(mi, k, high_is_redundant=True),
                        "bi_top": top_redundant(bi, k, high_is_redundant=False),
                        "mi_removed": list(chosen.removed),
                        "bi_removed": top_redundant(bi, n_remove, high_is_redundant=False)})
        print(f"subset {s}: {cap.m} positions, MI top-{k} {subsets[-1]['mi_top']}, "
              f"BI top-{k} {subsets[-1]['bi_top']}, {sel_cfg.method} removes {list(chosen.removed)}",
              flush=True)
        del cap, H
    methods = {
        f"mi:{est.name}": {"scores": "block_mi", "top": "mi_top", "removed": "mi_removed",
                           "redundant": "high MI",
                           "removed_by": f"{sel_cfg.method} (run cost {sel_cfg.run_cost}, protect_ends "
                                         f"{sel_cfg.protect_ends}), n={n_remove}"},
        "cosine_bi": {"scores": "cosine_bi", "top": "bi_top", "removed": "bi_removed", "redundant": "low BI",
                      "removed_by": f"ShortGPT (the lowest BI), n={n_remove}"},
    }
    results: dict[str, Any] = {}
    for name, m in methods.items():
        scores = [np.asarray(s[m["scores"]]) for s in subsets]
        tops = [s[m["top"]] for s in subsets]
        removed = [s[m["removed"]] for s in subsets]
        results[name] = {
            "redundant_means": m["redundant"],
            "kendall_tau": summarise(pairwise(scores, kendall_tau)),
            f"top{k}_overlap": summarise(pairwise(tops, overlap)),
            "removed_by": m["removed_by"],
            "removed_overlap": summarise(pairwise(removed, overlap)),
            "removed": removed,
        }
        print(f"{name}: Kendall tau mean {results[name]['kendall_tau']['mean']:.3f} "
              f"(pairs {[round(r['value'], 3) for r in results[name]['kendall_tau']['pairs']]}), "
              f"top-{k} overlap {results[name][f'top{k}_overlap']['mean']:.2f}, "
              f"removed-set overlap {results[name]['removed_overlap']['mean']:.2f}", flush=True)
    cmd = "python " + " ".join([os.path.relpath(Path(__file__).resolve(), Path.cwd())] + sys.argv[1:]) \
        if argv is None else "python benchmarks/stability.py " + " ".join(argv)
    out = {
        "command": cmd,
        "model": args.model, "n_blocks": L,
        "calibration": {"source": calib.provenance.get("source"), "subsets": args.subsets,
                        "samples_per_subset": args.samples, "seq_len": args.seq_len,
                        "max_positions": args.max_positions, "seed": args.seed,
                        "split": "one seeded draw of subsets x samples disjoint chunks, split into "
                                 "consecutive runs in text order"},
        "estimator": est.name, "estimator_options": dict(est.options), "top_k": k, "n_remove": n_remove,
        "methods": results, "subsets": subsets,
        "environment": {"device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "python": platform.python_version()},
        "seconds": time.perf_counter() - t_all,
    }
    path = Path(args.out) if args.out else ROOT / "results" / "stability.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
