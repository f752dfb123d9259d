"""Verified selection beside the one-pass criteria and SLEB: removed sets, forward passes, seconds.

`run_methods(loaded, analysis, tokens, ns)` runs, for every n, the verified default (the shipped
`SelectConfig`), the MI-guided greedy, the one-pass default (verify_passes = 0), ShortGPT, the
angular window, random and SLEB-style removal (`sleb_select` on the SAME verification tokens), and
returns one row per (method, n): {"method", "n", "removed", "forward_passes", "seconds",
"verified", "winner_source", "nll"}. Perplexity on evaluation text is the caller's job (e.g.
benchmarks/quality.py). `budget_curve` records, for one n, which set each budget would have chosen
(the measurement behind the default `verify_passes`).

    python benchmarks/verify_bench.py --quick            # tiny random model, seconds (tests run it)
    python benchmarks/verify_bench.py --budget-curve     # smollm2-135m, n = 8: the default's measurement
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mi_prun.config import SelectConfig  # noqa: E402
from mi_prun.select import NLLCache, guided_select, select, sleb_select  # noqa: E402


def run_methods(loaded: Any, analysis: Any, tokens: Any, ns: Sequence[int], config: SelectConfig | None = None,
                sleb: bool = True, guided_c: int = 4, confirm_tokens: Any = None) -> list[dict[str, Any]]:
    """One row per (method, n); see the module docstring. `tokens` is a `Calibration` (e.g.
    `mi_prun.data.verification_tokens`); every pass-based method scores on it. Caches are per
    method (no method profits from another's passes), and shared across n within a method, as the
    app's slider would; `forward_passes` is every method's cost from a cold cache (`new_passes`:
    what it spent given the cache). `confirm_tokens`: the verified search's fresh draw for its
    confirmation (`mi_prun.select.confirm.fresh_tokens`); `confirm_passes` is what the confirmation
    costs from a cold cache (the finalists it re-scored), beyond `forward_passes`."""
    config = config if config is not None else SelectConfig()
    rows: list[dict[str, Any]] = []
    caches = {"verified": NLLCache(), "mi-guided": NLLCache()}

    def cold_passes(sel: Any) -> int:
        """What the selection costs from a cold cache: every set it scored (verified: the budget
        counts them, cached or not; guided: every block tried on its path)."""
        if getattr(sel, "verified", False):
            return int((sel.verification or {}).get("sets_scored", sel.forward_passes))
        if sel.method == "mi-guided":
            return len(_guided_sets(sel))
        return sel.forward_passes

    def row(method: str, n: int, sel: Any, seconds: float) -> None:
        race = (sel.verification or {}).get("race") or {}
        rows.append({"method": method, "n": n, "removed": list(sel.removed), "forward_passes": cold_passes(sel),
                     # raced: token-block units charged, the budget in units (None: in sets), the largest set's
                     "units": race.get("units"), "unit_budget": race.get("unit_budget"),
                     "largest_set_units": max((c.units or 0 for c in sel.candidates), default=0)
                     if getattr(sel, "verified", False) else None,
                     "new_passes": sel.forward_passes,
                     "confirm_passes": int(((sel.verification or {}).get("confirm") or {}).get("rescored", 0)),
                     "seconds": seconds, "verified": bool(getattr(sel, "verified", False)),
                     "winner_source": getattr(sel, "winner_source", None), "nll": getattr(sel, "nll", None)})

    for n in ns:
        cfg = config.replace(n=n)
        t = time.perf_counter()
        row("verified", n, select(analysis, config=cfg, model=loaded, tokens=tokens, cache=caches["verified"],
                                  confirm_tokens=confirm_tokens), time.perf_counter() - t)
        t = time.perf_counter()
        row("mi-guided", n, guided_select(loaded, analysis, cfg, tokens=tokens, c=guided_c,
                                          cache=caches["mi-guided"]), time.perf_counter() - t)
        for method in (config.method, "shortgpt", "angular", "random"):
            t = time.perf_counter()
            sel = select(analysis, config=cfg.replace(method=method, verify_passes=0))
            row(f"{method} (one pass)" if method == config.method else method, n, sel, time.perf_counter() - t)
    if sleb and ns:
        # SLEB is greedy and incremental: one run to the largest n; the set after step t is its
        # answer for n = t + 1, at the passes spent so far (as quality.py's published rows).
        t = time.perf_counter()
        sel = sleb_select(loaded.model, tokens.input_ids, max(ns), tokens.attention_mask,
                          config=config.replace(n=max(ns)), analysis=analysis)
        passes = 0
        for step in sel.trajectory:
            passes += len(step.get("candidates", []))
            n = len(step["removed"])
            if n in ns:
                rows.append({"method": "sleb", "n": n, "removed": sorted(step["removed"]), "forward_passes": passes,
                             "seconds": float(step.get("elapsed", time.perf_counter() - t)), "verified": False,
                             "winner_source": None, "nll": step.get("nll")})
    return rows


def _guided_sets(sel: Any) -> set[tuple[int, ...]]:
    """Every distinct set the MI-guided greedy scored on its path: the removed set before each step
    plus each block it tried."""
    out: set[tuple[int, ...]] = set()
    for step in sel.trajectory:
        before = [b for b in step["removed"] if b != step["removed_block"]]
        out |= {tuple(sorted(before + [c["block"]])) for c in step["candidates"]}
    return out


def budget_curve(loaded: Any, analysis: Any, tokens: Any, n: int, budget: int,
                 config: SelectConfig | None = None) -> dict[str, Any]:
    """The verified search at `budget`, and for each smaller budget b the set it would have
    returned (the lowest NLL among the first b sets scored, candidates and refinement in order)."""
    config = config if config is not None else SelectConfig()
    sel = select(analysis, config=config.replace(n=n, verify_passes=budget), model=loaded, tokens=tokens)
    best, best_nll, by_budget = None, math.inf, {}
    passes = 0
    for c in sel.candidates:
        passes += 0 if c.cached else 1
        if len(c.removed) == n and c.complete and c.nll < best_nll:  # an exchange's put-back sets are smaller
            best, best_nll = c, c.nll
        by_budget[passes] = {"removed": list(best.removed), "nll": best_nll, "proposer": best.proposers[0]}
    return {"n": n, "budget": budget, "selection": sel.to_dict(), "by_budget": by_budget}


def _quick() -> list[dict[str, Any]]:
    from mi_prun.config import AnalysisConfig
    from mi_prun.data import calibration_text, verification_tokens
    from mi_prun.runtime import load_model
    from mi_prun.pipeline import analyze

    loaded = load_model("tiny-llama", device="cpu")
    analysis = analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))
    cfg = SelectConfig(verify_seq_len=64)
    tokens = verification_tokens(loaded.tokenizer, calibration_text(analysis.calibration), analysis.calibration,
                                 cfg.verify_samples, cfg.verify_seq_len)
    return run_methods(loaded, analysis, tokens, ns=(1, 2), config=cfg)


def _budget_measurement(budget: int, n: int, eval_windows: int) -> dict[str, Any]:
    """smollm2-135m, WikiText-2: analysis with the shipped defaults (calib wikitext2), the verified
    search at `budget` with its by-budget winners, and their perplexity on the test split."""
    import torch

    from mi_prun.config import AnalysisConfig
    from mi_prun.data import calibration_text, load_text, verification_tokens
    from mi_prun.evaluate import perplexity
    from mi_prun.runtime import load_model
    from mi_prun.models.surgery import pruned_view
    from mi_prun.pipeline import analyze

    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    analysis = analyze(loaded, AnalysisConfig(calib="wikitext2"))
    print(f"analysis {time.perf_counter() - t0:.0f}s", flush=True)
    cfg = SelectConfig()
    tokens = verification_tokens(loaded.tokenizer, calibration_text(analysis.calibration), analysis.calibration,
                                 cfg.verify_samples, cfg.verify_seq_len)
    curve = budget_curve(loaded, analysis, tokens, n, budget, cfg)
    print(f"search {time.perf_counter() - t0:.0f}s", flush=True)
    test = load_text("wikitext2", purpose="evaluation").text
    ppl: dict[str, float] = {}
    with torch.inference_mode():
        for b, entry in sorted(curve["by_budget"].items()):
            key = str(entry["removed"])
            if key not in ppl:
                ppl[key] = perplexity(pruned_view(loaded.model, entry["removed"]), loaded.tokenizer, test,
                                      max_windows=eval_windows).ppl
            entry["eval_ppl"] = ppl[key]
            print(b, entry, flush=True)
    curve["eval"] = {"windows": eval_windows, "seq_len": 256, "ppl": ppl}
    curve["seconds"] = time.perf_counter() - t0
    return curve


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, n = 1, 2 (seconds)")
    ap.add_argument("--budget-curve", action="store_true", help="smollm2-135m: winners by budget at one n")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.budget_curve:
        result: Any = _budget_measurement(args.budget, args.n, args.eval_windows)
    elif args.quick:
        result = _quick()
        for r in result:
            print(f"{r['method']:>16} n={r['n']} {r['removed']} passes={r['forward_passes']} {r['seconds']:.2f}s")
    else:
        ap.error("real-model runs are scheduled by the lead: call run_methods() from a driver, or use --quick")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
