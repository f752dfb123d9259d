"""Wall time of the verified prune against the analysis it starts from, and what the search spends.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/prune_time.py --model smollm2-135m --n 4

In one process: load the model, run the analysis with the shipped defaults (`AnalysisConfig()`,
optionally fewer samples), then the verified selection with the shipped defaults
(`SelectConfig(n=...)`: the auto budget on 16 x 256 verification tokens), each timed. The search
is split into the dense pass that fills the prefix cache and the candidate passes, counted per
stage (candidates, exchanges, swaps). Then the same search is replayed on the NLL cache without
the early stop (`verified_search(..., stop_early=False)`): the sets it scores beyond the stopped
search are the passes the stop saves (the answer is checked to be the same). Writes
benchmarks/results/prune_time.json.

    python benchmarks/prune_time.py --synthetic

counts, without a model, the sets the early stop saves with the auto budget for 30 blocks (24
removable) at n = 2..10, on synthetic NLL oracles (additive harm plus random pairwise terms, 20
seeds each), checking that the answer never changes. Writes benchmarks/results/prune_time_synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.runtime import load_model
from mi_prun.pipeline import analyze
from mi_prun.select import NLLCache, PrefixScorer, propose, select, verified_search, verified_select
from mi_prun.select.registry import check_analysis, make_problem
from mi_prun.select.scorer import resolve_tokens


def synthetic(seeds: int = 20, n_blocks: int = 30) -> dict:
    """Sets scored with and without the early stop on synthetic oracles (no model)."""
    import numpy as np

    from mi_prun.select.costs import cost_matrix
    from mi_prun.select.registry import Problem

    rows = []
    for n in range(2, 11, 2):
        saved, total, same = [], [], True
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            harm = rng.uniform(0.1, 10.0, n_blocks)
            pair = rng.normal(0.0, 1.0, (n_blocks, n_blocks))
            span = np.triu(rng.uniform(0.1, 1.0, (n_blocks + 1, n_blocks + 1)))
            span = np.maximum(span, span.T)
            np.fill_diagonal(span, 2.0)
            allowed = tuple(range(3, n_blocks - 3))
            problem = Problem(n_blocks=n_blocks, n=n, block_mi=harm, span=span, C=cost_matrix(span, None, "neg-mi"),
                              allowed=allowed, baselines={}, seed=0)

            def nll(removed: tuple[int, ...], harm=harm, pair=pair) -> tuple[float, bool]:
                r = list(removed)
                return float(harm[r].sum() + pair[np.ix_(r, r)].sum() / 2), False

            one = tuple(sorted(int(b) for b in np.argsort(-harm[3:-3])[:n] + 3))
            cands = propose(problem, None, one, "fbs")
            budget = SelectConfig(n=n).verify_budget(n, len(allowed))
            full = verified_search(problem, cands, nll, budget, stop_early=False)
            cut = verified_search(problem, cands, nll, budget)
            same &= cut.best.removed == full.best.removed
            saved.append(len(full.scored) - len(cut.scored))
            total.append(len(full.scored))
        rows.append({"n": n, "budget": budget, "mean_sets_scored_without_stop": round(float(np.mean(total)), 1),
                     "mean_sets_saved": round(float(np.mean(saved)), 2), "max_sets_saved": int(max(saved)),
                     "runs_with_a_saving": int(sum(x > 0 for x in saved)), "runs": seeds, "same_answer": bool(same)})
    return {"blocks": n_blocks, "removable": n_blocks - 6, "rows": rows,
            "command": "python benchmarks/prune_time.py --synthetic"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=4, help="blocks to remove")
    ap.add_argument("--calib", default=AnalysisConfig.calib)
    ap.add_argument("--samples", type=int, default=AnalysisConfig.n_samples, help="analysis samples")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--synthetic", action="store_true", help="count the early stop's savings without a model")
    ap.add_argument("--race", default=SelectConfig.verify_race, choices=SelectConfig.RACE_MODES,
                    help="SelectConfig.verify_race (default: the shipped one); the early stop's replay needs off")
    args = ap.parse_args()
    if args.synthetic:
        result = synthetic()
        (Path(__file__).parent / "results" / "prune_time_synthetic.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu")
    t_load = time.perf_counter() - t0

    acfg = AnalysisConfig(calib=args.calib, n_samples=args.samples)
    t0 = time.perf_counter()
    analysis = analyze(loaded, acfg)
    t_analysis = time.perf_counter() - t0

    cfg = SelectConfig(n=args.n, verify_race=args.race)
    cache = NLLCache()
    t0 = time.perf_counter()
    sel = verified_select(loaded, analysis, cfg, cache=cache)
    t_verify = time.perf_counter() - t0
    v = sel.verification

    # The dense pass alone, timed on the same tokens (the search's first set paid for it).
    problem = make_problem(analysis, cfg)
    ids, mask, _ = resolve_tokens(None, loaded.tokenizer, analysis, cfg, cache)
    t0 = time.perf_counter()
    PrefixScorer(loaded.model, ids, mask, 8, problem.allowed, NLLCache()).dense()
    t_dense = time.perf_counter() - t0

    extra: list[tuple[int, ...]] = []
    if args.race == "off":  # a raced search drops sets the cache never holds complete: no replay
        # Replay without the early stop: cached sets cost nothing; a set the stopped search never scored
        # is a put-back set after the answer was final (its value cannot change the winner).
        one = select(analysis, config=cfg.replace(verify_passes=0))
        cands = propose(problem, check_analysis(analysis)[2], one.removed, cfg.method)

        def oracle(removed: tuple[int, ...]) -> tuple[float, bool]:
            got = cache.get(removed)
            if got is None:
                extra.append(removed)
                return float("nan"), False
            return got, True

        full = verified_search(problem, cands, oracle, v["budget"], stop_early=False)
        assert full.best.removed == tuple(sel.removed), (full.best, sel.removed)
        assert all(len(r) == args.n - 1 for r in extra), extra
    per_pass = (t_verify - t_dense) / max(sel.forward_passes, 1)
    result = {
        "model": args.model, "n": args.n, "n_blocks": analysis.n_blocks, "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": round(load1, 2), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "load_s": round(t_load, 1),
        "analysis": {"config": f"AnalysisConfig(calib={args.calib!r}, n_samples={args.samples})",
                     "seconds": round(t_analysis, 1)},
        "verified_select": {"seconds": round(t_verify, 1), "removed": list(sel.removed),
                            "one_pass_removed": list(sel.one_pass_removed or []), "budget": v["budget"],
                            "sets_scored": v["sets_scored"], "new_passes": sel.forward_passes,
                            "sets_by_stage": v["sets_by_stage"], "dense_pass_s": round(t_dense, 1),
                            "seconds_per_candidate_pass": round(per_pass, 2),
                            "tokens": f"{cfg.verify_samples} x {cfg.verify_seq_len}"},
        "ratio_verify_to_analysis": round(t_verify / t_analysis, 2),
        "early_stop": ({"sets_saved": len(extra), "seconds_saved_estimate": round(len(extra) * per_pass, 1),
                        "same_answer": True} if args.race == "off" else "not replayed: a raced search (--race off "
                                                                          "replays it)"),
        "race": v.get("race"),
        "command": f"MI_PRUN_DATA_DIR=../shared/data python benchmarks/prune_time.py --model {args.model} "
                   f"--n {args.n} --race {args.race}" + (f" --samples {args.samples}" if args.samples != AnalysisConfig.n_samples
                                      else "") + (f" --threads {args.threads}" if args.threads else ""),
    }
    out = Path(__file__).parent / "results" / "prune_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
