"""Healing benchmark: perplexity of pruned models without and with the closed-form bridges.

`heal_rows(loaded, calib, eval_text, removed_sets, ...)` returns one row per removed set: the
unhealed and healed perplexity under one stated protocol, the healing time and each run's fit.

    python benchmarks/heal_bench.py --quick                       # tiny random model, seconds
    MI_PRUN_DATA_DIR=../shared/data python benchmarks/heal_bench.py --model smollm2-135m \\
        --calib wikitext2 --samples 32 --tokens 256 --windows 40 --sets 14-17 12-18,25 12-19,25-26

Blocks are numbered from 0; a set is written as comma-separated blocks or ranges (inclusive).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mi_prun.config import HealConfig  # noqa: E402
from mi_prun.data import Calibration  # noqa: E402


def heal_rows(loaded: Any, calib: Calibration, eval_text: str, removed_sets: Iterable[Sequence[int]], *,
              config: HealConfig | None = None, seq_len: int = 256, max_windows: int | None = None,
              batch_size: int = 4, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per removed set: {"removed", "n", "ppl_unhealed", "ppl_healed", "heal_seconds",
    "runs" (each run's ridge and unexplained variance before / after), "protocol"}; the first row
    is the dense model (n = 0). `loaded` is a `LoadedModel` and is never changed."""
    from mi_prun.evaluate import perplexity
    from mi_prun.heal import heal
    from mi_prun.models import pruned_view

    def ppl(model):
        return perplexity(model, loaded.tokenizer, eval_text, seq_len=seq_len, max_windows=max_windows,
                          batch_size=batch_size)

    dense = ppl(loaded.model)
    rows: list[dict[str, Any]] = [{"removed": [], "n": 0, "ppl_unhealed": dense.ppl, "ppl_healed": dense.ppl,
                                   "heal_seconds": 0.0, "runs": [], "protocol": dense.protocol}]
    for removed in removed_sets:
        removed = sorted(int(b) for b in removed)
        plain = ppl(pruned_view(loaded.model, removed))
        t0 = time.perf_counter()
        healed, record = heal(loaded.model, removed, calib, config=config)
        seconds = time.perf_counter() - t0
        after = ppl(healed)
        rows.append({"removed": removed, "n": len(removed), "ppl_unhealed": plain.ppl, "ppl_healed": after.ppl,
                     "heal_seconds": seconds,
                     "runs": [{"blocks": [r.start, r.end - 1], "ridge": r.ridge, "ridge_choice": r.ridge_choice,
                               "unexplained_unhealed": r.unexplained_unhealed,
                               "unexplained_healed": r.unexplained_healed} for r in record.runs],
                     "protocol": after.protocol})
        if log:
            log(f"removed {removed}: {plain.ppl:.2f} -> {after.ppl:.2f} (heal {seconds:.1f} s)")
    return rows


def parse_set(text: str) -> list[int]:
    """'12-18,25' -> [12, ..., 18, 25] (ranges inclusive, blocks from 0)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model and builtin text (seconds)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wikitext2", help="calibration text (its validation split)")
    p.add_argument("--eval", default="wikitext2", help="evaluation text (its test split)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of --tokens tokens")
    p.add_argument("--ridge", type=float, default=None, help="fixed relative ridge (default: chosen per run)")
    p.add_argument("--sets", nargs="+", default=["14-17", "12-18,25", "12-19,25-26"])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    from mi_prun.data import calibration_tokens, load_text
    from mi_prun.runtime import load_model

    if args.quick:
        args.model, args.calib, args.eval = "tiny-llama", "builtin", "builtin"
        args.samples, args.tokens, args.windows, args.sets = 8, 64, 4, ["2-3", "1,3-4"]
    loaded = load_model(args.model)
    cfg = HealConfig(calib=args.calib, n_samples=args.samples, seq_len=args.tokens, ridge=args.ridge)
    calib = calibration_tokens(loaded.tokenizer, load_text(cfg.calib, "calibration"), cfg.n_samples, cfg.seq_len,
                               seed=cfg.seed)
    text = load_text(args.eval, "evaluation").text
    rows = heal_rows(loaded, calib, text, [parse_set(s) for s in args.sets], config=cfg, seq_len=args.tokens,
                     max_windows=args.windows, log=print)
    result = {"command": " ".join(["python", "benchmarks/heal_bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "model": args.model, "calibration": calib.provenance, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
