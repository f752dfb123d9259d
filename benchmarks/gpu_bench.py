"""The GPU benchmark behind benchmarks/gpu.sh: the whole pipeline at the sizes people prune.

    python benchmarks/gpu_bench.py [--shapes 8b,70b] [--device cuda] [--out PATH]
    python benchmarks/gpu_bench.py --shapes tiny --device cpu        # the same code, tiny, on a CPU

For each shape, a randomly initialised Llama model (no download: timing needs no trained weights)
runs analysis (capture + gaussian-channel MI), verified selection, healing and perplexity on
random token ids, and every stage reports its seconds, tokens per second, the ratio to one plain
forward pass of the same model on the calibration tokens, peak device memory
(torch.cuda.max_memory_allocated, reset per stage) and the process's peak RSS.

- `8b`: Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
  vocab 128256), whole on the GPU in bfloat16 (16 GB).
- `70b`: Llama-3-70B's shape (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672).
  141 GB in bfloat16 fit neither one 141 GB GPU with activations nor this machine's RAM or disk,
  so it streams (`mi_prun.runtime.sources`): the blocks sit in pinned CPU memory and one at a time
  is copied to the GPU. To fit in RAM, `--distinct-blocks` (default 2) random blocks are stored
  and block b reads block b mod 2's weights: every one of the 80 copies still crosses PCIe, so the
  time is that of a real 70B stream from CPU memory (the values repeat; no result depends on them).
  Its "forward pass" is one streamed forward pass.
- `tiny`: the same code with tiny dimensions, both modes (the test suite runs it on a CPU).

Sizes are chosen so that 8b and 70b together finish within 10 minutes on one H200-class GPU.
Writes JSON with every number, the command line and the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mi_prun.capture import capture
from mi_prun.config import AnalysisConfig, HealConfig, SelectConfig
from mi_prun.data import Calibration
from mi_prun.evaluate import token_nll
from mi_prun.heal import heal
from mi_prun.runtime.loading import LoadedModel
from mi_prun.models.memory import peak_memory
from mi_prun.models.skeleton import skeleton
from mi_prun.runtime.sources import TensorStore, from_store
from mi_prun.pipeline import analysis_from_capture
from mi_prun.select import select
from mi_prun.testing import byte_tokenizer, random_model, random_tensors

LLAMA3 = {"num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"config": {**LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336},
           "mode": "memory", "calib": (32, 512), "positions": 4096, "verify": (16, 256), "verify_passes": "auto",
           "n": 8, "heal": (16, 512), "eval": (32, 512), "batch": 8},
    "70b": {"config": {**LLAMA3, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                       "intermediate_size": 28672},
            "mode": "stream", "calib": (16, 256), "positions": 2048, "verify": (8, 256), "verify_passes": 8,
            "n": 8, "heal": (16, 256), "eval": (16, 256), "batch": 16},
    "tiny": {"config": {**LLAMA3, "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
                        "max_position_embeddings": 256},
             "mode": "both", "calib": (4, 32), "positions": 96, "verify": (4, 32), "verify_passes": 4,
             "n": 2, "heal": (4, 32), "eval": (4, 32), "batch": 2, "distinct": 6},  # every block its own: = memory
}


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape]["config"])


def streamed_random(config: Any, dtype: torch.dtype, device: torch.device, distinct: int, seed: int = 0) -> Any:
    """A streamed random model: `distinct` random blocks in (pinned, on CUDA) CPU memory, block b
    reading block b mod distinct; embeddings, norm and head random too."""
    skel = skeleton(config, dtype)
    block_names = [n for n, _ in skel.named_parameters() if n.startswith("model.layers.")]
    first = [n for n in block_names if n.startswith(f"model.layers.{0}.")]
    keep = set(first) | {n for n, _ in skel.named_parameters() if not n.startswith("model.layers.")}
    for k in range(1, distinct):
        keep |= {n.replace("model.layers.0.", f"model.layers.{k}.", 1) for n in first}
    init_device = device if device.type == "cuda" else torch.device("cpu")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in random_tensors(config, dtype, init_device, seed, names=keep):
        value = value.cpu()
        tensors[name] = value.pin_memory() if device.type == "cuda" else value
    for name in block_names:
        layer = int(name.split(".")[2])
        tensors.setdefault(name, tensors[name.replace(f"model.layers.{layer}.", f"model.layers.{layer % distinct}.", 1)])
    return from_store(config, TensorStore(tensors), device, dtype, source=f"random (distinct blocks: {distinct})")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _stage(device: torch.device, tokens: int, fn, per_token: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Run `fn` once; seconds, tokens/s, peak memory, and (given the forward pass's seconds per token)
    the ratio to one plain forward pass over the same number of tokens."""
    _reset(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t0
    mem = peak_memory()
    row = {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt if dt > 0 else None,
           "peak_device_bytes": mem["cuda_max_allocated_bytes"], "peak_rss_bytes": mem["rss_peak_bytes"]}
    if per_token:
        row["ratio_to_forward"] = dt / (per_token * tokens)
    return out, row


def _ids(n: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def run_shape(shape: str, mode: str, device: torch.device, dtype: torch.dtype, distinct: int = 2,
              seed: int = 0) -> dict[str, Any]:
    """Every stage on one random model; `mode` "memory" (whole model on the device) or "stream"."""
    spec = SHAPES[shape]
    config = llama_config(shape)
    vocab = config.vocab_size
    t0 = time.perf_counter()
    if mode == "memory":
        model = random_model(config, dtype, device, seed)
    else:
        model = streamed_random(config, dtype, device, distinct, seed)
    _sync(device)
    build_s = time.perf_counter() - t0
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), spec=f"random-llama3-{shape}", source="random",
                         model_type="llama", device=device, dtype=dtype, info={"offload": "cpu"} if mode == "stream" else {})
    n_c, t_c = spec["calib"]
    ids = _ids(n_c, t_c, vocab, seed + 1)
    mask = torch.ones_like(ids)
    calib_tokens = n_c * t_c
    bs = spec["batch"]
    rows: dict[str, Any] = {}
    (fw_total, fw_count), rows["forward"] = _stage(device, calib_tokens, lambda: token_nll(model, ids, mask, batch_size=bs))
    per_token = rows["forward"]["seconds"] / calib_tokens
    cfg = AnalysisConfig(n_samples=n_c, seq_len=t_c, max_positions=spec["positions"], batch_size=bs, seed=seed)
    calib = Calibration(ids, mask, {"source": "random token ids", "n_samples": n_c, "seq_len": t_c, "seed": seed})

    def analyse():
        cap = capture(model, ids, mask, max_positions=cfg.max_positions, drop_first=True, seed=seed, batch_size=bs)
        return analysis_from_capture(loaded, calib, cap, cfg)

    analysis, rows["analysis"] = _stage(device, calib_tokens, analyse, per_token)
    n_v, t_v = spec["verify"]
    vids = _ids(n_v, t_v, vocab, seed + 2)
    scfg = SelectConfig(n=spec["n"], verify_passes=spec["verify_passes"], verify_samples=n_v, verify_seq_len=t_v)
    sel, rows["verified_selection"] = _stage(device, n_v * t_v, lambda: select(analysis, config=scfg, model=loaded,
                                                                               tokens=vids), per_token)
    rows["verified_selection"].update(passes=sel.forward_passes, removed=list(sel.removed),
                                      sets_scored=(sel.verification or {}).get("sets_scored"))
    n_h, t_h = spec["heal"]
    hids = _ids(n_h, t_h, vocab, seed + 3)
    hcal = Calibration(hids, torch.ones_like(hids), {"source": "random token ids", "n_samples": n_h, "seq_len": t_h})
    hcfg = HealConfig(n_samples=n_h, seq_len=t_h, batch_size=bs)
    removed = [b for b in sel.removed]
    if 0 in removed:  # no block before block 0 to fold a bridge into
        removed = [b for b in removed if b != 0] or [1]
    (healed, healing), rows["heal"] = _stage(device, n_h * t_h, lambda: heal(model, removed, hcal, config=hcfg),
                                            per_token)
    rows["heal"].update(runs=len(healing.runs), removed=removed,
                        unexplained=[[r.unexplained_unhealed, r.unexplained_healed] for r in healing.runs])
    n_e, t_e = spec["eval"]
    eids = _ids(n_e, t_e, vocab, seed + 4)
    (tot, cnt), rows["perplexity"] = _stage(device, n_e * t_e, lambda: token_nll(healed, eids, torch.ones_like(eids),
                                                                                  batch_size=bs), per_token)
    rows["perplexity"]["ppl_random_tokens"] = math.exp(tot / cnt)
    rows["forward"]["nll"] = fw_total / fw_count
    n_params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "mode": mode, "config": SHAPES[shape]["config"], "n_params": n_params,
            "weights_bytes": n_params * torch.empty((), dtype=dtype).element_size(), "build_seconds": build_s,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "distinct_blocks": distinct if mode == "stream" else None, "stages": rows}


