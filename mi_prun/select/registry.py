"""The selector registry and the entry points that run it.

A selector is `fn(problem, **options) -> SelectorOutput`, registered under a name with
`register_selector` (its `defaults` list every option it takes). `select` builds the `Problem`
(scores, cost matrix, removable blocks) from an `Analysis`, runs one selector and wraps its answer
in a `Selection` with the MI objective; `compare` runs several against the exact optimum.
The selectors themselves live in `baselines`, `search` and `sleb`; importing `mi_prun.select`
registers them all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from mi_prun.config import SelectConfig, as_float, as_int, expect_config
from mi_prun.errors import MiPrunError
from mi_prun.select.costs import analysis_stats, cost_matrix, set_cost
from mi_prun.select.counts import allowed_blocks, resolve_n
from mi_prun.select.scoring import SetScorer
from mi_prun.select.selection import Selection, make_selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """What a selector sees: scores, the cost matrix and the constraint, for one (analysis, cost)."""

    n_blocks: int
    n: int
    block_mi: np.ndarray  # (L,)
    span: np.ndarray  # (L+1, L+1)
    C: np.ndarray  # (L+1, L+1) run costs, +inf off the upper triangle
    allowed: tuple[int, ...]  # removable blocks (protect_ends drops 0 and L-1)
    baselines: Mapping[str, np.ndarray]
    seed: int
    scorer: SetScorer | None = None  # the NLL scorer (`select.scoring`) of selectors that run the model


@dataclass
class SelectorOutput:
    """A selector's answer; `select` adds the objective, timing and bookkeeping."""

    removed: tuple[int, ...]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    span_lookups: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # extra facts for the Selection's options


SelectorFn = Callable[..., SelectorOutput]


@dataclass(frozen=True)
class Selector:
    """A registered selector: its function, accepted options with defaults, and a one-line description."""

    name: str
    fn: SelectorFn  # fn(problem, **options)
    defaults: Mapping[str, Any]
    description: str
    needs_model: bool = False  # fn scores sets with `problem.scorer` (forward passes of the model)


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, defaults: Mapping[str, Any] | None = None, description: str = "",
                      needs_model: bool = False) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator adding `fn(problem, **options) -> SelectorOutput` under `name`; refuses duplicates.

    `defaults` lists every option the selector accepts; `select` rejects any other. A selector
    with `needs_model` scores removed sets with `problem.scorer.score(removed)` (the one NLL
    scorer, `mi_prun.select.scorer`), which `select` builds from the model it is given.
    """

    def deco(fn: SelectorFn) -> SelectorFn:
        if name in SELECTORS:
            raise MiPrunError(f"selector {name!r} is already registered.")
        SELECTORS[name] = Selector(name, fn, dict(defaults or {}), description, needs_model)
        return fn

    return deco


def get_selector(name: str) -> Selector:
    """The registered selector called `name`; `MiPrunError` listing the valid names otherwise."""
    if name not in SELECTORS:
        raise MiPrunError(f"unknown selection method {name!r}: choose one of "
                          f"{', '.join(sorted(SELECTORS))}.")
    return SELECTORS[name]


def _validated_options(sel: Selector, options: Mapping[str, Any]) -> dict[str, Any]:
    """The selector's defaults updated by `options`, each checked against its default's type."""
    unknown = sorted(set(options) - set(sel.defaults))
    if unknown:
        valid = ", ".join(sorted(sel.defaults)) or "none"
        raise MiPrunError(f"method {sel.name!r} does not take option(s) {', '.join(unknown)}; "
                          f"its options: {valid}.")
    out = dict(sel.defaults)
    for key, value in options.items():
        default, label = sel.defaults[key], f"option {key} of method {sel.name!r}"
        if value is None and default is None:
            out[key] = None
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise MiPrunError(f"{label} must be True or False, got {value!r}.")
            out[key] = value
        elif isinstance(default, int) or default is None:
            out[key] = as_int(value, label, minimum=0)  # selectors check their own ranges
        elif isinstance(default, float):
            out[key] = as_float(value, label)
        else:
            out[key] = value
    return out


def check_analysis(analysis: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(block_mi, span, span_norm or None) of an `Analysis` as float64 arrays, shapes checked."""
    if not hasattr(analysis, "block_mi") or not hasattr(analysis, "span"):
        raise MiPrunError(f"selection needs an Analysis, got {type(analysis).__name__}. Fix: pass "
                          "mi_prun.analyze(...) or Analysis.load(folder).")
    block_mi = np.asarray(analysis.block_mi, dtype=np.float64)
    span = np.asarray(analysis.span, dtype=np.float64)
    L = block_mi.shape[0]
    if block_mi.ndim != 1 or L < 1:
        raise MiPrunError(f"block_mi must have shape (L,) with L >= 1; got {block_mi.shape}.")
    if span.shape != (L + 1, L + 1):
        raise MiPrunError(f"span matrix has shape {span.shape}; {L} blocks need ({L + 1}, {L + 1}).")
    norm = getattr(analysis, "span_norm", None)
    return block_mi, span, None if norm is None else np.asarray(norm, dtype=np.float64)


