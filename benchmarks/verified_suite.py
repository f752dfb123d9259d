"""The verified-search comparison and the healing rows of benchmarks/quality.py (`--suite verified`).

One capture and one analysis with the shipped defaults; verification tokens drawn from the same
calibration text apart from the capture's samples (`SelectConfig().verify_samples` x
`verify_seq_len`). Methods, each scored by perplexity on the evaluation text:

- `verified (default)`: the shipped default (`SelectConfig()`, verified with its budget);
- `mi-guided greedy`: SLEB's steps over the c most redundant remaining blocks by MI and by BI;
- `fbs (one pass)`: the same config with `verify_passes = 0`, today's one-pass answer;
- `shortgpt`, `angular`, `random`: the one-pass baselines, ends protected like the default;
- `sleb`: SLEB-style greedy removal on the SAME verification tokens (`--sleb-samples 0` skips it).

With `--heal`, every set of the default, the one-pass default, ShortGPT and the angular window (the
training-free recipe of ReplaceMe is "angular window + bridge") is healed with the closed-form
bridges (`HealConfig()` on the analysis's own calibration tokens) and scored again, and the sets
chosen by the span cost `linear-unexplained` (FBS, ends protected) are healed too.

Forward passes count passes over the verification tokens (SLEB, verified, guided); seconds are the
selection's wall time on this machine (the analysis, shared by all, is reported once).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

log = logging.getLogger("quality")

METHOD_ORDER = ("verified (default)", "mi-guided greedy", "fbs (one pass)", "shortgpt", "angular", "random", "sleb")


def run_suite(args: Any, loaded: Any, analysis: Any, ppl_of: Callable[[Any, str], dict], ns: list[int]) -> dict:
    """Rows {"method", "n", "removed", "ppl", "forward_passes", "seconds", "healed": bool, ...}."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from verify_bench import run_methods  # noqa: E402

    from mi_prun.config import HealConfig, SelectConfig
    from mi_prun.data import calibration_text, verification_tokens
    from mi_prun.select.confirm import fresh_tokens

    cfg = SelectConfig()
    tokens = verification_tokens(loaded.tokenizer, calibration_text(analysis.calibration), analysis.calibration,
                                 cfg.verify_samples, cfg.verify_seq_len)
    t0 = time.perf_counter()
    fresh = fresh_tokens(cfg, analysis, loaded.tokenizer, tokens.input_ids) if cfg.verify_confirm else None
    raw = run_methods(loaded, analysis, tokens, ns, config=cfg, sleb=args.sleb_samples > 0, confirm_tokens=fresh)
    log.info("selections done in %.0fs", time.perf_counter() - t0)
    names = {"verified": "verified (default)", "mi-guided": "mi-guided greedy", f"{cfg.method} (one pass)":
             "fbs (one pass)"}
    rows = []
    for r in raw:
        method = names.get(r["method"], r["method"])
        p = ppl_of(r["removed"], "plain")
        rows.append({"method": method, "n": r["n"], "removed": r["removed"], "ppl": p["ppl"], "healed": False,
                     "forward_passes": r["forward_passes"], "new_passes": r.get("new_passes"), "seconds": r["seconds"],
                     "confirm_passes": r.get("confirm_passes", 0),
                     "winner_source": r.get("winner_source"), "nll": r.get("nll")})
    heal_info: dict[str, Any] = {}
    if args.heal:
        from mi_prun.select import select

        hcfg = HealConfig()
        lin = {}
        for n in ns:
            try:
                lin[n] = list(select(analysis, config=cfg.replace(n=n, run_cost="linear-unexplained",
                                                                  verify_passes=0)).removed)
            except Exception as exc:  # a cost the analysis cannot give is a result too
                log.warning("linear-unexplained n=%d: %s", n, exc)
        heal_methods = ("verified (default)", "fbs (one pass)", "shortgpt", "angular")
        todo = [(r["method"], r["n"], r["removed"]) for r in rows if r["method"] in heal_methods]
        todo += [("fbs/linear-unexplained", n, removed) for n, removed in lin.items()]
        for method, n, removed in todo:
            if method == "fbs/linear-unexplained":
                plain = ppl_of(removed, "plain")
                rows.append({"method": method, "n": n, "removed": removed, "ppl": plain["ppl"], "healed": False,
                             "forward_passes": 0, "seconds": 0.0})
            p = ppl_of(removed, "healed")
            rows.append({"method": method + " + bridge", "n": n, "removed": removed, "ppl": p["ppl"], "healed": True,
                         "forward_passes": 0, "seconds": p.get("heal_seconds", math.nan),
                         "heal_runs": p.get("heal_runs")})
        heal_info = {"config": {k: getattr(hcfg, k) for k in ("n_samples", "seq_len", "ridge", "sequential")},
                     "calibration": "the analysis's own calibration tokens"}
    return {"rows": rows, "verification_tokens": tokens.provenance, "heal": heal_info}


