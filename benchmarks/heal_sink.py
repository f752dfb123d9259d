"""Why does healing's check drop bridges over long runs? The attention-sink position, left out of
the fit (`HealConfig.drop_first`), and what the check sees with it in.

For each removed set: the bridge of `HealConfig()` (its ridge chosen on held-out samples), with
the first position of every calibration sample dropped from the fit (the default, like the
analysis) and kept in it. Printed per set and setting: the chosen ridge, the check's held-out NLL
without the bridge and with the bridge fitted without the held-out samples (what decides
`kept`), and the held-out NLL of the bridge fitted on every sample with the check off (the bridge
healing used to fold in; those samples are in its fit). Same calibration as the healing table
(32 x 256 tokens of `wikitext2`, every 4th sample held out).

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/heal_sink.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mi_prun.config import HealConfig  # noqa: E402
from mi_prun.evaluate import token_nll  # noqa: E402
from mi_prun.heal import heal, heal_calibration  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402

SETS = ([12, 13, 14], [11, 12, 13, 14, 15, 16, 17, 18])  # runs the check dropped in the healing table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2")
    args = ap.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    cfg = HealConfig(calib=args.calib)
    calib = heal_calibration(loaded, cfg)
    period = round(1 / cfg.holdout)
    held = [i for i in range(cfg.n_samples) if i % period == period - 1]

    def held_nll(model) -> float:
        total, count = token_nll(model, calib.input_ids[held], calib.attention_mask[held])
        return total / count

    rows = []
    print("| removed | first position in the fit | ridge | held-out NLL: no bridge | check's bridge (kept?) "
          "| bridge on every sample (no check) |")
    print("|---|---|---|---|---|---|")
    for removed in SETS:
        unhealed = held_nll(pruned_view(loaded.model, removed))
        for drop_first in (True, False):
            _, rec = heal(loaded.model, removed, calib, config=cfg.replace(drop_first=drop_first))
            plain, _ = heal(loaded.model, removed, calib, config=cfg.replace(drop_first=drop_first, check=False))
            run = rec.runs[0]
            row = {"removed": removed, "drop_first": drop_first, "ridge": run.ridge, "unhealed": unhealed,
                   "check": run.holdout_nll, "kept": run.kept, "unchecked": held_nll(plain)}
            rows.append(row)
            print(f"| {removed} | {'dropped' if drop_first else 'kept'} | {run.ridge:g} | {unhealed:.3f} | "
                  f"{run.holdout_nll['with']:.3f} ({'kept' if run.kept else 'dropped'}) | {row['unchecked']:.3f} |",
                  flush=True)
    out = ROOT / "benchmarks" / "results" / "heal-sink.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
