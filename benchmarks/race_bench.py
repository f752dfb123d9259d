"""Racing in the verified search, side by side in one process: today's search against the raced ones.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/race_bench.py --model smollm2-135m --ns 2,4,6,8,10
    MI_PRUN_DATA_DIR=../shared/data python benchmarks/race_bench.py --model path/to/model.gguf --ns 2,4,6
    python benchmarks/race_bench.py --quick            # tiny random model, seconds (used by the tests)

One model load and one analysis with the shipped defaults (`AnalysisConfig(calib=--calib)`), timed.
Then for every n and every variant of `SelectConfig.verify_race` (`--variants`, default
off,sets,units), the shipped verified selection (`SelectConfig(n=n, verify_race=variant)`) from a
cold NLL cache, timed: off is the search before racing (the budget in sets, every set on every
sample), sets the same search raced (the budget in sets), units the raced search whose budget is in
token-block units (the auto passes x the mean units of a full pass of the candidates), so what the
race saves buys more exchanges and swaps. Per row: the set chosen, its test perplexity, the sets
scored and dropped, the new forward passes (+ the confirmation's), the token-block units charged
(for off, the units of its passes, counted by the scorer's arithmetic; both as from a cold cache),
the units really run (less where kept runs' states served), the wall time and the prune time over
the analysis time, whether the search converged or its budget ran out, and when the winner was first
scored (its place among the sets, and raced the units charged up to it, in the JSON, as are the race's
looks and how many sets it dropped at each, `drops_at`), and the seconds until the progress first named
a best set so far and until the best so far was the final answer (what the CLI and the app show while
the search runs; `AnswerClock`). Beside each n, the test perplexity of ShortGPT's set, the angular window and the
one-pass answer (`--baselines`); the process's peak resident memory.

Test perplexity follows benchmarks/quality.py: the raw WikiText-2 test split (`--eval`), windows of
`--eval-seq-len` tokens, the first `--eval-windows` windows, every set scored on the same windows.

Writes benchmarks/results/<name>.json and <name>.md (`--out-dir`, `--name`; default
race-<model>[-quick]).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mi_prun.config import AnalysisConfig, SelectConfig  # noqa: E402
from mi_prun.data import load_text  # noqa: E402
from mi_prun.evaluate import perplexity  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analyze  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.select.registry import make_problem  # noqa: E402
from mi_prun.select.scorer import model_scorer  # noqa: E402

log = logging.getLogger("race_bench")


def common_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every racing benchmark takes: the model, the calibration text, the n, threads,
    the quick mode and where the results go."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a zoo name, folder, .gguf file or HF id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--ns", default="2,4,6,8,10", help="numbers of blocks to remove")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, n = 1, 2, small tokens (for tests)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = common_parser(__doc__)
    ap.add_argument("--variants", default=",".join(reversed(SelectConfig.RACE_MODES)),
                    help="verify_race values to compare, comma-separated (off = the search before racing)")
    ap.add_argument("--eval", default="wikitext2-test")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--baselines", default="shortgpt,angular",
                    help="one-shot selectors whose test perplexity is given beside each n, comma-separated "
                         "(empty: none); the one-pass answer of the verified search is always given")
    ap.add_argument("--warm", default="", help="a verify_race value: after the cold rows, verify every n of --ns in "
                                                "order on one shared NLL cache, as the app's 'Verify every n' does, "
                                                "and time each n (empty: no sweep)")
    args = finish_args(ap, ap.parse_args(argv), "race", {"verify_samples": 8, "verify_seq_len": 32}, empty_ns=True)
    if args.quick:
        args.eval, args.eval_seq_len, args.eval_windows = "builtin", 64, 4
    modes = SelectConfig.RACE_MODES
    bad = [v for v in args.variants.split(",") + [args.warm] if v.strip() and v.strip() not in modes]
    if bad:
        ap.error(f"--variants / --warm take {', '.join(modes)}; got {', '.join(map(repr, bad))}")
    return args


def finish_args(ap: argparse.ArgumentParser, args: argparse.Namespace, prefix: str, quick_select: dict[str, Any],
                empty_ns: bool = False) -> argparse.Namespace:
    """What every racing benchmark does with its parsed arguments: `--quick`'s settings (the tiny
    random model, n = 1, 2, a small capture, the verification settings `quick_select`), `--ns` as
    numbers in `args.n_list` (checked before the model loads: a typo must not cost a load and an
    analysis; empty only with `empty_ns`), and the result's name, <prefix>-<model>[-quick]."""
    args.select, args.analysis = {}, {}
    if args.quick:
        args.model = args.model if args.model != "smollm2-135m" else "tiny-llama"
        args.calib, args.ns = "builtin", "1,2"
        args.analysis = {"n_samples": 8, "seq_len": 48}
        args.select = dict(quick_select)
    try:
        args.n_list = [int(x) for x in args.ns.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--ns must be whole numbers separated by commas (e.g. 2,4,6){' or empty' if empty_ns else ''}, "
                 f"got {args.ns!r}")
    if any(n < 1 for n in args.n_list) or not (args.n_list or empty_ns):
        ap.error(f"--ns: every n must be at least 1{'' if empty_ns else ', and one n at least'}, got {args.ns!r}")
    stem = Path(args.model).stem if args.model.endswith(".gguf") else args.model.replace("/", "_")
    args.name = args.name or f"{prefix}-{stem}" + ("-quick" if args.quick else "")
    return args


