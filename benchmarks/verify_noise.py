"""Does the verified search prefer sets that are worse on the test split, and does its
confirmation fix it? (issue 21, point 4)

For one model and one calibration text, one default analysis, and for every n asked: the
verified search without confirmation (`verify_confirm=0`, the search alone), the default
(`SelectConfig()`: the finalists within 2 paired SE of the winner re-scored on a fresh draw,
`mi_prun.select.confirm`), and the one-pass answers of MI (FBS), ShortGPT and the angular window.
For every distinct set: the mean NLL per verification sample on the search's own 16 x 256 tokens
(draw A) and on the next 16 x 256 disjoint samples of the same text (draw B, the confirmation's
draw), and the WikiText-2 test perplexity. Against the search's winner, each set's NLL gap with
its paired standard error over the samples (sample NLLs are strongly correlated between sets, so
the paired difference is what decides), on A and on B. This separates the causes the issue names:
- noise / winner's curse: the winner beats the others on A by less than ~2 paired SE, and not on B;
- text: the winner beats them on A *and* B by many SE, yet loses on the test split;
- candidates: the test-best set was never scored (`scored: False`).

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verify_noise.py --model smollm2-135m --ns 2,4,6,8,10
    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verify_noise.py --model /path/gemma-3-270m-q4_k_m.gguf --ns 2,4,6

Writes results/verify-noise-<model>-<calib>.json and .md (the table printed).
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

from mi_prun.config import AnalysisConfig, EvalConfig, SelectConfig  # noqa: E402
from mi_prun.evaluate import evaluate  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analyze  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.select.confirm import fresh_tokens, paired_gap  # noqa: E402
from mi_prun.select.registry import make_problem  # noqa: E402
from mi_prun.select.scorer import PrefixScorer, model_scorer, tokens_key  # noqa: E402

ONE_PASS = ("fbs", "shortgpt", "angular")


def one_n(loaded, analysis, n: int, eval_cfg: EvalConfig, ppl: dict) -> dict:
    """Every set of one n, scored on A, B and the test split (module docstring)."""
    cfg = SelectConfig(n=n)
    problem = make_problem(analysis, cfg)
    cache = NLLCache()  # shared: the default replays the search from the cache, then confirms
    t0 = time.perf_counter()
    plain = select(analysis, cfg.replace(verify_confirm=0), model=loaded, cache=cache)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    conf = select(analysis, cfg, model=loaded, cache=cache)
    t_conf = time.perf_counter() - t0
    sets = {"verified, no confirmation": tuple(plain.removed), "verified (default, confirmed)": tuple(conf.removed)}
    for m in ONE_PASS:
        sets.setdefault(f"{m} (one pass)", tuple(select(analysis, SelectConfig(n=n, method=m,
                                                                               verify_passes=0)).removed))
    a = model_scorer(loaded, analysis, cfg, n_blocks=problem.n_blocks, starts=problem.allowed, cache=cache)
    draw_b = fresh_tokens(cfg, analysis, loaded.tokenizer, a.ids)
    cache_b = cache.fresh if cache.fresh is not None else NLLCache()  # the confirmation's draw B, as scored
    cache_b.bind(loaded.model, tokens_key(draw_b, None))
    b = PrefixScorer(loaded.model, draw_b, None, 8, problem.allowed, cache_b, dense=False)
    scored = {r.removed for r in plain.candidates}
    info: dict = {}
    for label, removed in sets.items():
        if removed in info:
            info[removed]["labels"].append(label)
            continue
        a.score(removed)
        b.score(removed)
        if removed not in ppl:
            ppl[removed] = evaluate(pruned_view(loaded.model, list(removed)), loaded.tokenizer, eval_cfg).ppl
        info[removed] = {"labels": [label], "A": a.sample_nll(removed), "B": b.sample_nll(removed),
                         "test_ppl": ppl[removed], "scored": removed in scored}
    win = info[sets["verified, no confirmation"]]
    rows = []
    for removed, v in info.items():
        ga, sa = paired_gap(win["A"], v["A"]) or (0.0, 0.0)
        gb, sb = paired_gap(win["B"], v["B"]) or (0.0, 0.0)
        rows.append({"removed": list(removed), "labels": v["labels"], "test_ppl": v["test_ppl"],
                     "nll_A": sum(v["A"]) / len(v["A"]), "nll_B": sum(v["B"]) / len(v["B"]),
                     "gap_A": ga, "se_A": sa, "gap_B": gb, "se_B": sb, "scored_by_search": v["scored"]})
    best_one = min(ppl[sets[f"{m} (one pass)"]] for m in ONE_PASS)
    rec = conf.verification.get("confirm", {})
    return {"n": n, "passes": plain.forward_passes, "confirm_passes": rec.get("passes", 0),
            "confirm": rec, "seconds_search": t_plain, "seconds_confirm": t_conf,
            "verified_ppl": ppl[sets["verified (default, confirmed)"]],
            "unconfirmed_ppl": ppl[sets["verified, no confirmation"]], "best_one_pass_ppl": best_one,
            "rows": rows}


def table(out: dict) -> str:
    lines = [f"{out['model']}, calibration and verification on `{out['calib']}`, test ppl on {out['eval']} "
             f"(dense {out['dense_ppl']:.1f}); gap = set NLL - the search's winner's NLL (nats/token) +- paired SE "
             "over 16 samples", "",
             "| n | set | removed | test ppl | gap on A (search's tokens) | gap on B (fresh) | scored |",
             "|---|---|---|---|---|---|---|"]
    for r_n in out["per_n"]:
        for r in sorted(r_n["rows"], key=lambda r: r["test_ppl"]):
            lines.append(f"| {r_n['n']} | {', '.join(r['labels'])} | {r['removed']} | {r['test_ppl']:.1f} | "
                         f"{r['gap_A']:+.4f} +- {r['se_A']:.4f} | {r['gap_B']:+.4f} +- {r['se_B']:.4f} | "
                         f"{r['scored_by_search']} |")
    lines += ["", "| n | search passes | confirmation passes | re-scored | changed | verified (default) | "
              "no confirmation | best one-pass | default / best one-pass |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["per_n"]:
        c = r["confirm"]
        lines.append(f"| {r['n']} | {r['passes']} | {r['confirm_passes']} | {c.get('rescored', 0)} | "
                     f"{c.get('changed', False)} | {r['verified_ppl']:.1f} | {r['unconfirmed_ppl']:.1f} | "
                     f"{r['best_one_pass_ppl']:.1f} | {r['verified_ppl'] / r['best_one_pass_ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--ns", default="2")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    analysis = analyze(loaded, AnalysisConfig(calib=args.calib))
    eval_cfg = EvalConfig(data="wikitext2", seq_len=256, max_windows=args.eval_windows)
    ppl: dict = {}
    out = {"command": "python " + " ".join(sys.argv), "model": args.model, "calib": args.calib,
           "eval": f"wikitext2 test {args.eval_windows} x 256",
           "dense_ppl": evaluate(loaded.model, loaded.tokenizer, eval_cfg).ppl, "per_n": []}
    name = args.name or f"verify-noise-{Path(args.model).stem}-{args.calib}"
    for n in ns:
        out["per_n"].append(one_n(loaded, analysis, n, eval_cfg, ppl))
        out["seconds"] = time.perf_counter() - t0
        (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"n = {n} done ({out['seconds']:.0f} s)", flush=True)
    text = table(out)
    (ROOT / "benchmarks" / "results" / f"{name}.md").write_text(f"```\n{out['command']}\n```\n\n" + text)
    print(text)
    worst = max(r["verified_ppl"] / r["best_one_pass_ppl"] for r in out["per_n"])
    print(f"largest ratio of the default to the best one-pass answer: {worst:.3f}"
          + ("" if math.isfinite(worst) else " (non-finite)"))


if __name__ == "__main__":
    main()
