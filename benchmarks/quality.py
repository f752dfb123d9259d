"""Pruned-model quality: MI-PRUN variants against ShortGPT, angular distance, SLEB and random.

    python benchmarks/quality.py                       # smollm2-135m, the published protocol below
    python benchmarks/quality.py --model <any spec>    # any model mi-prun loads
    python benchmarks/quality.py --quick               # tiny random model, seconds (used by the tests)

Protocol (default): calibration 32 samples x 256 tokens from WikiText-2 validation without the
`<unk>` placeholders of its tokenised release (`--calib wikitext2`, as in `mi-prun`; the release with
them is `--calib wikitext2-tokenised`), one capture per first-position choice shared by every MI variant and
by the baselines; evaluation on the raw WikiText-2 test split, windows of 256 tokens, the first 40
windows (`--full`: 1024-token windows, 80 windows); every pruned model is scored on the same
windows in the same run. SLEB-style removal uses its own, smaller calibration (`--sleb-samples`
x `--sleb-tokens`, 8 x 128 by default) because it costs O(L n) forward passes; the table states it.
`--estimators`, `--selectors` and `--first-variants` restrict the grid (a screening run with few
windows, then a final run of the finalists, is how RESULTS.md was made).

Labels name what is computed: `gauss-ch` is gaussian-channel with no preprocessing, the shipped
default estimate; centring or standardising each channel first gives the same estimate (a
correlation ignores per-channel shift and scale), so the grid has one row for the three. Results
written before the rename call it `gauss-ch/std`; `--estimators` and `--first-variants` still accept
that name, and `--rerender` rewrites it in a results file (the recorded options and every number
stay as they were measured).

"Analysis s" in the table is the capture plus the scoring of that capture (tokenising and the model
load excluded); selection times are in the JSON (`select_seconds`, milliseconds).

Writes benchmarks/results/<name>.json (one row per method x n), <name>.md (table) and <name>.png
(perplexity against removed blocks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from mi_prun.config import AnalysisConfig, HealConfig, SelectConfig  # noqa: E402
from mi_prun.data import load_text  # noqa: E402
from mi_prun.errors import MiPrunError  # noqa: E402
from mi_prun.estimators import get_estimator  # noqa: E402
from mi_prun.evaluate import perplexity  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analysis_from_capture, prepare_calibration, run_capture  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.results import library_versions  # noqa: E402
from mi_prun.select import select, sleb_select  # noqa: E402

log = logging.getLogger("quality")

# (label, estimator, options): every distinct estimate worth trying (estimator x preprocessing).
# gaussian-channel is a per-channel correlation, blind to per-channel centring and scaling: "none",
# "center" and "standardize" are one estimate, listed once as "gauss-ch" (no preprocessing, the
# estimator's own default and the shipped one).
ESTIMATOR_GRID = [
    ("gauss-ch", "gaussian-channel", {"preprocess": "none"}),
    ("gauss-ch/rms", "gaussian-channel", {"preprocess": "rms"}),
    ("gauss-joint/std", "gaussian-joint", {"preprocess": "standardize"}),
    ("gauss-joint/rms", "gaussian-joint", {"preprocess": "rms"}),
    ("renyi/median", "renyi-kernel", {"preprocess": "none", "max_samples": 1024}),
    ("renyi/rms", "renyi-kernel", {"preprocess": "rms", "max_samples": 1024}),
    ("binning/std", "binning", {"preprocess": "standardize"}),
    ("ksg/rms", "ksg", {"preprocess": "rms", "max_samples": 1024}),
]
# Former labels, still accepted on the command line and rewritten by --rerender.
LABEL_ALIASES = {"gauss-ch/std": "gauss-ch", "gauss-ch/none": "gauss-ch"}
# Preprocessings that give the same estimate as another, per estimator (see ESTIMATOR_GRID).
SAME_ESTIMATE = {"gaussian-channel": {"center": "none", "standardize": "none"}}

# (selector, run cost, protect_ends)
SELECTOR_GRID = [
    ("topk", "neg-mi", False),
    ("topk", "neg-mi", True),
    ("fbs", "neg-mi", False),
    ("fbs", "info-loss", False),
    ("fbs", "neg-log-nmi", False),
    ("fbs", "neg-log-nmi", True),
    ("exact", "neg-mi", False),
    ("exact", "info-loss", False),
    ("exact", "neg-log-nmi", False),
    ("exact", "neg-log-nmi", True),
    ("exact", "neg-log-nmi", 0.1),
    ("exact", "neg-mi", 0.1),
    ("topk", "neg-mi", 0.1),
    ("fbs", "neg-log-nmi", 0.1),
]


def selector_label(selector: str, run_cost: str, protect: bool) -> str:
    tag = "" if protect is False else "+protect" if protect is True else f"+protect{protect:g}"
    return (selector if selector == "topk" else f"{selector}/{run_cost}") + tag


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--eval", default="wikitext2-test")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--ns", default="2,4,6,8,10", help="numbers of blocks to remove")
    ap.add_argument("--sleb-samples", type=int, default=8, help="calibration samples for SLEB (0 = skip SLEB)")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--estimators", default="all", help="comma-separated labels from the grid, or all")
    ap.add_argument("--selectors", default="all",
                    help="comma-separated selector labels (topk, topk+protect, fbs/neg-mi, exact/info-loss, ...), or all")
    ap.add_argument("--first-variants", default="gauss-ch,gauss-ch/rms",
                    help="estimator labels also scored with the first position kept ('all' for every one)")
    ap.add_argument("--sleb-tokens", type=int, default=128, help="tokens per SLEB calibration sample")
    ap.add_argument("--full", action="store_true", help="published protocol: 1024-token windows, 80 windows")
    ap.add_argument("--quick", action="store_true", help="tiny random model, two methods, two n (for tests)")
    ap.add_argument("--name", default=None, help="results name (default: derived from model and protocol)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--ppl-cache", default=None,
                    help="JSON file of perplexities per removed set, reused across runs of the same protocol")
    ap.add_argument("--dry-run", action="store_true", help="selections only: list the distinct removed sets")
    ap.add_argument("--suite", choices=("grid", "verified"), default="grid",
                    help="grid: the estimator x selector grid (RESULTS.md, first table); verified: the verified "
                         "default beside the MI-guided greedy, the one-pass default, ShortGPT, angular, random and "
                         "SLEB-style on the same verification tokens (see benchmarks/verified_suite.py)")
    ap.add_argument("--heal", action="store_true", help="with --suite verified: healed rows for every method")
    ap.add_argument("--rerender", default=None, metavar="JSON",
                    help="re-mark the shipped defaults (mi_prun.config) and rename former labels in a results "
                         "JSON, and rewrite its table and plot; no measurement")
    args = ap.parse_args(argv)
    if args.full:
        args.eval_seq_len, args.eval_windows = 1024, 80
    if args.quick:
        args.model = args.model if args.model != "smollm2-135m" else "tiny-llama"
        args.calib, args.eval = "builtin", "builtin"
        args.samples, args.tokens, args.eval_seq_len, args.eval_windows = 8, 64, 64, 4
        args.ns, args.sleb_samples, args.sleb_tokens, args.random_seeds = "1,2", 2, 32, 1
        args.estimators = "gauss-ch"
    suite = "" if args.suite == "grid" else f"-{args.suite}" + ("-heal" if args.heal else "")
    args.name = args.name or (f"quality-{args.model.replace('/', '_')}{suite}" + ("-full" if args.full else "")
                              + ("-quick" if args.quick else ""))
    return args


def canonical_label(label: str) -> str:
    return LABEL_ALIASES.get(label, label)


def label_list(value: str) -> list[str]:
    """Comma-separated estimator labels, former names mapped to the current ones."""
    return [canonical_label(x.strip()) for x in value.split(",") if x.strip()]


def estimate_key(estimator: str, options: dict) -> tuple:
    """What decides an estimate: the estimator and its resolved options (its own defaults filled
    in), with preprocessings that give the same estimate merged (SAME_ESTIMATE)."""
    try:
        resolved = dict(get_estimator(estimator, **dict(options)).options)
    except MiPrunError:  # a results file from an older version: compare what it recorded
        resolved = dict(options)
    pre = resolved.get("preprocess")
    if pre is not None:
        resolved["preprocess"] = SAME_ESTIMATE.get(estimator, {}).get(pre, pre)
    return estimator, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in resolved.items()))


def shipped_defaults() -> dict:
    """The shipped defaults, read from the config types (mi_prun.config), in a row's option keys."""
    a, s = AnalysisConfig(), SelectConfig()
    return {"estimator": a.estimator, "estimator_options": dict(a.estimator_options),
            "estimator_options_resolved": dict(get_estimator(a.estimator, **a.estimator_options).options),
            "drop_first": a.drop_first, "selector": s.method, "run_cost": s.run_cost,
            "protect_ends": s.protect_ends}


