"""How many verification tokens does the verified search need? For every removed set of a
`quality.py --suite verified` results file: its NLL on 8, 16 and 32 x 256 verification tokens
(drawn like the verified search draws them: the calibration text apart from the capture's samples,
`mi_prun.data.verification_tokens`) against its test perplexity. Per n: Spearman's rank correlation
and the test perplexity of the set each size would pick (lowest NLL), beside the best set's.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verification_size.py \
        benchmarks/results/quality-smollm2-135m-verified-nounk.json

Every pass is a full forward pass (no prefix cache): the numbers do not depend on the search.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mi_prun.data import load_text, verification_tokens  # noqa: E402
from mi_prun.evaluate import token_nll  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402

SIZES = (8, 16, 32)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(path: str) -> None:
    res = json.loads(Path(path).read_text())
    calib = res["protocol"]["calibration"]
    loaded = load_model(res["model"] if isinstance(res["model"], str) else res["model"].get("spec", "smollm2-135m"),
                        device="cpu", dtype="float32")
    text = load_text(calib["source"], purpose="calibration")
    sets: dict[tuple, dict] = {}
    for r in res["rows"]:
        if not r.get("healed"):
            sets.setdefault(tuple(r["removed"]), {"ppl": r["ppl"], "n": r["n"], "methods": set()})["methods"].add(
                r["method"])
    for size in SIZES:
        toks = verification_tokens(loaded.tokenizer, text, calib, size, 256)
        for key, info in sets.items():
            t, c = token_nll(pruned_view(loaded.model, key), toks.input_ids, toks.attention_mask)
            info[size] = t / c
    print(f"$ MI_PRUN_DATA_DIR=../shared/data python benchmarks/verification_size.py {path}")
    for n in sorted({v["n"] for v in sets.values()}):
        rows = sorted(((k, v) for k, v in sets.items() if v["n"] == n), key=lambda kv: kv[1]["ppl"])
        print(f"n={n}")
        for k, v in rows:
            print(f"  test ppl {v['ppl']:8.1f}  " + "  ".join(f"NLL {s}x256 {v[s]:.4f}" for s in SIZES)
                  + f"  {sorted(v['methods'])} {list(k)}")
        logp = np.log([v["ppl"] for _, v in rows])
        for s in SIZES:
            pick = min(rows, key=lambda kv: kv[1][s])[1]
            print(f"  {s} x 256: Spearman(test log-ppl, NLL) = {spearman(logp, [v[s] for _, v in rows]):.2f}; "
                  f"lowest NLL has test ppl {pick['ppl']:.1f} (best {rows[0][1]['ppl']:.1f})")


if __name__ == "__main__":
    main(sys.argv[1])