def resolve_config(method: Any, n: Any, ratio: Any, run_cost: str, protect_ends: Any, seed: Any,
            options: Mapping[str, Any], config: Any) -> Any:
    """One validated `SelectConfig` from either `config` (n/ratio may still override its count)
    or the individual arguments."""
    if isinstance(method, SelectConfig):
        config, method = method, SelectConfig.method
    if isinstance(method, Mapping):  # select(analysis, {"n": 2}): settings where the method name goes
        expect_config(method, SelectConfig, "the settings")
    if config is None:
        return SelectConfig(method=method, run_cost=run_cost, protect_ends=protect_ends, n=n, ratio=ratio,
                            seed=seed, options=options)
    expect_config(config, SelectConfig)
    d = SelectConfig()
    if (method, run_cost, protect_ends, seed) != (d.method, d.run_cost, d.protect_ends, d.seed) or options:
        raise MiPrunError("give the selection settings either in config or as arguments, not both "
                          "(only n or ratio may override config's count).")
    return config.replace(n=n, ratio=ratio) if (n is not None or ratio is not None) else config


def provenance_of(analysis: Any) -> dict[str, Any]:
    """What a selection records of the analysis it came from (model identity included); the one
    provenance builder of every selector, verified or not."""
    if analysis is None:
        return {}
    return {key: getattr(analysis, key, None) for key in ("model", "estimator", "estimator_options", "calibration")}


def make_problem(analysis: Any, cfg: SelectConfig) -> Problem:
    """The `Problem` of one validated config on one analysis (count resolved, cost matrix built)."""
    block_mi, span, span_norm = check_analysis(analysis)
    L = block_mi.shape[0]
    count = resolve_n(L, **cfg.count, protect_ends=cfg.protect_ends)
    return Problem(n_blocks=L, n=count, block_mi=block_mi, span=span,
                   C=cost_matrix(span, span_norm, cfg.run_cost, stats=analysis_stats(analysis)), allowed=tuple(allowed_blocks(L, cfg.protect_ends)),
                   baselines=dict(getattr(analysis, "baselines", {}) or {}), seed=cfg.seed)


# The selectors whose answer the verified search checks (it optimises the MI objective); the
# baselines and "random" are returned as they are: they are what a verified answer is compared to.
VERIFIABLE = ("fbs", "exact", "local", "exhaustive", "topk")


def run_selector(analysis: Any, cfg: SelectConfig, scorer: SetScorer | None = None) -> Selection:
    """One registered selector's answer on `analysis` under `cfg` (no verification; `select` is
    the entry point). `scorer`: the NLL scorer a `needs_model` selector uses."""
    expect_config(cfg, SelectConfig)
    sel = get_selector(cfg.method)
    if sel.needs_model and scorer is None:
        raise MiPrunError(f"method {cfg.method!r} scores removed sets by forward passes of the model, which "
                          "an analysis does not hold. Fix: pass the model (select(..., model=loaded)) or "
                          f"`--model` on the command line.")
    opts = _validated_options(sel, cfg.options)
    t0 = time.perf_counter()
    problem = make_problem(analysis, cfg)
    if scorer is not None:
        problem = replace(problem, scorer=scorer)
    out = sel.fn(problem, **opts)
    seconds = time.perf_counter() - t0
    result = make_selection(cfg.method, problem.n, problem.n_blocks, out.removed, set_cost(out.removed, problem.C),
                            cfg.run_cost, seconds, forward_passes=out.forward_passes,
                            span_lookups=out.span_lookups, ratio=cfg.count.get("ratio"),
                            trajectory=out.trajectory,
                            options={"protect_ends": cfg.protect_ends, "seed": cfg.seed, **opts, **out.options},
                            provenance=provenance_of(analysis))
    log.info("%s removed %s (objective %.6g, %s) in %.3fs", cfg.method, list(result.removed),
             result.objective, cfg.run_cost, seconds)
    if cfg.verifies and cfg.method in VERIFIABLE:
        result = replace(result, verification={
            "budget": cfg.verify_budget(problem.n, len(problem.allowed)), "budget_rule": cfg.verify_passes,
            "note": "unverified (no model given): the one-pass answer; give a model to check it"})
    return result
