"""When may a raced set be dropped, and in which order are sets raced? The race's look schedules
and orders replayed on one model's real NLLs.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/race_looks.py --model smollm2-135m --ns 2,4,6,8,10
    python benchmarks/race_looks.py --quick            # tiny random model, seconds (used by the tests)

One model load and one analysis with the shipped defaults (`AnalysisConfig(calib=--calib)`). For
every n, the unraced verified search (`verify_race="off"`) from a cold NLL cache, timed: it scores
every set it tries on every verification sample and keeps each set's per-sample NLLs. Then, on that
same cache, the raced search (`verify_race="sets"`, the shipped mode) once per look schedule
(`RaceRule.schedule`, `--schedules`), race order (`RaceRule.order`, `--orders`: "field", a stage's
first looks first, or "sequence", one set after another) and group size (`verify_race_group`,
`--groups`). A warm cache
changes the work a race does, never its decisions or its charge (tests/test_race.py): the looks
are replayed from the first group, so each raced row is what a cold run would choose and be charged,
in seconds instead of minutes (sets no earlier row scored are run for real). Per row: the set
chosen, whether it is the unraced set, the sets scored and dropped, at which looks the drops fell,
the token-block units charged and their ratio to the unraced search's; and, per schedule and group
size, what a race with that rule could spend at best on the same sets (`best_cases`): the oracle
(every set raced against the final winner from the start) and the floor (every set but the winner
charged its first look only), as ratios to the unraced search's units.

What it does not give: wall times of the raced rows (their work came from the cache; race_bench.py
times the shipped default from a cold cache) or test perplexity (the same set as the unraced search
has its test perplexity in race_bench.py's rows).

Writes benchmarks/results/<name>.json and <name>.md (`--out-dir`, `--name`; default
race-looks-<model>[-quick]).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from mi_prun.config import SelectConfig  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.select.race import Race, RaceRule  # noqa: E402
from mi_prun.select.registry import make_problem  # noqa: E402
from mi_prun.select.scorer import model_scorer  # noqa: E402
from race_bench import (common_parser, drops_at, finish_args, load_and_analyze, peak_rss_mb,  # noqa: E402
                        run_and_write, unraced_units)

log = logging.getLogger("race_looks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = common_parser(__doc__)
    ap.add_argument("--schedules", default=",".join(RaceRule.SCHEDULES), help="RaceRule schedules, comma-separated")
    ap.add_argument("--orders", default=",".join(RaceRule.ORDERS), help="RaceRule orders, comma-separated")
    ap.add_argument("--groups", default=str(SelectConfig().verify_race_group),
                    help="verify_race_group values (samples per group), comma-separated")
    args = finish_args(ap, ap.parse_args(argv), "race-looks",
                       {"verify_samples": 16, "verify_seq_len": 32, "verify_race_alpha": 0.2})
    try:  # checked before the model loads, as --ns
        args.group_list = [int(x) for x in args.groups.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--groups takes whole numbers separated by commas; got {args.groups!r}")
    if not args.group_list or any(g < 1 for g in args.group_list):
        ap.error(f"--groups needs at least one number, each at least 1; got {args.groups!r}")
    args.schedule_list = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in args.schedule_list if s not in RaceRule.SCHEDULES]
    if bad or not args.schedule_list:
        ap.error(f"--schedules takes {', '.join(RaceRule.SCHEDULES)}; got {args.schedules!r}")
    args.order_list = [s.strip() for s in args.orders.split(",") if s.strip()]
    if not args.order_list or any(s not in RaceRule.ORDERS for s in args.order_list):
        ap.error(f"--orders takes {', '.join(RaceRule.ORDERS)}; got {args.orders!r}")
    return args


def raced(analysis: Any, loaded: Any, cache: NLLCache, n: int, group: int, schedule: str, order: str,
          select_kw: dict[str, Any]) -> Any:
    """The shipped raced search at n with this look schedule, order and group size, on `cache`."""
    shipped = SelectConfig.RACE_LOOKS, SelectConfig.RACE_ORDER
    SelectConfig.RACE_LOOKS, SelectConfig.RACE_ORDER = schedule, order  # class constants the search reads
    try:
        return select(analysis, config=SelectConfig(n=n, verify_race="sets", verify_race_group=group, **select_kw),
                      model=loaded, cache=cache)
    finally:
        SelectConfig.RACE_LOOKS, SelectConfig.RACE_ORDER = shipped


def best_cases(analysis: Any, loaded: Any, cache: NLLCache, off: Any, group: int, schedule: str,
               select_kw: dict[str, Any]) -> dict[str, int]:
    """What a race with this rule (groups, looks, alpha) could spend at best on the unraced search's
    sets, from their per-sample NLLs in `cache`:
    - "oracle": every set raced against the final winner from the start (the incumbent it trails
      most, which a real search knows only at its end), charged up to the first look that drops it,
      or in full; the winner in full;
    - "floor": every set but the winner charged its first look only (no race with this first look
      spends less on these sets, whatever its order or incumbents)."""
    cfg = SelectConfig(n=len(off.removed), **select_kw)
    problem = make_problem(analysis, cfg)
    scorer = model_scorer(loaded, analysis, cfg, n_blocks=problem.n_blocks, starts=problem.allowed,
                          batch_size=group, cache=cache)
    race = Race(scorer, RaceRule(cfg.verify_race_alpha, SelectConfig.RACE_MIN_SAMPLES, schedule), store={})
    groups, rule = race.groups, race.rule
    looks = rule.looks(groups)
    winner = tuple(off.removed)
    best = cache.sample_nll(winner)
    oracle = floor = 0
    for key in dict.fromkeys(tuple(r.removed) for r in off.candidates):
        if key == winner:
            oracle, floor = oracle + race.full_cost(key), floor + race.full_cost(key)
            continue
        floor += race.first_look_cost(key)
        per, seen, spent = cache.sample_nll(key), [], 0
        for g, members in enumerate(groups):  # the looks against the winner, as `Race.score` makes them
            spent, seen = spent + int(scorer.units(key, [g])), seen + members
            if len(seen) in looks and rule.drops([per[i] - best[i] for i in seen], race.n_looks):
                break
        oracle += spent
    return {"oracle": oracle, "floor": floor}


def run(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    loaded, analysis, result = load_and_analyze(args, "race_looks.py")
    rows: list[dict[str, Any]] = result["rows"]
    result["shipped"] = {"schedule": SelectConfig.RACE_LOOKS, "order": SelectConfig.RACE_ORDER,
                         "group": SelectConfig().verify_race_group, "alpha": SelectConfig().verify_race_alpha,
                         "min_samples": SelectConfig.RACE_MIN_SAMPLES}
    for n in args.n_list:
        if not 0 < n < loaded.n_blocks:
            continue
        cfg = SelectConfig(n=n, verify_race="off", **args.select)
        cache = NLLCache()
        t0 = time.perf_counter()
        off = select(analysis, config=cfg, model=loaded, cache=cache)
        seconds = time.perf_counter() - t0
        off_units = unraced_units(loaded, analysis, cfg, cache, off)
        rows.append({"n": n, "variant": "off", "removed": list(off.removed), "same_as_off": True,
                     "sets_scored": off.verification.get("sets_scored"), "dropped": 0, "drops_at": {},
                     "looks": [], "units": off_units, "units_over_off": 1.0, "seconds": round(seconds, 2)})
        log.info("n=%d off %s %.1fs", n, off.removed, seconds)
        for group in args.group_list:
            bests = {s: best_cases(analysis, loaded, cache, off, group, s, args.select) for s in args.schedule_list}
            for schedule, order in ((s, o) for s in args.schedule_list for o in args.order_list):
                at_best = {f"{k}_over_off": round(v / off_units, 3) if off_units else None
                           for k, v in bests[schedule].items()}
                sel = raced(analysis, loaded, cache, n, group, schedule, order, args.select)
                race = sel.verification.get("race") or {}
                units = race.get("units")
                rows.append({"n": n, "variant": f"sets, groups of {group}, {schedule}, {order}", "group": group,
                             "schedule": schedule, "order": order, "removed": list(sel.removed),
                             "same_as_off": tuple(sel.removed) == tuple(off.removed),
                             "sets_scored": sel.verification.get("sets_scored"), "dropped": race.get("dropped", 0),
                             "drops_at": drops_at(sel), "looks": race.get("looks"),
                             "units": units, "units_over_off": (round(units / off_units, 3)
                                                               if units is not None and off_units else None),
                             "new_units": race.get("new_units"), **at_best})
                log.info("n=%d %s: %s", n, rows[-1]["variant"], rows[-1]["units_over_off"])
        if save is not None:
            save(result)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def markdown(result: dict[str, Any]) -> str:
    out = [f"Model `{result['model'].get('spec')}` ({result['n_blocks']} blocks), calibration `{result['calib']}`; "
           f"analysis {result['analysis_seconds']} s. Per n: the unraced search (off) from a cold cache, then the "
           "raced search (sets) per look schedule and order replayed on its NLLs (decisions and charges as from a cold cache).",
           "Oracle: the same sets each raced against the final winner from the start; floor: every set but the "
           "winner charged its first look only (`best_cases`).",
           "", "| n | variant | removed | same as off | sets scored | dropped | drops at (samples: sets) | looks | units "
           "| units / off | oracle / off | floor / off |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        drops = ", ".join(f"{k}: {v}" for k, v in r["drops_at"].items()) or "-"
        units = "-" if r["units"] is None else format(r["units"], ",")
        ratio = "-" if r["units_over_off"] is None else f"{r['units_over_off']:.3f}"
        out.append(f"| {r['n']} | {r['variant']} | {' '.join(map(str, r['removed']))} | "
                   f"{'yes' if r['same_as_off'] else 'no'} | {r['sets_scored']} | {r['dropped']} | {drops} | "
                   f"{', '.join(map(str, r['looks'])) or '-'} | {units} | {ratio} | "
                   f"{r.get('oracle_over_off') if r.get('oracle_over_off') is not None else '-'} | "
                   f"{r.get('floor_over_off') if r.get('floor_over_off') is not None else '-'} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_write(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
