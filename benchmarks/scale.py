"""An 8B model analysed on a CPU with its blocks streamed from disk: peak memory, cost, growth law.

    python benchmarks/scale.py --shape 8b --workdir /work/scale-model [--samples 4 --tokens 128] [--out PATH]
    python benchmarks/scale.py --shape small --sweep                    # develop / test: small shapes only

1. A randomly initialised model of Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads,
   intermediate 14336, vocab 128256) is written as bfloat16 safetensors, tensor by tensor and shard
   by shard (`mi_prun.testing.write_random_model`: never the whole model in memory; 16 GB on disk),
   under --workdir (reused when complete; never inside the repository).
2. In a fresh process: `mi-prun analyze`'s library call with `stream=True` (the blocks stream from
   the files, one block in memory at a time) on --samples x --tokens calibration tokens. Its peak
   RSS (getrusage, the whole process) is compared with the weights' size (goal: below one third).
3. In another fresh process: one streamed forward pass (`token_nll`, through the LM head) of the
   same tokens. The ratio (analysis seconds: capture + scoring) / (forward seconds) is the
   analysis's cost in forward passes (goal: <= 1.2).
4. --sweep: the same analysis on small shapes, varying the depth L, the width d and the token count
   one at a time, and the fitted log-log slope (growth exponent) of the analysis time in each.

The compute dtype is bfloat16 (--dtype; the CPU's AMX/AVX-512 bf16 units run it). Writes JSON with
every number, the command line and the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA3 = {"num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False}
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {**LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "intermediate_size": 14336, "vocab_size": 128256},
    "small": {**LLAMA3, "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
              "intermediate_size": 3584, "vocab_size": 32768},
    "tiny": {**LLAMA3, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 448, "vocab_size": 4096},
}


def shape_config(shape: str | dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**(SHAPES[shape] if isinstance(shape, str) else shape))


def ensure_model(shape: str | dict[str, Any], folder: Path, seed: int = 0) -> Path:
    """The random model of `shape` in `folder`, written (shard by shard) unless already complete."""
    import torch

    from mi_prun.testing import write_random_model

    done = folder / ".complete"
    if done.is_file():
        return folder
    write_random_model(shape_config(shape), folder, dtype=torch.bfloat16, seed=seed)
    done.write_text("ok\n")
    return folder


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------- measured in a child


def _child(kind: str, folder: str, samples: int, tokens: int, dtype: str, batch_size: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process: "analysis" or "forward"."""
    import torch

    from mi_prun.config import AnalysisConfig
    from mi_prun.evaluate import token_nll
    from mi_prun.runtime import load_model
    from mi_prun.models.memory import peak_memory
    from mi_prun.pipeline import analyze, prepare_calibration

    t0 = time.perf_counter()
    loaded = load_model(folder, device="cpu", dtype=dtype, stream=True)
    load_s = time.perf_counter() - t0
    cfg = AnalysisConfig(calib="builtin", n_samples=samples, seq_len=tokens, batch_size=batch_size,
                         max_positions=samples * tokens)
    out: dict[str, Any] = {"kind": kind, "load_seconds": load_s, "threads": torch.get_num_threads()}
    if kind == "analysis":
        analysis = analyze(loaded, cfg)
        out.update(seconds=analysis.timings["total"], capture_seconds=analysis.timings["capture"],
                   score_seconds=analysis.timings["score"], block_mi=[float(x) for x in analysis.block_mi],
                   resources=analysis.resources)
    else:
        calib = prepare_calibration(loaded, cfg)
        t1 = time.perf_counter()
        total, count = token_nll(loaded.model, calib.input_ids, calib.attention_mask, batch_size=batch_size)
        out.update(seconds=time.perf_counter() - t1, nll=total / count, tokens_scored=count)
    out["peak_memory"] = peak_memory()
    return out


