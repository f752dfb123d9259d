"""Verify after healing: does scoring every verified-search candidate *healed* pick a better set to
heal than the healing default (the one-pass FBS answer, `SelectConfig.for_healing()`)?

For each n: the verified search's candidate sets (one analysis with the shipped defaults, the
quality benchmark's calibration); each candidate healed with the closed-form bridges (HealConfig()
on the capture's calibration tokens) and scored by NLL on the verification tokens; the best one and
the healing default are evaluated healed on the WikiText-2 test windows of quality.py.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/heal_verify.py --ns 4,8 \\
        --out benchmarks/results/heal-verify.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mi_prun.config import AnalysisConfig, HealConfig, SelectConfig  # noqa: E402
from mi_prun.data import calibration_text, load_text, verification_tokens  # noqa: E402
from mi_prun.evaluate import perplexity, token_nll  # noqa: E402
from mi_prun.heal import check_healable, heal  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analysis_from_capture, prepare_calibration, run_capture  # noqa: E402
from mi_prun.select import select  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="4,8")
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    cfg = AnalysisConfig(calib=args.calib, n_samples=32, seq_len=256)
    calib = prepare_calibration(loaded, cfg)
    analysis = analysis_from_capture(loaded, calib, run_capture(loaded, calib, cfg), cfg)
    scfg = SelectConfig()
    tokens = verification_tokens(loaded.tokenizer, calibration_text(analysis.calibration), analysis.calibration,
                                 scfg.verify_samples, scfg.verify_seq_len)
    test = load_text("wikitext2", purpose="evaluation").text
    out = {"command": "python benchmarks/heal_verify.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": []}
    for n in [int(x) for x in args.ns.split(",")]:
        verified = select(analysis, config=scfg.replace(n=n), model=loaded, tokens=tokens.input_ids)
        default = tuple(select(analysis, SelectConfig.for_healing(n=n)).removed)
        sets = {c.removed: list(c.proposers) for c in verified.candidates}
        sets.setdefault(default, ["fbs (one pass)"])
        scored = []
        for removed, who in sets.items():
            try:
                check_healable(loaded.model, removed)
            except Exception as exc:  # a refusal is a result too
                scored.append({"removed": list(removed), "proposers": who, "refused": str(exc)})
                continue
            healed, _ = heal(loaded.model, removed, calib, config=HealConfig())
            total, count = token_nll(healed, tokens.input_ids)
            scored.append({"removed": list(removed), "proposers": who, "healed_nll": total / count})
            print(f"n={n} {list(removed)} healed NLL {total / count:.4f} ({who[0]})", flush=True)
        ok = [s for s in scored if "healed_nll" in s]
        best = min(ok, key=lambda s: s["healed_nll"])
        row = {"n": n, "candidates": scored, "best_healed": best["removed"], "default": list(default)}
        for name, removed in (("best_healed", best["removed"]), ("default", list(default))):
            healed, _ = heal(loaded.model, removed, calib, config=HealConfig())
            row[f"{name}_test_ppl"] = perplexity(healed, loaded.tokenizer, test, max_windows=args.eval_windows).ppl
        print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), flush=True)
        out["rows"].append(row)
    out["seconds"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