def load_and_analyze(args: argparse.Namespace, script: str) -> tuple[Any, Any, dict[str, Any]]:
    """(loaded model, analysis, the result's head) of a racing benchmark that replays searches on one
    analysis: torch's threads, one load, one analysis with the shipped defaults (timed), and the
    result with an empty `rows` list and the command that reproduces it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    analysis = analyze(loaded, AnalysisConfig(calib=args.calib, **args.analysis))
    t_analysis = time.perf_counter() - t0
    return loaded, analysis, {
        "model": loaded.describe() if hasattr(loaded, "describe") else {"spec": args.model},
        "n_blocks": loaded.n_blocks, "calib": args.calib, "analysis_seconds": round(t_analysis, 2),
        "select": args.select, "rows": [], "torch_threads": torch.get_num_threads(),
        "command": f"MI_PRUN_DATA_DIR=../shared/data python benchmarks/{script} " + " ".join(sys.argv[1:])}


def units_of(scorer: Any, rows: list[Any]) -> int | None:
    """Token-block units of the sets an unraced search ran (None when the scorer cannot count them)."""
    if not hasattr(scorer, "units"):
        return None
    return int(sum(scorer.units(r.removed) for r in rows if not r.cached))


def unraced_units(loaded: Any, analysis: Any, cfg: SelectConfig, cache: NLLCache, sel: Any) -> int | None:
    """What the passes of the unraced selection `sel` ran, by the scorer's own count (its scorer is
    rebuilt on `cache`, whose dense states it reuses)."""
    problem = make_problem(analysis, cfg)
    return units_of(model_scorer(loaded, analysis, cfg, n_blocks=problem.n_blocks, starts=problem.allowed,
                                 cache=cache), sel.candidates)


def units_run(cache: NLLCache) -> int | None:
    """Token-block units the search's passes really ran (kept runs' states make it less than the
    charge; the dense pass and the confirmation's fresh draw not included)."""
    pre = cache.prefix
    return None if pre is None else int(pre["runner"].work)


def winner_found(sel: Any) -> dict[str, Any]:
    """When the search first scored its winner: the set's place in the order scored (1 = the first) and,
    raced, the token-block units charged up to and with it (how much of the search the answer needed)."""
    rows = list(sel.candidates)
    at = next((i for i, r in enumerate(rows) if tuple(r.removed) == tuple(sel.removed)), None)
    if at is None:  # a selection that scored no set (unverified); a verified winner is always among its sets
        return {"winner_at_set": None, "winner_at_units": None}
    charged = [r.units for r in rows[:at + 1]]
    return {"winner_at_set": at + 1,
            "winner_at_units": None if any(u is None for u in charged) else int(sum(charged))}


class AnswerClock:
    """A progress callback that notes when the search first named a best set of n so far (what the CLI and
    the app show while it runs) and when the best so far first was the final answer."""

    MARK = "best so far removes "

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.named: list[tuple[float, str]] = []  # (seconds, the set as the message names it)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if self.MARK in message:
            named = message.split(self.MARK, 1)[1].split(" (NLL", 1)[0]
            if not self.named or self.named[-1][1] != named:
                self.named.append((time.perf_counter() - self.t0, named))

    def times(self, removed: Any, total: float) -> dict[str, Any]:
        """Seconds to the first best-so-far set, and to the final answer named as the best so far (the
        whole run when only the confirmation chose it)."""
        want = ", ".join(map(str, removed))
        final = next((t for t, named in self.named if named == want), total)
        return {"first_answer_s": round(self.named[0][0], 2) if self.named else None,
                "final_answer_s": round(final, 2)}


