"""`--format gguf` measured: size of the pruned GGUF against its source and against the float32
export, perplexity of the pruned GGUF (read back through transformers) against the pruned float32
view, export time, and (--heal) which precision keeps a folded tensor's fold.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/gguf_export.py --model smollm2-135m --remove 12,13,14,15 --heal

In one process: load the model (a `.gguf` path, or the built-in model, whose GGUF is in the cache),
timed twice: the first load converts (dequantises) the file unless it is cached already, the second
reads the converted model from the cache (`mi_prun.models.gguf_cache`). Remove the blocks given
(numbered from 0); export the pruned view as float32 safetensors and as a GGUF (`model.gguf`, the
source's bytes for every kept tensor), each timed; read the GGUF back through transformers
(`from_pretrained(..., gguf_file=)`, dequantising it) and compare logits and perplexity with the
pruned view. Perplexity protocol (`mi_prun.evaluate.perplexity`): the WikiText-2 test split,
non-overlapping windows of 256 tokens with BOS where the tokenizer adds it, the first `--windows`
windows (every token of them scored once).

--heal: heal the same removal (`mi_prun.heal.heal`, `HealConfig()` defaults, its calibration text;
--no-heal-check folds every bridge, also one the held-out check would leave out),
export the healed model as a GGUF with the folded tensors in f32, f16 and q8_0, and for each report
the largest and mean absolute logit difference from the healed float32 view (first
`--logit-windows` windows) and the perplexity.

Writes benchmarks/results/gguf_export-<name>.json (name: --name, else the model's file stem).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mi_prun.config import EvalConfig, ExportConfig, HealConfig
from mi_prun.data import load_text, tokenize
from mi_prun.evaluate import perplexity
from mi_prun.export import export
from mi_prun.gguf_export import GGUF_FILE, gguf_source_of
from mi_prun.heal import heal, heal_calibration
from mi_prun.models import pruned_view
from mi_prun.runtime import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def windows(tokenizer: Any, text: str, n: int, seq_len: int) -> torch.Tensor:
    """The first `n` evaluation windows as `perplexity` builds them (BOS + seq_len - 1 text tokens)."""
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id
    per = seq_len - 1 if bos is not None else seq_len
    rows = ids[: n * per].to(torch.long).reshape(n, per)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), rows], dim=1)
    return rows


@torch.no_grad()
def logit_gap(a: torch.nn.Module, b: torch.nn.Module, rows: torch.Tensor) -> dict[str, float]:
    """Largest and mean absolute logit difference of two models over `rows`, one window at a time."""
    worst, total, count = 0.0, 0.0, 0
    for row in rows:
        diff = (a(row[None]).logits.float() - b(row[None]).logits.float()).abs()
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        count += diff.numel()
    return {"max_abs": worst, "mean_abs": total / count}


def read_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def ppl(model: torch.nn.Module, tokenizer: Any, text: str, cfg: EvalConfig) -> dict[str, Any]:
    res = perplexity(model, tokenizer, text, seq_len=cfg.seq_len, max_windows=cfg.max_windows,
                     batch_size=cfg.batch_size)
    return {"ppl": res.ppl, "nll": res.nll, "protocol": res.protocol, "seconds": res.seconds}


def run(model_spec: str, remove: list[int], n_windows: int, logit_windows: int, do_heal: bool,
        heal_check: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(model_spec, device="cpu", dtype="float32")
    first_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_model(model_spec, device="cpu", dtype="float32")
    second_load = time.perf_counter() - t0
    source = gguf_source_of(loaded)
    assert source is not None, f"{model_spec} did not come from a GGUF file"
    cfg = EvalConfig(max_windows=n_windows)
    text = load_text(cfg.data, purpose="evaluation").text
    rows = windows(loaded.tokenizer, text, logit_windows, cfg.seq_len)
    view = pruned_view(loaded.model, remove)
    out: dict[str, Any] = {
        "model": model_spec, "source_gguf": str(source), "source_bytes": source.stat().st_size,
        "n_blocks": loaded.n_blocks, "removed": remove, "n_removed": len(remove),
        "load_seconds": {"first": first_load, "second": second_load, "cache": loaded.info.get("gguf_cache")},
        "dense": ppl(loaded.model, loaded.tokenizer, text, cfg),
        "pruned_view": ppl(view, loaded.tokenizer, text, cfg),
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        folder = export(view, loaded.tokenizer, None, work / "f32", loaded=loaded)
        out["float32_export"] = {"bytes": folder_bytes(folder), "seconds": time.perf_counter() - t0}
        shutil.rmtree(folder)
        t0 = time.perf_counter()
        folder = export(view, loaded.tokenizer, None, work / "gguf", loaded=loaded, config=ExportConfig(format="gguf"))
        seconds = time.perf_counter() - t0
        record = json.loads((folder / "mi_prun.json").read_text())["gguf"]
        reread = read_gguf(folder / GGUF_FILE)
        out["gguf_export"] = {"bytes": record["bytes"], "seconds": seconds, "block_bytes": record["block_bytes"],
                              "source_block_bytes": record["source_block_bytes"],
                              "other_bytes": record["other_bytes"], "tensor_types": record["tensor_types"],
                              "ppl_through_transformers": ppl(reread, loaded.tokenizer, text, cfg),
                              "logits_vs_pruned_view": logit_gap(reread, view, rows)}
        del reread
        shutil.rmtree(folder)
        if do_heal:
            hcfg = HealConfig(check=heal_check)
            t0 = time.perf_counter()
            healed, record_h = heal(loaded.model, remove, heal_calibration(loaded, hcfg), config=hcfg)
            heal_rows: dict[str, Any] = {
                "seconds": time.perf_counter() - t0,
                "runs": [{"blocks": [r.start, r.end - 1], "module": r.module, "kept": r.kept} for r in record_h.runs],
                "healed_view": ppl(healed, loaded.tokenizer, text, cfg)}
            for fold_type in ("f32", "f16", "q8_0"):
                t0 = time.perf_counter()
                folder = export(healed, loaded.tokenizer, None, work / f"heal-{fold_type}", loaded=loaded,
                                config=ExportConfig(format="gguf", gguf_fold_type=fold_type))
                seconds = time.perf_counter() - t0
                rec = json.loads((folder / "mi_prun.json").read_text())["gguf"]
                reread = read_gguf(folder / GGUF_FILE)
                heal_rows[fold_type] = {"bytes": rec["bytes"], "seconds": seconds, "folded": rec["folded"],
                                        "ppl_through_transformers": ppl(reread, loaded.tokenizer, text, cfg),
                                        "logits_vs_healed_view": logit_gap(reread, healed, rows)}
                del reread
                shutil.rmtree(folder)
            out["heal"] = heal_rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file, or smollm2-135m")
    ap.add_argument("--remove", required=True, help="blocks to remove, numbered from 0: 12,13,14,15")
    ap.add_argument("--windows", type=int, default=32, help="perplexity windows of 256 tokens (default 32)")
    ap.add_argument("--logit-windows", type=int, default=2, help="windows for the logit comparison (default 2)")
    ap.add_argument("--heal", action="store_true", help="also heal and compare the folded tensor's precisions")
    ap.add_argument("--no-heal-check", action="store_true",
                    help="fold every bridge, also one the held-out check would leave out (to measure the fold's "
                         "precision on a run whose bridge the check drops)")
    ap.add_argument("--name", default=None, help="result name (default: the model's file stem)")
    args = ap.parse_args()
    remove = sorted(int(b) for b in args.remove.split(","))
    result = run(args.model, remove, args.windows, args.logit_windows, args.heal, not args.no_heal_check)
    cmd = ["MI_PRUN_DATA_DIR=../shared/data", "python", "benchmarks/gguf_export.py", "--model", args.model,
           "--remove", args.remove, "--windows", str(args.windows), "--logit-windows", str(args.logit_windows)]
    flags = (["--heal"] if args.heal else []) + (["--no-heal-check"] if args.no_heal_check else [])
    result["command"] = " ".join(cmd + flags + (["--name", args.name] if args.name else []))
    result["torch_threads"] = torch.get_num_threads()
    name = args.name or Path(args.model).stem
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gguf_export-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
