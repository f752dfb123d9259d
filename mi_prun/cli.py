"""`mi-prun analyze | show | select | prune | eval`: a thin shell over the library.

Each command parses and validates its arguments, calls library functions and prints. Errors a
user can fix (`MiPrunError`) print one line and exit with status 2; `--debug` shows the traceback.
Blocks are numbered from 0 in all output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mi_prun.errors import MiPrunError

log = logging.getLogger("mi_prun")

BLOCK_NOTE = "Blocks are numbered from 0."


class TqdmProgress:
    """Adapts the library's progress(stage, fraction, message) callback to one tqdm bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=1000, desc=stage, file=sys.stderr, leave=True,
                                          bar_format="{desc:>9}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        bar.n = int(max(0.0, min(1.0, fraction)) * 1000)
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"preprocess\": \"rms\"}'")
    return value


def _protect_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 0.5:
        return value
    raise argparse.ArgumentTypeError(f"must be a block count >= 1 or a fraction in (0, 0.5), got {text}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"mi-prun: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------- helpers

def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    from mi_prun.models import DEFAULT_MODEL

    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=f"zoo name ({DEFAULT_MODEL}, tiny-<family>), local folder, .gguf file or Hugging Face id")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) | cpu | cuda[:N] | mps")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--device-map", default=None, help="passed to accelerate, e.g. auto, for models larger than one GPU")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the repository (off by default)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even when the weights look larger than the free memory")


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    from mi_prun.pipeline import AnalysisConfig

    d = AnalysisConfig()
    p.add_argument("--calib", default=d.calib, help="builtin | wikitext2 | file.txt | file.jsonl | folder | text:<string>")
    p.add_argument("--samples", type=_positive_int, default=d.n_samples, help="calibration samples N")
    p.add_argument("--tokens", type=_positive_int, default=d.seq_len, help="tokens per sample T")
    p.add_argument("--positions", type=_positive_int, default=d.max_positions, help="token positions kept per layer (m)")
    p.add_argument("--keep-first", action="store_true", help="keep each sample's first position (attention sink)")
    p.add_argument("--estimator", default=d.estimator, help="MI estimator (see `mi-prun estimators`)")
    p.add_argument("--estimator-options", type=_json_arg, default=None,
                   help=f"JSON options of the estimator (default {json.dumps(d.estimator_options)})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)


def _load(args) -> Any:
    from mi_prun.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code,
                      check_memory_first=not args.skip_memory_check)


def _config(args):
    from mi_prun.pipeline import AnalysisConfig

    d = AnalysisConfig()
    return AnalysisConfig(calib=args.calib, n_samples=args.samples, seq_len=args.tokens,
                          max_positions=args.positions, drop_first=not args.keep_first,
                          estimator=args.estimator,
                          estimator_options=args.estimator_options if args.estimator_options is not None
                          else (d.estimator_options if args.estimator == d.estimator else {}),
                          batch_size=args.batch_size, seed=args.seed)


def _run_analysis(args, progress: TqdmProgress):
    from mi_prun.pipeline import analyze

    cfg = _config(args)  # validate settings before the (slow) model load
    from mi_prun.estimators import get_estimator

    get_estimator(cfg.estimator, **cfg.estimator_options)
    progress("load", 0.0, args.model)
    loaded = _load(args)
    progress("load", 1.0, f"{loaded.n_blocks} blocks")
    return loaded, analyze(loaded, cfg, progress=progress)


def format_analysis(analysis) -> str:
    """Blocks ranked by redundancy (highest MI first) next to the baselines' scores."""
    import numpy as np
    import pandas as pd

    L = analysis.n_blocks
    bi = analysis.baselines.get("cosine_bi")
    ang = analysis.baselines.get("angular")
    rows = []
    order = analysis.ranking()
    bi_rank = {b: r for r, b in enumerate(np.argsort(bi, kind="stable"))} if bi is not None else {}
    for rank, b in enumerate(order):
        rows.append({
            "rank": rank, "block": b, "MI (nats)": float(analysis.block_mi[b]),
            "cosine BI": float(bi[b]) if bi is not None else np.nan,
            "BI rank": bi_rank.get(b, -1),
            "angular d(b,b+1)": float(ang[b, b + 1]) if ang is not None else np.nan,
        })
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}")
    m = analysis.model
    c = analysis.calibration
    dpi = analysis.dpi or {}
    tol = dpi.get("tolerance")
    tol_text = (f"rtol {tol.get('rtol')}, atol {tol.get('atol')}" if isinstance(tol, dict) else str(tol))
    lines = [
        f"model: {m.get('spec')} ({m.get('architecture')}, {L} blocks)   estimator: {analysis.estimator} "
        f"{json.dumps(analysis.estimator_options)}",
        f"calibration: {c.get('source')} N={c.get('n_samples')} T={c.get('seq_len')} seed={c.get('seed')} "
        f"positions kept={c.get('positions_kept')} drop_first={c.get('drop_first')}",
        f"{BLOCK_NOTE} Rank 0 = most redundant (highest MI). Cosine BI: low = redundant (ShortGPT).",
        table,
        f"DPI: {dpi.get('n_violations', '?')} of {dpi.get('n_cells', '?')} span cells break the inequality "
        f"beyond tolerance ({tol_text})",
    ]
    tau = (analysis.stability or {}).get("kendall_tau_halves")
    if tau is not None:
        lines.append(f"stability: Kendall tau between block rankings of two calibration halves = {tau:.3f}")
    if analysis.timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in analysis.timings.items()
                                          if isinstance(v, (int, float)) and not k.startswith("score_")))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- commands