def measure(kind: str, folder: Path, samples: int, tokens: int, dtype: str, batch_size: int) -> dict[str, Any]:
    """`_child` in a fresh Python process, so that its peak RSS is its own."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.scale import _child; "
            f"print('RESULT', json.dumps(_child({kind!r}, {str(folder)!r}, {samples}, {tokens}, {dtype!r}, {batch_size})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def headline(folder: Path, samples: int, tokens: int, dtype: str, batch_size: int) -> dict[str, Any]:
    size = weights_size(folder)
    analysis = measure("analysis", folder, samples, tokens, dtype, batch_size)
    forward = measure("forward", folder, samples, tokens, dtype, batch_size)
    rss = analysis["peak_memory"]["rss_peak_bytes"]
    return {"weights_bytes": size, "samples": samples, "tokens": tokens, "dtype": dtype, "analysis": analysis,
            "forward": forward, "analysis_peak_rss_bytes": rss, "rss_over_weights": rss / size,
            "rss_goal_met": rss < size / 3, "ratio_analysis_over_forward": analysis["seconds"] / forward["seconds"],
            "ratio_goal_met": analysis["seconds"] / forward["seconds"] <= 1.2}


# ------------------------------------------------------------------------------------------ sweep


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _analysis_seconds(shape: dict[str, Any], folder: Path, samples: int, tokens: int, dtype: str) -> float:
    from mi_prun.config import AnalysisConfig
    from mi_prun.runtime import load_model
    from mi_prun.pipeline import analyze

    ensure_model(shape, folder)
    loaded = load_model(folder, device="cpu", dtype=dtype, stream=True)
    cfg = AnalysisConfig(calib="builtin", n_samples=samples, seq_len=tokens, batch_size=samples,
                         max_positions=samples * tokens)
    best = math.inf
    for _ in range(2):  # the faster of two: less noise from other processes on the machine
        best = min(best, analyze(loaded, cfg).timings["total"])
    return best


def sweep(base: str, workdir: Path, dtype: str) -> dict[str, Any]:
    """Analysis time against L, d and the token count, one at a time around `base`; fitted exponents."""
    cfg = dict(SHAPES[base])
    d0, L0 = cfg["hidden_size"], cfg["num_hidden_layers"]

    def shape(d: int, L: int) -> dict[str, Any]:
        heads = max(2, d // 128)
        return {**cfg, "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": heads,
                "num_key_value_heads": max(1, heads // 4), "intermediate_size": int(3.5 * d)}

    rows: dict[str, list[dict[str, Any]]] = {"L": [], "d": [], "tokens": []}
    for L in (L0 // 2, L0, 2 * L0):
        s = shape(d0, L)
        rows["L"].append({"L": L, "seconds": _analysis_seconds(s, workdir / f"sweep-d{d0}-L{L}", 4, 128, dtype)})
    for d in (d0 // 2, d0, 2 * d0):
        s = shape(d, L0)
        rows["d"].append({"d": d, "seconds": _analysis_seconds(s, workdir / f"sweep-d{d}-L{L0}", 4, 128, dtype)})
    for n, t in ((2, 128), (4, 128), (8, 128), (8, 256)):
        s = shape(d0, L0)
        rows["tokens"].append({"tokens": n * t, "samples": n, "seq_len": t,
                               "seconds": _analysis_seconds(s, workdir / f"sweep-d{d0}-L{L0}", n, t, dtype)})
    exps = {k: _slope([r[k] for r in rs], [r["seconds"] for r in rs]) for k, rs in rows.items()}
    return {"base": base, "rows": rows, "exponents": exps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--workdir", default="/work/scale-model", help="where the random models are written (not the repo)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sweep", action="store_true", help="also fit the growth exponents in L, d and tokens "
                                                          "(small shapes around --sweep-base)")
    ap.add_argument("--sweep-base", default="small", choices=sorted(SHAPES))
    ap.add_argument("--no-headline", action="store_true", help="only the sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir).expanduser().resolve()
    if ROOT in workdir.parents or workdir == ROOT:
        print(f"scale.py: --workdir {workdir} is inside the repository; the models are large. Fix: give a folder "
              "outside it.", file=sys.stderr)
        return 2
    import torch

    result: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "threads": torch.get_num_threads()}}
    if not args.no_headline:
        folder = workdir / f"llama3-{args.shape}"
        t0 = time.perf_counter()
        ensure_model(args.shape, folder)
        result["write_seconds"] = time.perf_counter() - t0
        result["shape"] = {"name": args.shape, **SHAPES[args.shape]}
        result["headline"] = h = headline(folder, args.samples, args.tokens, args.dtype, args.batch_size)
        gib = 2**30
        print(f"{args.shape}: weights {h['weights_bytes'] / gib:.2f} GiB (bf16 safetensors); analysis with offload on "
              f"{args.samples} x {args.tokens} tokens: {h['analysis']['seconds']:.1f} s, peak RSS "
              f"{h['analysis_peak_rss_bytes'] / gib:.2f} GiB = {h['rss_over_weights']:.3f} of the weights "
              f"(goal < 1/3: {'met' if h['rss_goal_met'] else 'NOT met'}); one streamed forward pass "
              f"{h['forward']['seconds']:.1f} s; analysis / forward = {h['ratio_analysis_over_forward']:.3f} "
              f"(goal <= 1.2: {'met' if h['ratio_goal_met'] else 'NOT met'})")
    if args.sweep:
        result["sweep"] = sw = sweep(args.sweep_base, workdir, args.dtype)
        print("analysis time grows as " + ", ".join(f"{k}^{v:.2f}" for k, v in sw["exponents"].items())
              + f" (fitted on {args.sweep_base} shapes, one variable at a time)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
