"""Does a bigger batch make a block pass cheaper per token? The question behind batching candidate sets.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/batch_rows.py --model smollm2-135m
    python benchmarks/batch_rows.py --quick        # tiny random model (used by the tests)

The verified search scores a set group by group, one batch of `verify_race_group` (4) samples of
256 tokens per call. Scoring k sets that share their first removed block "in one batched pass" would
run k x 4 rows per block call instead of 4. That only pays where a block call of 4 rows leaves the
hardware idle. This script runs the same verification-sized tokens (`--samples` x `--tokens`)
through every block and the head with the one block runner at several batch sizes (rows per call)
and reports the time per token-block unit of each, best of `--repeats` (torch's default threads).
On a CPU the per-token cost is flat from a few hundred tokens per call on, so batching sets would
buy nothing there; on a GPU the small calls are launch-bound and it would.

Writes benchmarks/results/batch-rows-<model>.json (`--out-dir`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mi_prun.runtime import BlockRunner, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,2,4,8,16", help="rows per block call to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.samples, args.tokens, args.batches, args.repeats = "tiny-llama", 8, 32, "2,8", 1
    loaded = load_model(args.model, device=args.device)
    vocab = int(loaded.model.config.vocab_size)
    ids = torch.randint(5, vocab, (args.samples, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    for bs in [int(x) for x in args.batches.split(",")]:
        runner = BlockRunner(loaded.model, ids, batch_size=bs)
        best = float("inf")
        for _ in range(args.repeats):
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.nll(runner.last(runner.h0))
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        units = args.samples * args.tokens * (runner.n_blocks + 1)
        rows.append({"rows_per_call": bs, "seconds": round(best, 4), "us_per_unit": round(1e6 * best / units, 4)})
        print(f"{bs:3d} rows per call: {best:.2f} s, {1e6 * best / units:.3f} us per token-block unit", flush=True)
    base = rows[0]["us_per_unit"]
    for r in rows:
        r["relative"] = round(r["us_per_unit"] / base, 3)
    result = {"model": args.model, "device": str(loaded.device), "samples": args.samples, "tokens": args.tokens,
              "rows": rows, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
              "command": "python benchmarks/batch_rows.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "batch-rows-" + (Path(args.model).stem if args.model.endswith(".gguf") else args.model.replace("/", "_"))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
