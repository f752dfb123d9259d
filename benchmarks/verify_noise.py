"""Why does the verified search prefer a set that is worse on the test split? (issue 21, point 4)

For one model and one n: the default analysis and verified selection (`SelectConfig()`), and the
one-pass answers of MI (FBS), ShortGPT and the angular window, and the verified answer with its 3
finalists confirmed on fresh tokens (`verify_confirm=3`, `mi_prun.select.confirm`). For every distinct set: the mean NLL
per verification sample on the search's own 16 x 256 tokens (draw A) and on the next 16 x 256
disjoint samples of the same text (draw B, unseen by the search), and the WikiText-2 test
perplexity. Against the verified winner, each set's NLL gap with its paired standard error over
the samples (sample NLLs are strongly correlated between sets, so the paired difference is what
decides), on A and on B. This separates the three causes the issue names:
- noise / winner's curse: the winner beats the others on A by less than ~2 paired SE, and not on B;
- text: the winner beats them on A *and* B by many SE, yet loses on the test split;
- candidates: the test-best set was never scored (`scored: False`).

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verify_noise.py --model smollm2-135m --n 2
    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verify_noise.py --model /path/gemma-3-270m-q4_k_m.gguf --n 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mi_prun.config import AnalysisConfig, EvalConfig, SelectConfig  # noqa: E402
from mi_prun.data import calibration_text, verification_tokens  # noqa: E402
from mi_prun.evaluate import evaluate, token_nll  # noqa: E402
from mi_prun.models import load_model, pruned_view  # noqa: E402
from mi_prun.pipeline import analyze  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402


def per_sample(model, ids: torch.Tensor) -> list[float]:
    return [token_nll(model, ids[i:i + 1])[0] / (ids.shape[1] - 1) for i in range(ids.shape[0])]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of b - a, its standard error over samples)."""
    d = [y - x for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2-valid-nounk")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    analysis = analyze(loaded, AnalysisConfig(calib=args.calib))
    cfg = SelectConfig(n=args.n)
    cache = NLLCache()  # shared: the confirmed search below replays the same search from the cache
    sel = select(analysis, cfg, model=loaded, cache=cache)
    conf = select(analysis, cfg.replace(verify_confirm=3), model=loaded, cache=cache)
    sets = {"verified": tuple(sel.removed), "verified + confirm 3": tuple(conf.removed)}
    for m in ("fbs", "shortgpt", "angular"):
        sets.setdefault(f"{m} (one pass)", tuple(select(analysis, SelectConfig(n=args.n, method=m,
                                                                               verify_passes=0)).removed))
    calib = analysis.calibration
    text = calibration_text(calib)
    both = verification_tokens(loaded.tokenizer, text, calib, 2 * cfg.verify_samples, cfg.verify_seq_len).input_ids
    draw_a = verification_tokens(loaded.tokenizer, text, calib, cfg.verify_samples, cfg.verify_seq_len).input_ids
    in_a = {tuple(r.tolist()) for r in draw_a}
    draw_b = torch.stack([r for r in both if tuple(r.tolist()) not in in_a])
    ecfg = EvalConfig(data="wikitext2", seq_len=256, max_windows=args.eval_windows)
    scored = {tuple(r["removed"]): r for r in sel.candidates}
    info = {}
    for label, removed in sets.items():
        if removed in info:
            info[removed]["labels"].append(label)
            continue
        view = pruned_view(loaded.model, list(removed))
        info[removed] = {"labels": [label], "A": per_sample(view, draw_a), "B": per_sample(view, draw_b),
                         "test_ppl": evaluate(view, loaded.tokenizer, ecfg).ppl, "scored": removed in scored}
    win = info[sets["verified"]]
    rows = []
    for removed, v in info.items():
        ga, sa = paired(win["A"], v["A"])
        gb, sb = paired(win["B"], v["B"])
        rows.append({"removed": list(removed), "labels": v["labels"], "test_ppl": v["test_ppl"],
                     "nll_A": sum(v["A"]) / len(v["A"]), "nll_B": sum(v["B"]) / len(v["B"]),
                     "gap_A": ga, "se_A": sa, "gap_B": gb, "se_B": sb, "scored_by_search": v["scored"]})
    out = {"command": " ".join(sys.argv), "model": args.model, "n": args.n, "calib": args.calib,
           "verification": sel.verification.get("tokens"), "passes": sel.forward_passes,
           "confirm": conf.verification.get("confirm"),
           "eval": f"wikitext2 test {args.eval_windows} x 256", "seconds": time.perf_counter() - t0, "rows": rows}
    name = args.name or f"verify-noise-{Path(args.model).stem}-n{args.n}"
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.model}, n = {args.n}: verified removes {list(sets['verified'])} ({sel.forward_passes} passes); "
          f"gap = set NLL - verified NLL (nats/token), paired SE over 16 samples")
    print(f"confirmation (3 finalists, {conf.verification['confirm']['passes']} passes more): "
          + "; ".join(f"{f['removed']} A {f['nll_a']:.4f} B {f['nll_b']:.4f}" for f in conf.verification["confirm"]["finalists"]))
    print("| set | removed | test ppl | gap on A (search's tokens) | gap on B (fresh tokens) | scored |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["test_ppl"]):
        print(f"| {', '.join(r['labels'])} | {r['removed']} | {r['test_ppl']:.1f} | {r['gap_A']:+.4f} +- {r['se_A']:.4f} "
              f"| {r['gap_B']:+.4f} +- {r['se_B']:.4f} | {r['scored_by_search']} |")


if __name__ == "__main__":
    main()
