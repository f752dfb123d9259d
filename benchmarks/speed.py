"""Speed and scaling of MI-PRUN, as ratios measured in one run.

    python benchmarks/speed.py [--model smollm2-135m] [--device auto] [--quick] [--out PATH]
                               [--sections capture,span,memory,select,e2e] [--synthetic-shapes]

Sections (each a ratio where a ratio is the honest form):
  capture  capture time over a plain forward pass on the same batches, interleaved repeats
           (forward, body forward, capture, rotated each repeat), median ratio. The capture stops
           after the last block (no final norm, no LM head), so against the full forward it can be
           below 1; the "body" forward (the model without its LM head) isolates the hook overhead.
  span     span-matrix time of the default estimator on synthetic captures (L+1, m, d) shaped like
           0.1B, 1B and 7B models, and sweeps over m, L and d separately with the fitted log-log
           slope (the growth exponent) per variable.
  memory   peak memory of a capture against the calibration size N: the capture's stored bytes and
           the peak increase during the capture, each N in a fresh process (CPU, except --quick: VmHWM reset
           through /proc/self/clear_refs, and ru_maxrss), or torch.cuda.max_memory_allocated (GPU).
  select   Fast-Block-Select against the exact optimum (dynamic programme) against exhaustive
           enumeration on the span matrix of a real analysis: time, objective, gap, per n. The
           shipped run cost (SelectConfig().run_cost), every block removable (no end protection),
           so the search space is C(L, n).
  e2e      end-to-end analysis time (tokenise + capture + score, the model load excluded: the
           analysis's timings["total"]; its load is timings["load_model"]) plus FBS, against
           SLEB-style selection (sleb_select) on the same calibration tokens, both with every block
           removable; SLEB is greedy, so its first 4 steps are exactly its n=4 answer, and one n=8
           run times both.

`--model random-llama2-7b` builds a randomly initialised model of Llama-2-7B's shape from a
LlamaConfig (no download; timing needs no trained weights) and feeds random token ids;
`random-llama-tiny` is the same builder with tiny dimensions (used by --quick). Writes JSON with
every number, the command line, device, library versions and thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mi_prun.capture import capture
from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.data import Calibration, calibration_tokens, load_text
from mi_prun.runtime import LoadedModel, load_model, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parent
SECTIONS = ("capture", "span", "memory", "select", "e2e")

# Shapes of randomly initialised Llama models (LlamaConfig keyword arguments).
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "random-llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                             max_position_embeddings=4096),
    "random-llama-tiny": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=172, vocab_size=1000,
                              max_position_embeddings=512),
}

# Synthetic capture shapes (L blocks, d hidden size) of real model families.
MODEL_SHAPES: dict[str, tuple[int, int]] = {
    "0.1B-like (SmolLM2-135M: L=30, d=576)": (30, 576),
    "1B-like (Llama-3.2-1B: L=16, d=2048)": (16, 2048),
    "1B-like (TinyLlama-1.1B: L=22, d=2048)": (22, 2048),
    "7B-like (Llama-2-7B: L=32, d=4096)": (32, 4096),
}

# Sizes per mode. CPU sizes keep the whole run within ~10 minutes on 2 shared cores.
SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(calib_n=4, calib_t=32, batch_size=2, repeats=2,
                  span_m=32, span_shapes=1, span_base=(4, 64, 32), span_repeats=1,
                  sweep_m=[32, 64, 128], sweep_L=[2, 4, 8], sweep_d=[16, 32, 64],
                  mem_ns=[2, 4], mem_t=16, mem_fresh_process=False, select_calib=(4, 32), select_ns=[2, 3],
                  select_methods=["fbs", "exhaustive"], max_combinations=16, select_repeats=1,
                  e2e_calib=(2, 16), sleb_ns=[1, 2]),
    # CPU sizes were cut to what 2 cores shared with other engineers finish in ~15 minutes.
    "cpu": dict(calib_n=2, calib_t=128, batch_size=2, repeats=3,
                span_m=256, span_shapes=len(MODEL_SHAPES), span_base=(16, 256, 512), span_repeats=1,
                sweep_m=[128, 256, 512, 1024], sweep_L=[4, 8, 16, 32], sweep_d=[128, 256, 512, 1024],
                mem_ns=[4, 8, 16, 32], mem_t=32, select_calib=(4, 256), select_ns=list(range(2, 11)),
                select_methods=["fbs", "exact", "exhaustive"], max_combinations=2_000_000,
                select_repeats=5, e2e_calib=(2, 16), sleb_ns=[4, 8]),
    "gpu": dict(calib_n=16, calib_t=1024, batch_size=4, repeats=5,
                span_m=4096, span_shapes=len(MODEL_SHAPES), span_base=(32, 4096, 4096), span_repeats=3,
                sweep_m=[1024, 2048, 4096, 8192], sweep_L=[8, 16, 32, 64], sweep_d=[1024, 2048, 4096, 8192],
                mem_ns=[8, 16, 32, 64], mem_t=512, select_calib=(32, 256), select_ns=list(range(2, 11)),
                select_methods=["fbs", "exact", "exhaustive"], max_combinations=2_000_000,
                select_repeats=5, e2e_calib=(8, 256), sleb_ns=[4, 8]),
}


# ----------------------------------------------------------------------------------------------
# models and tokens


def build_random_llama(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                       seed: int = 0, shape: dict[str, int] | None = None) -> LoadedModel:
    """A randomly initialised Llama of `RANDOM_SHAPES[name]` (or `shape`), built directly on `device`.

    No download and no tokenizer: callers feed random token ids. The weights are created where
    they will live (`torch.device` context), so a 7B model never passes through CPU memory.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    dims = dict(shape or RANDOM_SHAPES[name])
    config = LlamaConfig(**dims)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    if next(model.parameters()).device.type != dev.type:
        model = model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, spec=name, source="LlamaConfig, random weights",
                       model_type="llama", device=dev, dtype=dt, load_seconds=time.perf_counter() - t0,
                       info={"random_weights": True, "shape": dims})