def _refuse_nonempty(out: str | None, overwrite: bool) -> None:
    """Fail before the slow work, not after it, when the output folder would be refused."""
    if out and Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise MiPrunError(f"{out} exists and is not empty. Fix: choose another folder or pass --overwrite.")
    if out and Path(out).exists() and not Path(out).is_dir():
        raise MiPrunError(f"{out} is a file. Fix: give a folder path.")


def cmd_analyze(args) -> int:
    _refuse_nonempty(args.out, args.overwrite)
    progress = TqdmProgress(not args.quiet)
    _, analysis = _run_analysis(args, progress)
    progress.close()
    if args.out:
        analysis.save(args.out, overwrite=args.overwrite)
    print(format_analysis(analysis))
    if args.out:
        print(f"saved to {args.out}")
    return 0


def cmd_show(args) -> int:
    from mi_prun.report import Analysis

    print(format_analysis(Analysis.load(args.folder)))
    return 0


def cmd_estimators(args) -> int:
    from mi_prun.estimators import list_estimators

    for name in list_estimators():
        print(name)
    return 0


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="fraction of blocks to remove, in (0, 1)")
    g.add_argument("--n", type=int, default=None, help="number of blocks to remove")
    p.add_argument("--method", default=None, help="selector (default: the benchmark's winner; see `mi-prun select --help`)")
    p.add_argument("--run-cost", default=None, help="run cost for span-based selectors")
    p.add_argument("--protect-ends", nargs="?", const=True, default=None, type=_protect_arg, metavar="K",
                   help="never remove the first and last block; with K, the first and last K blocks "
                        "(an integer) or that fraction of the blocks (0 < K < 0.5)")
    p.add_argument("--no-protect-ends", dest="protect_ends", action="store_const", const=False,
                   help="allow removing any block")


def _selection_kwargs(args) -> dict:
    from mi_prun import defaults

    kw = {"method": args.method or defaults.SELECTOR,
          "run_cost": args.run_cost or defaults.RUN_COST,
          "protect_ends": defaults.PROTECT_ENDS if args.protect_ends is None else args.protect_ends}
    if args.ratio is None and args.n is None:
        kw["ratio"] = defaults.RATIO
    else:
        kw["ratio"], kw["n"] = args.ratio, args.n
    return kw


def format_selection(sel) -> str:
    runs = ", ".join(f"{s}-{e - 1}" if e - s > 1 else f"{s}" for s, e in sel.runs)
    ratio = f" (ratio {sel.ratio})" if getattr(sel, "ratio", None) is not None else ""
    return (f"method {sel.method}: remove {sel.n} of {sel.n_blocks} blocks{ratio}: {list(sel.removed)}\n"
            f"runs: {runs}   objective ({sel.run_cost}): {sel.objective:.6g}   time {sel.seconds * 1000:.1f} ms\n"
            f"{BLOCK_NOTE}")


def cmd_select(args) -> int:
    from mi_prun.report import Analysis
    from mi_prun.select import compare, select

    analysis = Analysis.load(args.analysis)
    kw = _selection_kwargs(args)
    if args.compare:
        from mi_prun.select import resolve_n

        n = resolve_n(analysis.n_blocks, n=kw.get("n"), ratio=kw.get("ratio"))
        rows = compare(analysis, n, run_cost=kw["run_cost"], protect_ends=kw["protect_ends"])
        import pandas as pd

        print(f"n = {n} of {analysis.n_blocks} blocks, run cost {kw['run_cost']}. {BLOCK_NOTE}")
        table = pd.DataFrame([r for r in rows if r.get("feasible", True)])
        cols = [c for c in ("method", "removed", "objective", "gap", "rel_gap", "seconds", "span_lookups")
                if c in table.columns]
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.6g}"))
        for r in rows:
            if not r.get("feasible", True):
                print(f"{r['method']}: not run: {r.get('reason')}")
        return 0
    sel = select(analysis, **kw)
    print(format_selection(sel))
    return 0