def _same_setting(a: Any, b: Any) -> bool:
    # protect_ends True, 1 and 1.0 mean different things; so do False and 0.
    return type(a) is type(b) and a == b


def is_default_row(options: dict) -> bool:
    """Whether a row's configuration is the shipped one (AnalysisConfig() and SelectConfig()).

    The estimate is compared, not the spelling of its options: gaussian-channel with preprocess
    none, center or standardize (or none given) is the default estimate."""
    d = shipped_defaults()
    if "estimator" not in options:
        return False
    return (estimate_key(options["estimator"], options.get("estimator_options", {}))
            == estimate_key(d["estimator"], d["estimator_options"])
            and all(_same_setting(options.get(k), d[k]) for k in ("drop_first", "selector", "run_cost", "protect_ends")))


def relabel(method: str) -> str:
    """An MI row's method name with a former estimator label renamed (`mi-prun <label> ...`)."""
    parts = method.split(" ", 2)
    if len(parts) >= 2 and parts[0] == "mi-prun" and parts[1] in LABEL_ALIASES:
        parts[1] = LABEL_ALIASES[parts[1]]
    return " ".join(parts)


def rerender(path: Path, ns: list[int], plot_it: bool = True) -> dict:
    """Mark the current defaults in an existing results file, rename former estimator labels, and
    rewrite its Markdown and plot. Options, sets and every number stay as they were measured."""
    result = json.loads(path.read_text())
    renamed = dict(result.get("relabelled", {}))
    for row in result["rows"]:
        row["default"] = row["family"] == "mi-prun" and is_default_row(row["options"])
        new = relabel(row["method"])
        if new != row["method"]:
            old_label, new_label = row["method"].split(" ", 2)[1], new.split(" ", 2)[1]
            renamed[old_label] = new_label
            row["method"] = new
    if renamed:
        result["relabelled"] = renamed
    result["defaults"] = shipped_defaults()
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = markdown(result, ns)
    path.with_suffix(".md").write_text(md)
    if plot_it:
        plot(result, ns, path.with_suffix(".png"))
    print(md)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rerender:
        path = Path(args.rerender)
        ns_list = [int(x) for x in args.ns.split(",")]
        if "verification_tokens" in json.loads(path.read_text()):  # a --suite verified results file
            from verified_suite import suite_markdown

            md = suite_markdown(json.loads(path.read_text()), ns_list)
            path.with_suffix(".md").write_text(md)
            print(md)
            return json.loads(path.read_text())
        return rerender(path, ns_list, not args.no_plot)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    ns = [int(x) for x in args.ns.split(",")]
    grid = ESTIMATOR_GRID if args.estimators == "all" else \
        [g for g in ESTIMATOR_GRID if g[0] in label_list(args.estimators)]
    shipped = SelectConfig()
    sel_grid = [(shipped.method, shipped.run_cost, shipped.protect_ends)] if args.quick else \
        [g for g in SELECTOR_GRID if args.selectors == "all" or selector_label(*g) in args.selectors.split(",")]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    L = loaded.n_blocks
    ns = [n for n in ns if 0 < n < L]
    eval_text = load_text(args.eval, purpose="evaluation").text
    base_cfg = AnalysisConfig(calib=args.calib, n_samples=args.samples, seq_len=args.tokens)
    calib = prepare_calibration(loaded, base_cfg)

    # -------------------------------------------------------------- perplexity, cached per set
    # Perplexity per removed set; with --ppl-cache also on disk, keyed by the protocol, so a
    # screening run and a final run of the same protocol evaluate each set once.
    protocol_key = json.dumps([loaded.describe()["spec"], args.eval, args.eval_seq_len, args.eval_windows,
                               args.dtype])
    disk: dict = {}
    if args.ppl_cache and Path(args.ppl_cache).is_file():
        disk = json.loads(Path(args.ppl_cache).read_text()).get(protocol_key, {})
    ppl_cache: dict[tuple, dict] = {tuple(json.loads(k)): v for k, v in disk.items()}

    def ppl_of(removed, kind: str = "plain") -> dict:
        """Perplexity of the model without `removed`; kind "healed": with the closed-form bridges
        (HealConfig() fitted on the analysis's calibration tokens), cached apart."""
        key = tuple(sorted(int(b) for b in removed))
        # healed entries cached before healing checked itself are not reused
        ckey = key if kind == "plain" else ("healed-checked" if HealConfig().check else "healed",) + key
        if args.dry_run:
            ppl_cache.setdefault(ckey, {"ppl": math.nan, "windows": 0, "tokens": 0, "bos": False, "protocol": ""})
        if ckey not in ppl_cache:
            extra: dict = {}
            if kind == "healed":
                from mi_prun.heal import heal

                t0 = time.perf_counter()
                model, record = heal(loaded.model, key, calib)
                extra = {"heal_seconds": time.perf_counter() - t0,
                         "heal_runs": [{"blocks": [r.start, r.end - 1], "ridge": r.ridge,
                                        "unexplained_unhealed": r.unexplained_unhealed,
                                        "unexplained_healed": r.unexplained_healed, "kept": r.kept,
                                        "holdout_nll": r.holdout_nll} for r in record.runs]}
            else:
                model = pruned_view(loaded.model, key) if key else loaded.model
            res = perplexity(model, loaded.tokenizer, eval_text, seq_len=args.eval_seq_len,
                             max_windows=args.eval_windows, batch_size=4)
            ppl_cache[ckey] = {"ppl": res.ppl, "windows": res.windows, "tokens": res.tokens_scored,
                               "bos": res.bos, "protocol": res.protocol, **extra}
            log.info("ppl %8.2f  %s removed %s", res.ppl, kind, list(key))
            if args.ppl_cache:
                path = Path(args.ppl_cache)
                store = json.loads(path.read_text()) if path.is_file() else {}
                store[protocol_key] = {json.dumps(list(k)): v for k, v in ppl_cache.items()}
                path.write_text(json.dumps(store))
        return ppl_cache[ckey]

    dense = ppl_of(())
    rows: list[dict[str, Any]] = []

    def add(method: str, family: str, n: int, removed, *, options: dict, analysis_s: float,
            select_s: float = 0.0, passes: int = 0, objective: float = math.nan, default: bool = False) -> None:
        p = ppl_of(removed)
        rows.append({"method": method, "family": family, "n": n, "removed": sorted(int(b) for b in removed),
                     "ppl": p["ppl"], "options": options, "analysis_seconds": analysis_s,
                     "select_seconds": select_s, "forward_passes": passes,
                     "objective": None if not math.isfinite(objective) else objective, "default": default})

    # -------------------------------------------------------------- MI-PRUN variants
    captures = {}
    for drop_first in (True, False):
        cfg = replace(base_cfg, drop_first=drop_first)
        captures[drop_first] = (cfg, run_capture(loaded, calib, cfg))
        log.info("capture drop_first=%s: %.1fs", drop_first, captures[drop_first][1].seconds)
    # -------------------------------------------------------------- baselines, same capture
    # The baselines score the same capture (with the default first-position choice); they run
    # first so that an interrupted run still has its reference rows (perplexities are cached).
    # They run as published, every block removable: protect_ends=False is explicit because
    # select() and sleb_select() default to the shipped SelectConfig, which protects the ends.
    cfg, cap = captures[base_cfg.drop_first]
    t_an = time.perf_counter()
    default_analysis = analysis_from_capture(loaded, calib, cap, cfg)
    base_s = cap.seconds
    if args.suite == "verified":
        return _verified(args, loaded, default_analysis, ppl_of, dense, ns,
                         base_s + time.perf_counter() - t_an, calib, argv)
    for method in ("shortgpt", "angular"):
        for n in ns:
            sel = select(default_analysis, method, n=n, protect_ends=False)
            add(method, "baseline", n, sel.removed, analysis_s=base_s, select_s=sel.seconds, options={})
    for seed in range(args.random_seeds):
        for n in ns:
            sel = select(default_analysis, "random", n=n, seed=seed, protect_ends=False)
            add(f"random (seed {seed})", "random", n, sel.removed, analysis_s=0.0, options={"seed": seed})
    if args.sleb_samples > 0:
        sleb_cfg = replace(base_cfg, n_samples=args.sleb_samples, seq_len=args.sleb_tokens, seed=1)
        sleb_calib = prepare_calibration(loaded, sleb_cfg)
        sel = sleb_select(loaded.model, sleb_calib.input_ids, n=max(ns), protect_ends=False)
        # SLEB is greedy and incremental: the set after step t is its answer for n = t + 1.
        passes = 0
        for step in sel.trajectory:
            n = len(step["removed"])
            passes += len(step.get("candidates", []))
            if n in ns:
                add("sleb", "sleb", n, step["removed"], analysis_s=step["elapsed"], passes=passes,
                    options={"calibration": f"{args.sleb_samples} x {args.sleb_tokens} tokens of {args.calib}"})

    firsts = label_list(args.first_variants)
    for label, est, opts in grid:
        for drop_first in (True, False):
            if not drop_first and args.first_variants != "all" and label not in firsts:
                continue
            cfg, cap = captures[drop_first]
            cfg = replace(cfg, estimator=est, estimator_options=dict(opts))
            t0 = time.perf_counter()
            try:
                analysis = analysis_from_capture(loaded, calib, cap, cfg)
            except Exception as exc:  # an estimator failing is a result too
                log.warning("estimator %s failed: %s", label, exc)
                continue
            analysis_s = cap.seconds + (time.perf_counter() - t0)
            for selector, run_cost, protect in sel_grid:
                for n in ns:
                    try:
                        sel = select(analysis, selector, n=n, run_cost=run_cost, protect_ends=protect)
                    except Exception as exc:
                        log.warning("%s/%s n=%d failed: %s", label, selector, n, exc)
                        continue
                    options = {"estimator": est, "estimator_options": opts, "drop_first": drop_first,
                               "selector": selector, "run_cost": run_cost, "protect_ends": protect}
                    name = (f"mi-prun {label}{'' if drop_first else ' +first'} {selector}"
                            + (f"/{run_cost}" if selector != "topk" else "") + ("" if protect is False else " protect-ends" if protect is True else f" protect-{protect:g}"))
                    add(name, "mi-prun", n, sel.removed, analysis_s=analysis_s, select_s=sel.seconds,
                        objective=sel.objective, default=is_default_row(options), options=options)

    result = {
        "name": args.name,
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": loaded.describe(),
        "protocol": {"calibration": calib.provenance, "eval_source": args.eval, "eval_seq_len": args.eval_seq_len,
                     "eval_windows": dense["windows"], "eval_tokens": dense["tokens"], "bos": dense["bos"],
                     "perplexity_protocol": dense["protocol"],
                     "sleb_calibration": f"{args.sleb_samples} x {args.sleb_tokens} tokens"},
        "defaults": shipped_defaults(),
        "dense_ppl": dense["ppl"],
        "rows": rows,
        "environment": {"device": str(loaded.device), "threads": torch.get_num_threads(),
                        "platform": platform.platform(), **library_versions()},
    }
    if args.dry_run:
        sets = sorted({tuple(r["removed"]) for r in rows}, key=lambda k: (len(k), k))
        print(f"{len(sets)} distinct removed sets; not yet evaluated: "
              f"{sum(1 for k in sets if math.isnan(ppl_cache[k]['ppl']))}")
        for r in rows:
            print(f"{r['method']:60s} n={r['n']:2d} {r['removed']}")
        return result
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = markdown(result, ns)
    (out_dir / f"{args.name}.md").write_text(md)
    if not args.no_plot:
        plot(result, ns, out_dir / f"{args.name}.png")
    print(md)
    return result


