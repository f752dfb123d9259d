"""Choose which blocks to remove: MI-based selectors, baselines and an exact optimum.

Blocks are numbered from 0. Removing the maximal contiguous run of blocks i..j-1 means h_i feeds
block j directly; the run is judged by its own span entry M[i, j] = I(h_i; h_j) through a *run cost*
(lower = better). The objective of a removed set is the sum of the costs of its maximal runs, so two
runs must be separated by at least one kept block (adjacent runs are one run, judged by one span).

Pieces, each usable on its own (all importable from `mi_prun.select`):

- `counts`: `resolve_n` turns `n` or `ratio` into a validated block count; `n_protected` reads
  `protect_ends`.
- `costs`: `RUN_COSTS` maps a run-cost name to a `RunCost` (a vectorised function of (span,
  span_norm, i, j), a line of help, what it needs; `register_run_cost` adds one); `cost_matrix`
  evaluates it once per problem into C[i, j] (i < j); `runs_of` and `set_cost` give the runs of a
  removed set and its objective.
- `selection`: the result type `Selection` (JSON round trip with `to_dict` / `from_dict`).
- `registry`: `SELECTORS` (`register_selector`, `get_selector`), `Problem`, `run_selector` and the
  `select(analysis, method, ...)` -> `Selection` and `compare`, which tabulates each method's gap
  to the exact optimum. Every `Selection` reports its MI objective under the chosen run cost, so
  all methods are comparable.
- `baselines`: "topk" and the baselines "shortgpt", "angular", "random".
- `search`: "fbs" (Fast-Block-Select, with trajectory), "local", "exact" (dynamic programme,
  O(L^2 n), optimal for any additive run cost), "exhaustive".
- `scoring`: what a search asks of its scorer, as protocols: `SetScorer` (`score(removed)`, which
  `PrefixScorer` and `TaskScorer` implement; `Problem.scorer`) and `RowScorer` (per-sample NLLs of
  some groups of samples and their cost in token-block units, what racing needs).
- `scorer`: the one NLL scorer (`PrefixScorer`, `NLLCache`, `model_scorer`) behind every selector
  that runs the model: "sleb", "mi-guided" and the verified search.
- `race`: racing in the verified search (`Race`, `RaceRule`: a set scored group by group is dropped
  once a paired t bound shows it worse than the best complete set; `SelectConfig.verify_race`).
- `sleb`: "sleb", SLEB's greedy removal: `sleb_search` (the search, given any NLL oracle) and
  `sleb_select` (on calibration tokens given directly); `select(..., method="sleb", model=...)`.
- `api`: the entry points `select` and `compare`.
- `candidates`, `verify`: the verified search (the default when a model is at hand,
  `SelectConfig.verify_passes`, "auto" = a quarter of SLEB's passes): every criterion's candidate
  sets (`propose`, with `k_best_combinations`, the exact programme's k best sets) scored by forward
  passes on verification tokens, then swaps and exchanges from the best set (`verified_search`, the
  search given any NLL oracle or a race; `verified_select`, on the model); each set scored is a
  typed `ScoredSet` in `Selection.candidates`. `guided`: "mi-guided", SLEB's
  greedy steps trying only the c most redundant blocks by MI and BI (`guided_select`).

`forward_passes` counts full passes over the calibration set (0 for score-based methods);
`span_lookups` counts distinct span entries a method read (what a lazy span oracle would have had
to estimate).
"""

from __future__ import annotations

# Import order is registration order: SELECTORS lists topk, the baselines, the search methods, sleb,
# mi-guided.
from mi_prun.select.costs import (RUN_COSTS, RunCost, RunCostFn, cost_matrix, register_run_cost,
                                  run_cost_descriptions, runs_of, set_cost)
from mi_prun.select.counts import n_protected, resolve_n
from mi_prun.select.registry import (SELECTORS, Problem, Selector, SelectorFn, SelectorOutput,
                                     get_selector, register_selector)
from mi_prun.select.selection import ScoredSet, Selection
from mi_prun.select import baselines, search  # noqa: F401  (importing them registers their selectors)
from mi_prun.select.scorer import NLLCache, PrefixScorer
from mi_prun.select.sleb import calibration_nll, sleb_search, sleb_select
from mi_prun.select.candidates import k_best_combinations, propose
from mi_prun.select.verify import one_pass_estimate, stop_note, verified_search, verified_select
from mi_prun.select.guided import guided_search, guided_select
from mi_prun.select.api import compare, select

__all__ = [
    "RUN_COSTS", "RunCost", "RunCostFn", "cost_matrix", "register_run_cost", "run_cost_descriptions", "runs_of",
    "set_cost",
    "n_protected", "resolve_n",
    "ScoredSet", "Selection",
    "SELECTORS", "Problem", "Selector", "SelectorFn", "SelectorOutput", "compare", "get_selector",
    "register_selector", "select",
    "calibration_nll", "sleb_search", "sleb_select",
    "k_best_combinations", "propose", "NLLCache", "PrefixScorer", "one_pass_estimate", "stop_note", "verified_search", "verified_select", "guided_search", "guided_select",
]