def drops_at(sel: Any) -> dict[str, int]:
    """How many sets the race dropped at each look: {samples scored: sets} (empty unraced)."""
    at = Counter(int(r.samples) for r in sel.candidates if not r.complete)
    return {str(k): v for k, v in sorted(at.items())}


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    acfg = AnalysisConfig(calib=args.calib, **args.analysis)
    t0 = time.perf_counter()
    analysis = analyze(loaded, acfg)
    t_analysis = time.perf_counter() - t0
    log.info("analysis %.1fs", t_analysis)
    eval_text = load_text(args.eval, purpose="evaluation").text
    ppl: dict[tuple[int, ...], float] = {}
    protocol: dict[str, Any] = {}

    def ppl_of(removed: tuple[int, ...]) -> float:
        """Test perplexity of the model without `removed` (benchmarks/quality.py's protocol), once per set."""
        if removed not in ppl:
            res = perplexity(pruned_view(loaded.model, removed) if removed else loaded.model, loaded.tokenizer,
                             eval_text, seq_len=args.eval_seq_len, max_windows=args.eval_windows, batch_size=4)
            ppl[removed] = float(res.ppl)
            protocol.update(text=res.protocol, tokens=res.tokens_scored, windows=res.windows, bos=res.bos)
        return ppl[removed]

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    rows: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "model": loaded.describe() if hasattr(loaded, "describe") else {"spec": args.model},
        "n_blocks": loaded.n_blocks, "calib": args.calib, "analysis_seconds": round(t_analysis, 2),
        "load_seconds": round(t_load, 2), "analysis_config": repr(acfg),
        "select_defaults": {"verify_passes": SelectConfig().verify_passes, "verify_race": SelectConfig().verify_race,
                            "verify_race_alpha": SelectConfig().verify_race_alpha,
                            "verify_race_group": SelectConfig().verify_race_group, **args.select},
        "eval": {"text": args.eval, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                 "dense_ppl": ppl_of(()), "protocol": protocol},
        "rows": rows, "one_shot": others, "peak_rss_mb_after_analysis": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_1min_at_start": round(load1, 2),
        "command": "MI_PRUN_DATA_DIR=../shared/data python benchmarks/race_bench.py " + " ".join(sys.argv[1:]),
    }
    for n in args.n_list:
        if not 0 < n < loaded.n_blocks:
            continue
        for variant in variants:
            cfg = SelectConfig(n=n, verify_race=variant, **args.select)
            cache = NLLCache()
            t0 = time.perf_counter()
            clock = AnswerClock()
            sel = select(analysis, config=cfg, model=loaded, cache=cache, progress=clock)
            seconds = time.perf_counter() - t0
            v = sel.verification
            race = v.get("race") or {}
            conf = v.get("confirm") or {}
            units = race.get("units")
            if units is None:  # unraced: what its passes ran, by the scorer's own count
                units = unraced_units(loaded, analysis, cfg, cache, sel)
            row = {"n": n, "variant": variant, "removed": list(sel.removed),
                   "one_pass_removed": list(sel.one_pass_removed or []), "verification_nll": sel.nll,
                   "test_ppl": None, "sets_scored": v.get("sets_scored"),
                   "dropped": race.get("dropped", 0), "new_passes": sel.forward_passes - (conf.get("passes") or 0),
                   "confirm_passes": conf.get("passes") or 0, "dense_passes": v.get("dense_passes"),
                   "budget_sets": v.get("budget"), "unit_budget": race.get("unit_budget"), "units": units,
                   "units_unraced": race.get("units_unraced"), "units_run": units_run(cache),
                   "sets_by_stage": v.get("sets_by_stage"), "stopped": v.get("stopped"),
                   "looks": race.get("looks"), "drops_at": drops_at(sel), **winner_found(sel),
                   **clock.times(sel.removed, seconds),
                   "seconds": round(seconds, 2), "prune_over_analysis": round(seconds / t_analysis, 2)}
            row["test_ppl"] = ppl_of(tuple(sel.removed))
            row["peak_rss_mb"] = peak_rss_mb()
            log.info("n=%d %-5s removed %s ppl %.2f, %s sets, %s units, %.1fs", n, variant, row["removed"],
                     row["test_ppl"], row["sets_scored"], row["units"], seconds)
            rows.append(row)
            if save is not None:  # a long run keeps what it has measured
                save(result)
        one_pass = next((r["one_pass_removed"] for r in rows if r["n"] == n and r["one_pass_removed"]), None)
        picks = [(b, tuple(select(analysis, config=SelectConfig(n=n, method=b)).removed)) for b in baselines]
        picks += [("one-pass", tuple(one_pass))] if one_pass else []
        for name, removed in picks:
            others.append({"n": n, "method": name, "removed": list(removed), "test_ppl": ppl_of(removed)})
            log.info("n=%d %s removed %s ppl %.2f", n, name, list(removed), others[-1]["test_ppl"])
        if save is not None:
            save(result)
    if args.warm:  # the app's sweep: one cache for every n, so sets (and kept runs) measured at one n serve the next
        cache = NLLCache()
        cold = {(r["n"], r["variant"]): r for r in rows}
        result["warm"] = warm = []
        for n in [n for n in args.n_list if n < loaded.n_blocks]:
            t0 = time.perf_counter()
            before = units_run(cache) or 0
            sel = select(analysis, config=SelectConfig(n=n, verify_race=args.warm, **args.select), model=loaded,
                         cache=cache)
            same = cold.get((n, args.warm))
            warm.append({"n": n, "variant": args.warm, "removed": list(sel.removed),
                         "same_as_cold": None if same is None else same["removed"] == list(sel.removed),
                         "units": (sel.verification.get("race") or {}).get("units"),
                         "units_run": (units_run(cache) or 0) - before,
                         "seconds": round(time.perf_counter() - t0, 2)})
            log.info("warm n=%d removed %s in %.1fs", n, warm[-1]["removed"], warm[-1]["seconds"])
            if save is not None:
                save(result)
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table: one line per (n, variant)."""
    e = result["eval"]
    out = [f"Model `{result['model'].get('spec')}` ({result['n_blocks']} blocks), calibration `{result['calib']}`; "
           f"analysis {result['analysis_seconds']} s; test perplexity on `{e['text']}`, {e['windows']} windows of "
           f"{e['seq_len']} tokens (dense {e['dense_ppl']:.2f})." + (" Each row from a cold NLL cache; off = the "
                                                                      "search before racing." if result["rows"] else
                                                                      " No verified selection was run (--ns or "
                                                                      "--variants empty).")]
    if result["rows"]:
        out += ["", "| n | variant | removed | test ppl | sets scored | dropped | new passes (+confirm) | units | "
                    "units / off | units run | wall s | best so far: first / final s | prune / analysis | stopped | "
                    "winner at set |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    off = {r["n"]: r for r in result["rows"] if r["variant"] == "off"}
    for r in result["rows"]:
        base = off.get(r["n"])
        ratio = (f"{r['units'] / base['units']:.2f}" if base and base.get("units") and r.get("units") is not None
                 else "-")
        ppl = "-" if r["test_ppl"] is None or not math.isfinite(r["test_ppl"]) else f"{r['test_ppl']:.2f}"
        out.append(f"| {r['n']} | {r['variant']} | {' '.join(map(str, r['removed']))} | {ppl} | {r['sets_scored']} | "
                   f"{r['dropped']} | {r['new_passes']} (+{r['confirm_passes']}) | "
                   f"{'-' if r['units'] is None else format(r['units'], ',')} | {ratio} | "
                   f"{'-' if r.get('units_run') is None else format(r['units_run'], ',')} | {r['seconds']} | "
                   f"{r.get('first_answer_s') or '-'} / {r.get('final_answer_s') or '-'} | "
                   f"{r['prune_over_analysis']} | {r.get('stopped') or '-'} | {r.get('winner_at_set') or '-'} |")
    if result.get("one_shot"):
        out += ["", "The one-shot answers on the same capture and test windows (one-pass: the verified search's "
                    "starting point, before any set is scored):", "", "| n | method | removed | test ppl |",
                "|---|---|---|---|"]
        out += [f"| {o['n']} | {o['method']} | {' '.join(map(str, o['removed']))} | {o['test_ppl']:.2f} |"
                for o in result["one_shot"]]
    if result.get("warm"):
        out += ["", f"Every n in order on one NLL cache ({result['warm'][0]['variant']}, as the app's 'Verify every n'):",
                "", "| n | removed | same as cold | units run | wall s |", "|---|---|---|---|---|"]
        out += [f"| {w['n']} | {' '.join(map(str, w['removed']))} | "
                f"{'-' if w['same_as_cold'] is None else ('yes' if w['same_as_cold'] else 'no')} | "
                f"{w['units_run']:,} | {w['seconds']} |" for w in result["warm"]]
    if result.get("peak_rss_mb"):
        out += ["", f"Peak resident memory of the process: {result['peak_rss_mb_after_analysis']:,} MB after the "
                    f"load and the analysis, {result['peak_rss_mb']:,} MB at the end."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_write(parse_args(argv), run, markdown)


def run_and_write(args: argparse.Namespace, run: Any, markdown: Any) -> dict[str, Any]:
    """Run a benchmark, keeping its JSON as it goes (`run(args, save)`), then write and print its
    Markdown: <out-dir>/<name>.json and .md."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    result = run(args, save)
    save(result)
    md = markdown(result)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