def get_model(spec: str, device: str, dtype: str) -> LoadedModel:
    if spec in RANDOM_SHAPES:
        return build_random_llama(spec, device, dtype)
    return load_model(spec, device=device, dtype=dtype)


def get_calibration(loaded: LoadedModel, calib: str, n: int, t: int, seed: int = 0) -> Calibration:
    """N x T tokens: text through the tokenizer, or seeded random ids for a tokenizer-less model."""
    if loaded.tokenizer is not None:
        return calibration_tokens(loaded.tokenizer, load_text(calib, purpose="calibration"), n, t, seed=seed)
    vocab = int(loaded.model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    return Calibration(input_ids=ids, attention_mask=torch.ones_like(ids),
                       provenance={"source": "random token ids", "n_samples": n, "seq_len": t, "seed": seed})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def slope(xs: list[float], ts: list[float]) -> float:
    """Least-squares slope of log t against log x: t ~ x^slope."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ts, float)), 1)[0])


# ----------------------------------------------------------------------------------------------
# capture versus forward


def bench_capture(loaded: LoadedModel, calib: Calibration, batch_size: int, repeats: int,
                  max_positions: int) -> dict[str, Any]:
    model, dev = loaded.model, loaded.device
    body = model.base_model  # the model without its LM head (runs the final norm)
    ids, mask = calib.input_ids, calib.attention_mask
    batches = [(ids[s:s + batch_size].to(dev), mask[s:s + batch_size].to(dev))
               for s in range(0, ids.shape[0], batch_size)]

    @torch.no_grad()
    def forward_full() -> None:
        for x, m in batches:
            model(input_ids=x, attention_mask=m, use_cache=False)

    @torch.no_grad()
    def forward_body() -> None:
        for x, m in batches:
            body(input_ids=x, attention_mask=m, use_cache=False)

    def run_capture() -> None:
        capture(model, ids, mask, max_positions=max_positions, drop_first=AnalysisConfig().drop_first,
                seed=0, batch_size=batch_size)

    kinds = {"forward": forward_full, "forward_body": forward_body, "capture": run_capture}
    # Warm-up on the first batch (allocator, kernels, lazy inits), not timed.
    with torch.no_grad():
        x, m = batches[0]
        model(input_ids=x, attention_mask=m, use_cache=False)
    capture(model, ids[:batch_size], mask[:batch_size], max_positions=max_positions, batch_size=batch_size)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(repeats):
        for k in order[r % 3:] + order[:r % 3]:  # rotate so no kind always runs first
            times[k].append(timed(kinds[k], dev)[0])
    r_full = [c / f for c, f in zip(times["capture"], times["forward"])]
    r_body = [c / f for c, f in zip(times["capture"], times["forward_body"])]
    tokens = int(mask.sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "calibration": {"n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": tokens,
                        "batch_size": batch_size, "max_positions": max_positions,
                        "source": calib.provenance.get("source")},
        "repeats": repeats,
        "seconds": times,
        "ratio_capture_over_forward": r_full,
        "ratio_capture_over_forward_body": r_body,
        "median_ratio_capture_over_forward": statistics.median(r_full),
        "median_ratio_capture_over_forward_body": statistics.median(r_body),
        "target_max_ratio": 1.10,
        "capture_tokens_per_s": tokens / med["capture"],
        "forward_tokens_per_s": tokens / med["forward"],
        "note": "capture stops after the last block (no final norm, no LM head); forward_body is "
                "the model without its LM head (base_model), which isolates the hook overhead",
    }


# ----------------------------------------------------------------------------------------------
# span-matrix scaling


def synthetic_capture(L: int, m: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(L+1, m, d) float32 shaped like a residual stream: h_{b+1} = h_b + small update."""
    gen = torch.Generator(device=device).manual_seed(seed)
    H = torch.empty((L + 1, m, d), dtype=torch.float32, device=device)
    H[0] = torch.randn(m, d, generator=gen, device=device)
    for b in range(L):
        H[b + 1] = H[b] + 0.3 * torch.randn(m, d, generator=gen, device=device)
    return H


def bench_span(device: torch.device, sizes: dict[str, Any], estimator_name: str,
               estimator_options: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from mi_prun.estimators import get_estimator

    est = get_estimator(estimator_name, **estimator_options)
    reps = sizes["span_repeats"]

    def run(L: int, m: int, d: int) -> float:
        H = synthetic_capture(L, m, d, device)
        est.span_matrix(H[:, : min(m, 64)])  # warm-up at tiny m
        ts = [timed(lambda H=H: est.span_matrix(H), device)[0] for _ in range(reps)]
        del H
        gc.collect()
        return min(ts)  # the least disturbed of the repeats (shared machine)

    shapes = []
    m = sizes["span_m"]
    for label, (L, d) in list(MODEL_SHAPES.items())[: sizes["span_shapes"]]:
        t = run(L, m, d)
        shapes.append({"shape": label, "L": L, "m": m, "d": d, "seconds": t,
                       "pairs": (L + 1) * L // 2, "capture_bytes": (L + 1) * m * d * 4})
        log(f"  span {label}, m={m}: {t:.3f} s")
    L0, m0, d0 = sizes["span_base"]
    sweeps: dict[str, Any] = {}
    for var, values in (("m", sizes["sweep_m"]), ("L", sizes["sweep_L"]), ("d", sizes["sweep_d"])):
        rows = []
        for v in values:
            L, mm, d = (v if var == "L" else L0), (v if var == "m" else m0), (v if var == "d" else d0)
            rows.append({"L": L, "m": mm, "d": d, "seconds": run(L, mm, d)})
        xs = [r[var] for r in rows]
        ts = [r["seconds"] for r in rows]
        # For L also the slope against the number of span cells (L+1)^2 / 2, the quantity that
        # grows quadratically.
        extra = {}
        if var == "L":
            extra["exponent_vs_L_plus_1"] = slope([x + 1 for x in xs], ts)
        sweeps[var] = {"fixed": {k: v for k, v in (("L", L0), ("m", m0), ("d", d0)) if k != var},
                       "rows": rows, "exponent": slope(xs, ts), **extra}
        log(f"  span sweep over {var} {xs}: t ~ {var}^{sweeps[var]['exponent']:.2f}")
    return {
        "estimator": est.name, "estimator_options": dict(est.options),
        "timing": f"min of {reps} repeats after a warm-up, synthetic float32 captures on {device.type}",
        "m_for_model_shapes": m,
        "note": ("CPU run: m kept small (the library default is max_positions=4096); time is linear "
                 "in m (see the m sweep), so the 4096 time is about 4096/m times the one shown")
        if device.type == "cpu" and m < 4096 else "",
        "model_shapes": shapes,
        "sweeps": sweeps,
        "growth_law": {k: v["exponent"] for k, v in sweeps.items()},
    }


# ----------------------------------------------------------------------------------------------
# peak memory of a capture against calibration size


def _hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(spec: str, device: str, dtype: str, calib: str, n: int, t: int, max_positions: int,
                 batch_size: int, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """One capture of N x T tokens in this (fresh, on CPU) process; peak memory during it."""
    loaded = loaded or get_model(spec, device, dtype)
    cal = get_calibration(loaded, calib, n, t)
    dev = loaded.device
    gc.collect()
    out: dict[str, Any] = {"n_samples": n, "seq_len": t, "tokens": int(cal.attention_mask.sum())}
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        out["hwm_reset"] = _reset_hwm()
        rss0 = _rss_kib()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cap = capture(loaded.model, cal.input_ids, cal.attention_mask, max_positions=max_positions,
                  drop_first=AnalysisConfig().drop_first, seed=0, batch_size=batch_size)
    out["capture_bytes"] = int(cap.hidden.element_size() * cap.hidden.nelement())
    out["positions_kept"] = cap.m
    out["seconds"] = cap.seconds
    if dev.type == "cuda":
        sync(dev)
        out["peak_increase_bytes"] = int(torch.cuda.max_memory_allocated(dev) - base)
        out["how"] = "torch.cuda.max_memory_allocated - memory_allocated before the capture"
    else:
        hwm = _hwm_kib()
        out["rss_before_bytes"] = None if rss0 is None else rss0 * 1024
        out["peak_increase_bytes"] = None if (hwm is None or rss0 is None or not out["hwm_reset"]) \
            else (hwm - rss0) * 1024
        out["ru_maxrss_increase_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) * 1024
        out["how"] = ("VmHWM after the capture - VmRSS before it, VmHWM reset through "
                      "/proc/self/clear_refs; ru_maxrss delta alongside")
    L, d = cap.hidden.shape[0] - 1, cap.hidden.shape[2]
    out["all_hidden_states_bytes"] = int((L + 1) * out["tokens"] * d * 4)  # storing everything
    return out


def bench_memory(args: argparse.Namespace, loaded: LoadedModel, sizes: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, Any]:
    t = sizes["mem_t"]
    ns = sizes["mem_ns"]
    # Keep m fixed for every N: the smallest calibration must already fill it.
    max_positions = min(ns) * (t - 1 if AnalysisConfig().drop_first else t)
    batch_size = min(8, min(ns))
    rows: list[dict[str, Any]] = []
    fresh = loaded.device.type != "cuda" and sizes.get("mem_fresh_process", True)
    if not fresh:  # GPU: max_memory_allocated is exact in-process; --quick: speed over exactness
        for n in ns:
            rows.append(memory_child(args.model, str(loaded.device), args.dtype, args.calib, n, t,
                                     max_positions, batch_size, loaded=loaded))
    else:
        def cmd(n: int) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n),
                    "--model", args.model, "--device", str(loaded.device), "--dtype", args.dtype,
                    "--calib", args.calib, "--mem-seq-len", str(t), "--mem-max-positions",
                    str(max_positions), "--mem-batch-size", str(batch_size)]

        def finish(n: int, proc: subprocess.Popen) -> dict[str, Any]:
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory child for N={n} failed:\n{stderr[-3000:]}")
            return json.loads(stdout.strip().splitlines()[-1])

        popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rows = [finish(n, subprocess.Popen(cmd(n), **popen)) for n in ns]
    for row in rows:
        log(f"  memory N={row['n_samples']}: capture {row['capture_bytes'] / 2**20:.1f} MiB, peak increase "
            f"{(row['peak_increase_bytes'] or 0) / 2**20:.1f} MiB")
    peaks = [r["peak_increase_bytes"] for r in rows if r["peak_increase_bytes"] is not None]
    stored = [r["capture_bytes"] for r in rows]
    return {
        "seq_len": t, "n_samples": ns, "max_positions": max_positions, "batch_size": batch_size,
        "fresh_process_per_n": fresh,
        "rows": rows,
        "calibration_growth": max(ns) / min(ns),
        "capture_bytes_ratio_max_over_min": max(stored) / min(stored),
        "peak_increase_ratio_max_over_min": (max(peaks) / min(peaks)) if peaks and min(peaks) > 0 else None,
        "all_hidden_states_ratio_max_over_min": rows[-1]["all_hidden_states_bytes"] / rows[0]["all_hidden_states_bytes"],
    }


# ----------------------------------------------------------------------------------------------
# FBS versus exact versus exhaustive


def bench_select(analysis: Any, sizes: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from mi_prun.errors import MiPrunError
    from mi_prun.select import select

    L = int(np.asarray(analysis.block_mi).shape[0])
    reps = sizes["select_repeats"]
    run_cost = SelectConfig().run_cost
    # Every block removable: the search space is C(L, n), the "combinations" reported per row.
    protect_ends = False
    rows = []
    for n in sizes["select_ns"]:
        if n >= L:
            continue
        exact_times = []
        for _ in range(reps):
            exact = select(analysis, "exact", n=n, run_cost=run_cost, protect_ends=protect_ends)
            exact_times.append(exact.seconds)
        row: dict[str, Any] = {"n": n, "combinations": math.comb(L, n), "exact": {
            "removed": list(exact.removed), "objective": exact.objective,
            "seconds": statistics.median(exact_times), "span_lookups": exact.span_lookups}}
        for method in sizes["select_methods"]:
            if method == "exact":
                continue
            opts = {"max_combinations": sizes["max_combinations"]} if method == "exhaustive" else {}
            try:
                times, s = [], None
                for _ in range(1 if method == "exhaustive" else reps):
                    s = select(analysis, method, n=n, run_cost=run_cost, protect_ends=protect_ends, **opts)
                    times.append(s.seconds)
            except MiPrunError:
                row[method] = {"refused": f"refused (C({L},{n})={math.comb(L, n):,} > "
                                          f"max_combinations={sizes['max_combinations']:,})"}
                continue
            gap = s.objective - exact.objective
            row[method] = {"removed": list(s.removed), "objective": s.objective,
                           "seconds": statistics.median(times), "gap": gap,
                           "rel_gap": gap / abs(exact.objective) if exact.objective else None,
                           "optimal": bool(abs(gap) <= 1e-9 * max(1.0, abs(exact.objective))),
                           "span_lookups": s.span_lookups}
            if method == "fbs":
                row[method]["iterations"] = len(s.trajectory)
        rows.append(row)
        parts = []
        for method in ["exact"] + [m for m in sizes["select_methods"] if m != "exact"]:
            r = row.get(method, {})
            parts.append(f"{method} " + (r["refused"] if "refused" in r else
                                         f"{r['seconds'] * 1e3:.2f} ms gap {r.get('gap', 0.0):.3g}"))
        log(f"  select n={n}: " + "; ".join(parts))
    return {"L": L, "run_cost": run_cost, "protect_ends": protect_ends,
            "timing": f"median of {reps} calls (exhaustive: 1)",
            "max_combinations": sizes["max_combinations"], "rows": rows}


# ----------------------------------------------------------------------------------------------
# end-to-end analysis versus SLEB


def run_analysis(loaded: LoadedModel, cfg: Any, calib: Calibration) -> tuple[Any, float]:
    """The whole analysis (tokenise, capture, score; not the model load) as `pipeline.analyze` runs it."""
    from mi_prun.pipeline import analysis_from_capture, analyze, run_capture

    dev = loaded.device
    if loaded.tokenizer is not None:
        return timed(lambda: analyze(loaded, cfg), dev)[::-1]

    def go():  # no tokenizer: the same stages on the given random ids
        cap = run_capture(loaded, calib, cfg)
        return analysis_from_capture(loaded, calib, cap, cfg)
    secs, analysis = timed(go, dev)
    return analysis, secs


def bench_e2e(loaded: LoadedModel, args: argparse.Namespace, sizes: dict[str, Any],
              log: Callable[[str], None]) -> dict[str, Any]:
    from mi_prun.select import select, sleb_select

    n_s, t_s = sizes["e2e_calib"]
    bs = min(8, n_s)
    cfg = AnalysisConfig(calib=args.calib, n_samples=n_s, seq_len=t_s, batch_size=bs)
    calib = get_calibration(loaded, args.calib, n_s, t_s, seed=cfg.seed)  # = analyze's tokens
    analysis, a_secs = run_analysis(loaded, cfg, calib)
    ns = sorted(sizes["sleb_ns"])
    run_cost = SelectConfig().run_cost
    fbs = {n: select(analysis, "fbs", n=n, run_cost=run_cost, protect_ends=False) for n in ns}
    log(f"  analysis {n_s}x{t_s}: {a_secs:.2f} s; SLEB n={ns[-1]} running ...")
    sleb_secs, sleb = timed(lambda: sleb_select(loaded.model, calib.input_ids, n=ns[-1],
                                                attention_mask=calib.attention_mask, batch_size=bs,
                                                protect_ends=False, analysis=analysis, run_cost=run_cost),
                            loaded.device)
    L = sleb.n_blocks
    rows = []
    for n in ns:
        step = sleb.trajectory[n - 1]
        s_time = sleb_secs if n == ns[-1] else float(step["elapsed"])
        passes = sum(L - t for t in range(n))
        mi_time = a_secs + fbs[n].seconds
        rows.append({"n": n, "sleb_seconds": s_time, "sleb_forward_passes": passes,
                     "sleb_removed": list(step["removed"]), "analysis_seconds": a_secs,
                     "fbs_seconds": fbs[n].seconds, "fbs_removed": list(fbs[n].removed),
                     "mi_forward_passes": 1, "ratio_sleb_over_analysis": s_time / mi_time})
        log(f"  n={n}: SLEB {s_time:.1f} s ({passes} passes) vs analysis+FBS {mi_time:.2f} s: "
            f"ratio {s_time / mi_time:.1f}")
    return {
        "calibration": {"n_samples": n_s, "seq_len": t_s, "tokens": int(calib.attention_mask.sum()),
                        "source": calib.provenance.get("source"), "batch_size": bs},
        "note": ("the same calibration tokens for both, every block removable; SLEB is greedy, so one n=%d "
                 "run gives the n<%d answers as its first steps (times read from its trajectory); "
                 "analysis_seconds is tokenise + capture + score, the model load excluded "
                 "(analysis_timings: total vs load_model)" % (ns[-1], ns[-1])),
        "run_cost": run_cost, "protect_ends": False,
        "analysis_timings": {k: float(v) for k, v in analysis.timings.items()},
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# main


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="zoo name, path, HF id, or random-llama2-7b / "
                    "random-llama-tiny (default smollm2-135m; --quick: random-llama-tiny)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--calib", default="builtin", help="calibration text source (mi_prun.data)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, small sizes (seconds)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/speed.json)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--synthetic-shapes", action="store_true",
                    help="span section only (synthetic data; no model is loaded)")
    ap.add_argument("--select-model", default=None,
                    help="model whose analysis gives the select section's span matrix "
                         "(default: --model, or smollm2-135m when --model is random-llama2-7b)")
    # internal: one memory measurement in a fresh process
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mem-seq-len", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--mem-max-positions", type=int, default=504, help=argparse.SUPPRESS)
    ap.add_argument("--mem-batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = "random-llama-tiny" if args.quick else "smollm2-135m"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child is not None:
        row = memory_child(args.model, args.device, args.dtype, args.calib, args.memory_child,
                           args.mem_seq_len, args.mem_max_positions, args.mem_batch_size)
        print(json.dumps(row))
        return row

    device = resolve_device(args.device)
    mode = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    sizes = SIZES[mode]
    sections = ["span"] if args.synthetic_shapes else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out) if args.out else ROOT / "results" / "speed.json"
    cmd = "python " + " ".join([os.path.relpath(Path(__file__).resolve(), Path.cwd())] + sys.argv[1:]) \
        if argv is None else "python benchmarks/speed.py " + " ".join(argv)
    result: dict[str, Any] = {"command": cmd, "mode": mode, "model": args.model,
                              "environment": environment(device), "sizes": sizes}

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    marks: dict[str, float] = {}
    result["section_seconds"] = marks
    loaded = None
    if any(s != "span" for s in sections):
        loaded = get_model(args.model, args.device, args.dtype)
        result["model_info"] = {k: (v if isinstance(v, (int, float, str, bool, dict)) or v is None else str(v))
                                for k, v in loaded.describe().items()}
        marks["load"] = time.perf_counter() - t_all
        log(f"model {args.model}: {loaded.n_blocks} blocks, {result['model_info']['n_params']:,} parameters, "
            f"{loaded.dtype} on {loaded.device} (built/loaded in {loaded.load_seconds:.1f} s)")
    if "capture" in sections:
        assert loaded is not None
        calib = get_calibration(loaded, args.calib, sizes["calib_n"], sizes["calib_t"])
        r = bench_capture(loaded, calib, sizes["batch_size"], sizes["repeats"], max_positions=4096)
        result["capture_vs_forward"] = r
        marks["capture"] = time.perf_counter() - t_all - sum(marks.values())
        log(f"capture / forward: median {r['median_ratio_capture_over_forward']:.3f} (target <= 1.10); "
            f"capture / forward without LM head: {r['median_ratio_capture_over_forward_body']:.3f}; "
            f"capture {r['capture_tokens_per_s']:.0f} tokens/s")
    if "span" in sections:
        log("span-matrix scaling (synthetic captures):")
        shipped = AnalysisConfig()
        result["span_scaling"] = bench_span(device, sizes, shipped.estimator, dict(shipped.estimator_options), log)
        marks["span"] = time.perf_counter() - t_all - sum(marks.values())
    if "memory" in sections:
        assert loaded is not None
        log("peak memory of a capture against calibration size:")
        result["memory"] = bench_memory(args, loaded, sizes, log)
        marks["memory"] = time.perf_counter() - t_all - sum(marks.values())
    if "select" in sections or "e2e" in sections:
        assert loaded is not None
        sel_spec = args.select_model or ("smollm2-135m" if args.model == "random-llama2-7b" else args.model)
        sel_loaded = loaded if sel_spec == args.model else get_model(sel_spec, args.device, args.dtype)
        if "select" in sections:
            n_s, t_s = sizes["select_calib"]
            cfg = AnalysisConfig(calib=args.calib, n_samples=n_s, seq_len=t_s, batch_size=min(8, n_s))
            calib = get_calibration(sel_loaded, args.calib, n_s, t_s, seed=cfg.seed)
            analysis, secs = run_analysis(sel_loaded, cfg, calib)
            log(f"select: span matrix from the analysis of {sel_spec} on {n_s} x {t_s} tokens "
                f"({secs:.1f} s)")
            r = bench_select(analysis, sizes, log)
            r.update({"analysis_model": sel_spec, "analysis_calibration": {"n_samples": n_s, "seq_len": t_s,
                      "source": calib.provenance.get("source")}, "analysis_seconds": secs,
                      "analysis_timings": {k: float(v) for k, v in analysis.timings.items()}})
            result["select"] = r
            marks["select"] = time.perf_counter() - t_all - sum(marks.values())
        if "e2e" in sections:
            log("end-to-end analysis against SLEB:")
            result["e2e_vs_sleb"] = bench_e2e(sel_loaded, args, sizes, log)
            marks["e2e"] = time.perf_counter() - t_all - sum(marks.values())
    result["total_seconds"] = time.perf_counter() - t_all
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    log(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