def suite_markdown(result: dict, ns: list[int]) -> str:
    """Tables: perplexity per method and n, forward passes and seconds per method and n, the bars."""
    rows = result["rows"]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["n"]] = r
    base = [m for m in METHOD_ORDER if m in by] + sorted(m for m in by if m not in METHOD_ORDER and not m.endswith(" + bridge"))
    order = [x for m in base for x in (m, m + " + bridge") if x in by]
    p = result["protocol"]
    cols = " | ".join(f"n={n}" for n in ns)
    out = [f"Model `{result['model']['spec']}` ({result['model']['n_blocks']} blocks); dense perplexity "
           f"**{result['dense_ppl']:.2f}**. Evaluation: {p['eval_source']}, {p['eval_windows']} windows of "
           f"{p['eval_seq_len']} tokens. Calibration (capture): {p['calibration']['n_samples']} x "
           f"{p['calibration']['seq_len']} tokens of {p['calibration']['source']}; verification: "
           f"{result['verification_tokens']['n_samples']} x {result['verification_tokens']['seq_len']} tokens of the "
           f"same text, apart from the capture's. Analysis {result['analysis_seconds']:.0f} s. Blocks numbered from 0.",
           "", f"Command: `{result['command']}`", "", "Perplexity:", "",
           f"| method | {cols} | geo. mean |", "|---|" + "---|" * (len(ns) + 1)]
    for m in order:
        ppls = [by[m][n]["ppl"] for n in ns if n in by[m]]
        geo = math.exp(sum(math.log(v) for v in ppls) / len(ppls)) if ppls and len(ppls) == len(ns) else math.nan
        out.append(f"| {m} | " + " | ".join(f"{by[m][n]['ppl']:.1f}" if n in by[m] else "" for n in ns)
                   + (f" | {geo:.1f} |" if math.isfinite(geo) else " | |"))
    heal_s = [r["seconds"] for r in rows if r.get("healed") and isinstance(r.get("seconds"), (int, float))
              and math.isfinite(r["seconds"])]
    if heal_s:
        out += ["", f"Healing time per removed set (bridges fitted on the {result['protocol']['calibration']['n_samples']} x "
                    f"{result['protocol']['calibration']['seq_len']} calibration tokens): mean {sum(heal_s) / len(heal_s):.1f} s "
                    f"(range {min(heal_s):.1f}-{max(heal_s):.1f} s), beside {result['analysis_seconds']:.0f} s for the analysis."]
    out += ["", "Forward passes over the verification tokens / selection seconds:", "",
            f"| method | {cols} |", "|---|" + "---|" * len(ns)]
    for m in order:
        if any(by[m][n].get("healed") for n in by[m]):
            continue
        out.append(f"| {m} | " + " | ".join(
            f"{by[m][n]['forward_passes']}{_plus(by[m][n])} / {by[m][n]['seconds']:.0f}" if n in by[m] else ""
            for n in ns) + " |")
    if any(by[m][n].get("confirm_passes") for m in order for n in by[m]):
        out += ["", "(+k: the confirmation's passes on a fresh draw, beyond the search's budget.)"]
    out += ["", *bars(by, ns)]
    return "\n".join(out) + "\n"


def _plus(row: dict) -> str:
    k = row.get("confirm_passes") or 0
    return f" + {k}" if k else ""


def bars(by: dict[str, dict[int, dict]], ns: list[int]) -> list[str]:
    """The issues' bars, checked on this run's numbers."""
    lines = []
    v = by.get("verified (default)", {})
    for n in (2, 4, 6, 8, 10):
        if n not in v:
            continue
        refs = {m: by[m][n]["ppl"] for m in ("shortgpt", "angular", "fbs (one pass)") if n in by.get(m, {})}
        best = min(refs.values()) if refs else math.inf
        ok = v[n]["ppl"] <= best + 1e-9
        line = f"- n={n}: verified {v[n]['ppl']:.1f} vs best one-pass {best:.1f} {'PASS' if ok else 'FAIL'}"
        if n in by.get("sleb", {}):
            s = by["sleb"][n]
            ok2 = v[n]["ppl"] <= 1.03 * s["ppl"]
            ok3 = v[n]["forward_passes"] <= s["forward_passes"] / 4
            line += (f"; vs SLEB {s['ppl']:.1f} (<= 3 % above: {'PASS' if ok2 else 'FAIL'}); search passes "
                     f"{v[n]['forward_passes']} vs SLEB {s['forward_passes']} (<= 1/4: {'PASS' if ok3 else 'FAIL'})"
                     + (f", + {v[n]['confirm_passes']} confirmation passes" if v[n].get("confirm_passes") else ""))
        lines.append(line)
    if any(m.endswith(" + bridge") for m in by):
        for m in ("verified (default)", "fbs (one pass)", "shortgpt", "angular", "fbs/linear-unexplained"):
            h = by.get(m + " + bridge", {})
            worse = [n for n in h if n in by.get(m, {}) and h[n]["ppl"] >= by[m][n]["ppl"]]
            if h:
                lines.append(f"- {m}: healed below unhealed at every n: {'PASS' if not worse else 'FAIL at n=' + str(worse)}")
        # The healed default is the healing default selection, SelectConfig.for_healing(): the
        # one-pass FBS answer (the set that healed best, see RESULTS.md "Healing").
        h, u = by.get("fbs (one pass) + bridge", {}), by.get("fbs (one pass)", {})
        for n, limit in ((4, 0.85), (8, 0.75), (10, 0.75)):
            if n in h and n in u:
                r = h[n]["ppl"] / u[n]["ppl"]
                lines.append(f"- healed default (one pass + bridge) at n={n}: {r:.3f} x unhealed (<= {limit}: "
                             f"{'PASS' if r <= limit else 'FAIL'})")
        for n in (4, 6, 8):
            if n in h:
                refs = {m: by[m + ' + bridge'][n]["ppl"] for m in ("shortgpt", "angular") if n in by.get(m + " + bridge", {})}
                if refs:
                    ok = h[n]["ppl"] <= min(refs.values()) + 1e-9
                    lines.append(f"- n={n}: healed default (one pass + bridge) {h[n]['ppl']:.1f} vs healed ShortGPT / angular "
                                 f"{', '.join(f'{x:.1f}' for x in refs.values())} {'PASS' if ok else 'FAIL'}")
    return ["Bars (this run):", "", *lines] if lines else []