def cmd_prune(args) -> int:
    from mi_prun.evaluate import generate_sample
    from mi_prun.prune import export, prune
    from mi_prun.report import Analysis
    from mi_prun.select import select

    from mi_prun.select import RUN_COSTS, get_selector

    out = Path(args.out)
    _refuse_nonempty(args.out, args.overwrite)
    progress = TqdmProgress(not args.quiet)
    kw = _selection_kwargs(args)
    get_selector(kw["method"])  # unknown names fail before the model loads
    if kw["run_cost"] not in RUN_COSTS:
        raise MiPrunError(f"unknown run cost {kw['run_cost']!r}: choose one of {', '.join(sorted(RUN_COSTS))}.")
    if args.analysis:
        analysis = Analysis.load(args.analysis)
        loaded = _load(args)
        if analysis.n_blocks != loaded.n_blocks:
            raise MiPrunError(f"the analysis has {analysis.n_blocks} blocks but {args.model} has {loaded.n_blocks}. "
                              "Fix: give the analysis of this model.")
    else:
        loaded, analysis = _run_analysis(args, progress)
    if kw["method"] == "sleb":
        from mi_prun.pipeline import prepare_calibration
        from mi_prun.select import sleb_select

        calib = prepare_calibration(loaded, _config(args))
        sel = sleb_select(loaded.model, calib.input_ids, n=None, ratio=kw.get("ratio"),
                          protect_ends=kw["protect_ends"], progress=progress) if kw.get("n") is None else \
            sleb_select(loaded.model, calib.input_ids, n=kw["n"], protect_ends=kw["protect_ends"], progress=progress)
    else:
        sel = select(analysis, **kw)
    print(format_selection(sel))
    pruned = prune(loaded.model, sel.removed)
    meta = {"model": analysis.model, "calibration": analysis.calibration, "estimator": analysis.estimator,
            "estimator_options": analysis.estimator_options}
    path = export(pruned, loaded.tokenizer, sel, out, overwrite=args.overwrite,
                  source_model=loaded.info.get("hf_id", loaded.source),
                  analysis_meta=meta)
    progress.close()
    print(f"exported to {path} (load it with AutoModelForCausalLM.from_pretrained({str(path)!r}))")
    if args.sample:
        print("before:", generate_sample(loaded.model, loaded.tokenizer, args.sample))
        print("after: ", generate_sample(pruned, loaded.tokenizer, args.sample))
    return 0


def cmd_eval(args) -> int:
    from mi_prun.data import load_text
    from mi_prun.evaluate import perplexity

    progress = TqdmProgress(not args.quiet)
    loaded = _load(args)
    text = load_text(args.data, purpose="evaluation")
    res = perplexity(loaded.model, loaded.tokenizer, text.text, seq_len=args.seq_len,
                     max_windows=args.max_windows, batch_size=args.batch_size, progress=progress)
    progress.close()
    print(f"perplexity {res.ppl:.3f} on {text.source}: seq_len {res.seq_len}, {res.windows} windows, "
          f"{res.tokens_scored} tokens scored, BOS {'prepended' if res.bos else 'not used'} ({res.protocol})")
    return 0


# ---------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mi-prun", description="Find and remove redundant transformer "
                                     f"blocks with mutual information. {BLOCK_NOTE}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="capture hidden states and score every block and span")
    _add_model_args(p)
    _add_analysis_args(p)
    p.add_argument("--out", default=None, help="folder to save the analysis in")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("show", help="print a saved analysis")
    p.add_argument("folder")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("estimators", help="list the MI estimators")
    p.set_defaults(func=cmd_estimators)

    p = sub.add_parser("select", help="choose blocks to remove from a saved analysis")
    p.add_argument("analysis")
    _selection_args(p)
    p.add_argument("--compare", action="store_true", help="FBS, local search, exact optimum and exhaustive side by side")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("prune", help="remove blocks and export a model folder")
    _add_model_args(p)
    _add_analysis_args(p)
    p.add_argument("--analysis", default=None, help="saved analysis folder (else the analysis runs first)")
    _selection_args(p)
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sample", default=None, help="prompt for a generation sample before and after")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity by the standard protocol")
    _add_model_args(p)
    p.add_argument("--data", default="wikitext2", help="wikitext2 (test split) | file | folder | text:<string>")
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--max-windows", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, printed on one line)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore")
    try:  # our own progress bars replace transformers' per-file ones
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not args.debug:
            hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        return args.func(args)
    except MiPrunError as exc:
        if args.debug:
            raise
        print(f"mi-prun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mi-prun: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in mi-prun: still one line, the traceback with --debug
        if args.debug:
            raise
        first = (str(exc).splitlines() or [""])[0]
        print(f"mi-prun: internal error: {type(exc).__name__}: {first} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