def _verified(args, loaded, analysis, ppl_of, dense: dict, ns: list[int], analysis_s: float, calib,
              argv) -> dict:
    """--suite verified (benchmarks/verified_suite.py): one results file, its table and bars."""
    from verified_suite import run_suite, suite_markdown

    suite = run_suite(args, loaded, analysis, ppl_of, ns)
    result = {
        "name": args.name,
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {k: v for k, v in loaded.describe().items() if k != "identity"},
        "protocol": {"calibration": calib.provenance, "eval_source": args.eval, "eval_seq_len": args.eval_seq_len,
                     "eval_windows": dense["windows"], "eval_tokens": dense["tokens"], "bos": dense["bos"],
                     "perplexity_protocol": dense["protocol"]},
        "defaults": shipped_defaults(), "dense_ppl": dense["ppl"], "analysis_seconds": analysis_s, **suite,
        "environment": {"device": str(loaded.device), "threads": torch.get_num_threads(),
                        "platform": platform.platform(), **library_versions()},
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = suite_markdown(result, ns)
    (out_dir / f"{args.name}.md").write_text(md)
    print(md)
    return result


def table(result: dict, ns: list[int]) -> list[dict]:
    """One entry per method: perplexity per n, mean over n; random seeds averaged into one line."""
    by: dict[str, dict] = {}
    for r in result["rows"]:
        name = "random (mean of seeds)" if r["family"] == "random" else r["method"]
        e = by.setdefault(name, {"method": name, "family": r["family"], "default": False, "ppl": {},
                                 "analysis_seconds": r["analysis_seconds"], "passes": 0, "removed": {}})
        e["default"] |= r["default"]
        e["ppl"].setdefault(r["n"], []).append(r["ppl"])
        e["removed"][r["n"]] = r["removed"]
        e["passes"] = max(e["passes"], r["forward_passes"])
        e["analysis_seconds"] = max(e["analysis_seconds"], r["analysis_seconds"])
    out = []
    for e in by.values():
        e["ppl"] = {n: float(np.mean(v)) for n, v in e["ppl"].items()}
        vals = [e["ppl"][n] for n in ns if n in e["ppl"]]
        e["geo_mean"] = float(np.exp(np.mean(np.log(vals)))) if vals else math.inf
        out.append(e)
    return sorted(out, key=lambda e: e["geo_mean"])


def markdown(result: dict, ns: list[int]) -> str:
    rows = table(result, ns)
    p = result["protocol"]
    head = (f"Model `{result['model']['spec']}` ({result['model']['n_blocks']} blocks); dense perplexity "
            f"**{result['dense_ppl']:.2f}**. Evaluation: {p['eval_source']}, {p['eval_windows']} windows of "
            f"{p['eval_seq_len']} tokens ({p['eval_tokens']} tokens scored, BOS "
            f"{'prepended' if p['bos'] else 'not used'}). Calibration: {p['calibration']['n_samples']} x "
            f"{p['calibration']['seq_len']} tokens of {p['calibration']['source']}. Blocks numbered from 0.\n\n"
            f"Command: `{result['command']}`\n\n")
    if result.get("relabelled"):
        names = ", ".join(f"`{a}` is now `{b}`" for a, b in result["relabelled"].items())
        head += (f"Estimator labels renamed after this run ({names}): the recorded options and every number are "
                 f"as measured; gaussian-channel gives one estimate with or without per-channel centring or "
                 f"standardisation.\n\n")
    cols = " | ".join(f"n={n}" for n in ns)
    lines = [head, f"| method | {cols} | geo. mean | analysis s | forward passes |",
             "|---|" + "---|" * len(ns) + "---|---|---|"]
    for e in rows:
        name = f"**{e['method']} (default)**" if e["default"] else e["method"]
        vals = " | ".join(f"{e['ppl'][n]:.1f}" if n in e["ppl"] else "" for n in ns)
        lines.append(f"| {name} | {vals} | {e['geo_mean']:.1f} | {e['analysis_seconds']:.1f} | {e['passes'] or ''} |")
    lines.append("")
    lines.append(bar_check(result, ns))
    return "\n".join(lines) + "\n"


def bar_check(result: dict, ns: list[int]) -> str:
    """The issue's bar: the default is no worse than the best of ShortGPT and angular at n = 4, 6, 8."""
    rows = {e["method"]: e for e in table(result, ns)}
    default = next((e for e in rows.values() if e["default"]), None)
    if default is None:
        return "Bar: the default configuration was not part of this run."
    out = []
    for n in (4, 6, 8):
        if n not in default["ppl"]:
            continue
        refs = [rows[m]["ppl"][n] for m in ("shortgpt", "angular") if m in rows and n in rows[m]["ppl"]]
        if not refs:
            continue
        best = min(refs)
        ok = default["ppl"][n] <= best
        out.append(f"n={n}: default {default['ppl'][n]:.1f} vs best baseline {best:.1f} {'PASS' if ok else 'FAIL'}")
    return "Bar (default <= best of ShortGPT and angular): " + "; ".join(out) if out else ""


def plot(result: dict, ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(result, ns)
    default = [e for e in rows if e["default"]]
    best_mi = [e for e in rows if e["family"] == "mi-prun" and not e["default"]][:3]
    others = [e for e in rows if e["family"] in ("baseline", "sleb", "random")]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for e in default + best_mi + others:
        xs = [n for n in ns if n in e["ppl"]]
        style = {"linewidth": 2.6} if e["default"] else {"linewidth": 1.2, "linestyle": "--" if e["family"] == "mi-prun" else "-"}
        ax.plot(xs, [e["ppl"][n] for n in xs], marker="o", label=e["method"] + (" (default)" if e["default"] else ""), **style)
    ax.axhline(result["dense_ppl"], color="grey", linestyle=":", label=f"dense ({result['dense_ppl']:.1f})")
    ax.set_yscale("log")
    # Random removal explodes by orders of magnitude; clip the axis to the methods worth comparing.
    shown = [v for e in default + best_mi + others if e["family"] != "random" for v in e["ppl"].values()]
    if shown:
        ax.set_ylim(result["dense_ppl"] * 0.9, max(shown) * 1.5)
        ax.text(0.99, 0.01, "random removal: off the chart above (see table)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(f"{result['model']['spec']}: perplexity after pruning")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