def format_rows(result: dict[str, Any]) -> str:
    gib = 2**30
    lines = [(f"== random Llama-3 {result['shape']} ({result['n_params'] / 1e9:.2f}B parameters, {result['mode']}, "
             f"{result['dtype']} on {result['device']}; built in {result['build_seconds']:.1f} s) ==")]
    for name, row in result["stages"].items():
        dev = row["peak_device_bytes"]
        ratio = row.get("ratio_to_forward")
        lines.append(f"  {name:20s} {row['seconds']:8.2f} s  {row['tokens_per_s'] or 0:12,.0f} tokens/s  "
                     f"peak device {'-' if dev is None else f'{dev / gib:.2f} GiB'}  peak RSS "
                     f"{row['peak_rss_bytes'] / gib:.2f} GiB" + (f"  x{ratio:.2f} of one forward pass over as many tokens" if ratio else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8b,70b", help="comma-separated: 8b, 70b, tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--distinct-blocks", type=int, default=2, help="random blocks stored for a streamed shape")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu.json on CUDA)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: --device {args.device} needs CUDA, and torch {torch.__version__} sees no GPU "
              "(torch.cuda.is_available() is False). Fix: run on a machine with an NVIDIA GPU and a CUDA build of "
              "torch, or use --shapes tiny --device cpu to check the code path.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    results = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            print(f"gpu_bench: unknown shape {shape!r}: choose from {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        modes = ["memory", "stream"] if SHAPES[shape]["mode"] == "both" else [SHAPES[shape]["mode"]]
        for mode in modes:
            res = run_shape(shape, mode, device, dtype, SHAPES[shape].get("distinct", args.distinct_blocks))
            print(format_rows(res), flush=True)
            results.append(res)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = args.out or (str(ROOT / "benchmarks" / "results" / "gpu.json") if device.type == "cuda" else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"command": " ".join(sys.argv), "environment": env, "results": results},
                                        indent=1), encoding="utf-8")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
