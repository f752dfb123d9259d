"""The entry points: `select` (one method, verified when a model is at hand) and `compare`.

`select` resolves the settings into one `SelectConfig`, then either runs the verified search
(`verify.verified_select`: the default when a model is given and the method optimises the MI
objective), or builds the NLL scorer for a selector that runs the model ("sleb", "mi-guided"), or
runs a score-based selector on the analysis alone. `compare` tabulates each method's gap to the
exact optimum.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.runtime.identity import check_same_model
from mi_prun.select.counts import resolve_n
from mi_prun.select.registry import VERIFIABLE, get_selector, make_problem, resolve_config, run_selector
from mi_prun.select.scorer import model_scorer
from mi_prun.select.selection import Selection
from mi_prun.select.verify import verified_select


def select(analysis: Any, method: str = SelectConfig.method, n: int | None = None, ratio: float | None = None,
           run_cost: str = SelectConfig.run_cost, protect_ends: bool | int | float = SelectConfig.protect_ends,
           seed: int = 0, *, config: Any = None, model: Any = None, tokens: Any = None, cache: Any = None,
           progress: Any = None, batch_size: int = 8, force: bool = False, confirm_tokens: Any = None,
           **options: Any) -> Selection:
    """Choose blocks to remove from an `Analysis`; every default is `SelectConfig`'s (the shipped one).

    Give the settings as a `SelectConfig` (`select(analysis, cfg)` or `config=cfg`) or as
    arguments. `n` blocks, or `ratio` of the L blocks (rounded half up); with neither, the config's
    default ratio. `method` is a name of `SELECTORS`; `run_cost` names the entry of `RUN_COSTS` that
    the MI objective uses (optimised by "fbs", "local", "exact", "exhaustive"; reported for every
    method). `protect_ends` keeps the ends: True never removes block 0 or block L-1, an int k the
    first and last k blocks, a float in (0, 0.5) that fraction of L. `seed` drives "random" only.
    Method options (e.g. fbs: pool, k, max_iter) go in `options`.

    With a `model` (a `LoadedModel`, or a module with `tokens`; refused unless it is the analysed
    model, unless `force` and it has the same block count): `config.verify_passes` not 0 and a method of `VERIFIABLE` run the verified search
    (`verify.verified_select`); "sleb" and "mi-guided" score their sets on `tokens` (default: the
    verification tokens drawn from the analysis's calibration text) through the same NLL scorer.
    `cache` (an `NLLCache`) and `progress` go to them; `confirm_tokens` is the verified search's fresh
    draw for its confirmation (drawn from the calibration text when not given with `tokens`). Without a model the answer is the one-pass
    one, with `verified` False and a note saying so. A model is checked whatever the method
    (`mi_prun.runtime.identity.check_same_model`).
    """
    cfg = resolve_config(method, n, ratio, run_cost, protect_ends, seed, options, config)
    if model is not None:
        check_same_model(getattr(analysis, "model", None), make_problem(analysis, cfg).n_blocks, model,
                         force=force, where="the analysis")
    if model is not None and cfg.verifies and cfg.method in VERIFIABLE:
        return verified_select(model, analysis, cfg, tokens=tokens, cache=cache, progress=progress,
                               batch_size=batch_size, force=force, confirm_tokens=confirm_tokens)
    scorer = None
    if get_selector(cfg.method).needs_model and model is not None:
        problem = make_problem(analysis, cfg)
        scorer = model_scorer(model, analysis, cfg, n_blocks=problem.n_blocks, starts=problem.allowed,
                              tokens=tokens, batch_size=batch_size, cache=cache, progress=progress, force=force)
    return run_selector(analysis, cfg, scorer)


COMPARE_METHODS = ("fbs", "local", "exact", "exhaustive")


def compare(analysis: Any, n: int | None = None, ratio: float | None = None,
            run_cost: str = SelectConfig.run_cost, methods: Sequence[str] = COMPARE_METHODS,
            protect_ends: bool | int | float = SelectConfig.protect_ends, seed: int = 0,
            options: Mapping[str, Mapping[str, Any]] | None = None, *, config: Any = None) -> list[dict[str, Any]]:
    """One row per method: removed, objective, gap to the exact optimum, time, feasibility.

    Settings as in `select` (a `SelectConfig` in `config`, whose method is ignored, or arguments).
    Rows: {"method", "removed", "objective", "gap", "rel_gap", "seconds", "forward_passes",
    "span_lookups", "feasible", "reason"}. gap = objective - exact objective (>= 0);
    rel_gap = gap / |exact| (None when exact is 0). A method that refuses (e.g. exhaustive past
    its limit, a missing baseline) gives a row with feasible False and the reason.
    """
    if config is not None:
        config = resolve_config(SelectConfig.method, n, ratio, SelectConfig.run_cost, SelectConfig.protect_ends, 0, {},
                         config)
    else:
        config = resolve_config(SelectConfig.method, n, ratio, run_cost, protect_ends, seed, {}, None)
    L = int(np.asarray(analysis.block_mi).shape[0])
    count = resolve_n(L, **config.count, protect_ends=config.protect_ends)  # bad n fails once, up front
    base = config.replace(n=count, ratio=None)
    options = options or {}

    def run(method: str) -> Selection:
        return select(analysis, config=base.replace(method=method, options=dict(options.get(method, {}))))

    exact = run("exact")
    rows = []
    for method in methods:
        try:
            s = exact if method == "exact" else run(method)
        except MiPrunError as exc:
            rows.append({"method": method, "removed": None, "objective": None, "gap": None,
                         "rel_gap": None, "seconds": None, "forward_passes": None,
                         "span_lookups": None, "feasible": False, "reason": str(exc)})
            continue
        gap = s.objective - exact.objective
        rel = gap / abs(exact.objective) if exact.objective != 0 else None
        rows.append({"method": method, "removed": list(s.removed), "objective": s.objective,
                     "gap": gap, "rel_gap": rel, "seconds": s.seconds,
                     "forward_passes": s.forward_passes, "span_lookups": s.span_lookups,
                     "feasible": True, "reason": None})
    return rows
