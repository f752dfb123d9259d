"""Fast-Block-Select: the trajectory (objective per iteration, prune and alternative pools per
iteration, a slider and a play button to step through), the exact optimum and FBS's gap to it,
the verified search (FBS's answer and every criterion's candidates checked by forward passes) and
the baselines' choices for the same number of blocks."""

from __future__ import annotations

import streamlit as st

from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun_app import search, state, tables, viz
from mi_prun_app.ui import (
    chart,
    comparison,
    n_slider,
    require_analysis,
    selection,
    show_error,
    table,
)

analysis = require_analysis()
L = analysis.n_blocks
st.title("Fast-Block-Select")
n = n_slider(analysis)
passes = search.search_controls()
st.caption(f"Removing **{state.ratio_text(n, L)}**. FBS starts from the n most redundant "
           "blocks (prune pool P), keeps the next candidates in an alternative pool A, measures the real span MI "
           "of the best contiguous candidate runs and swaps in a cheaper combination until P stops changing. "
           "The objective is the sum of the removed runs' costs (lower = better). The exact optimum comes from "
           "a dynamic programme over run boundaries.")

try:
    fbs = selection(analysis, "fbs", n)
    exact = selection(analysis, "exact", n)
    rows = comparison(analysis, n)
except MiPrunError as exc:
    show_error(exc)
    st.stop()

gap = fbs.objective - exact.objective
m = st.columns(4)
m[0].metric("FBS removes", ", ".join(map(str, fbs.removed)))
m[1].metric("Exact optimum removes", ", ".join(map(str, exact.removed)))
m[2].metric("Gap to the optimum", f"{gap:.4f}", help="FBS objective minus the exact objective (0 = FBS reached the optimum of the objective, "
                 "which is a proxy for perplexity).")
m[3].metric("Iterations", max(len(fbs.trajectory) - 1, 0),
            help=f"FBS took {state.fmt_seconds(fbs.seconds)}; the exact DP {state.fmt_seconds(exact.seconds)}.")
# A metric cuts a long value short in its column: the sets, in full, on a line of their own.
st.markdown(f"**FBS removes** blocks {', '.join(map(str, fbs.removed))}; **the exact optimum removes** "
            f"{', '.join(map(str, exact.removed))} (numbered from 0).")

st.subheader("Checked by forward passes" if passes else "One-pass answer")
if passes:
    verified = search.verified(analysis, search.DEFAULT_METHOD, n, passes)
    if verified is not None:
        search.verified_section(verified, n)
    else:
        search.notice(search.DEFAULT_METHOD, n, passes)
else:
    st.caption(f"FBS's answer above is final: no forward pass checks it. Choose *Verified* to score it and the "
               f"other criteria's candidate sets on held-out calibration tokens, then improve it by local "
               f"search ({search.budget_text(SelectConfig().verify_passes, n, search.removable(analysis))}).")

st.subheader("The search, step by step")
T = len(fbs.trajectory)
left, right = st.columns(2, gap="large")
with left:
    it = st.slider("Iteration", 0, max(T - 1, 1), T - 1, key="fbs_iter", disabled=T <= 1,
                   help="Step through the search; the play button under the right chart animates it.") if T > 1 else 0
    chart(viz.fbs_objective_figure(fbs, exact_objective=exact.objective, current=it), "fbs_objective",
          "The objective can only go down: FBS accepts a new prune pool only if it is strictly cheaper. "
          "Where the line ends above the dashed exact optimum, FBS stopped in a local optimum of the "
          "objective. That gap buys no speed (the exact programme is the faster of the two), and a lower "
          "objective does not mean a better model: the objective is only a proxy for perplexity, and on "
          "the benchmark FBS's sets, built from the most redundant single blocks, gave lower perplexity "
          "than the exact optimum at several n (benchmarks/RESULTS.md). The prune page measures both.")
with right:
    chart(viz.fbs_pools_figure(fbs, current=it), "fbs_pools",
          "Columns are iterations, rows are blocks. Dark: the blocks FBS would remove at that iteration (P); "
          "light: the alternatives it considers (A). Press Play to watch the choice move; a column equal to "
          "the previous one means FBS has converged.")

step = fbs.trajectory[min(it, T - 1)] if T else {}
st.markdown(f"**Iteration {it}:** P = {step.get('P', [])}, A = {step.get('A', [])}, objective "
            f"{step.get('objective', float('nan')):.4f}")
cands = tables.candidates_frame(step)
table(cands, f"fbs_candidates_iter{it}", "fbs_candidates",
      "Candidate runs measured at this iteration: coarse = sum of single-block scores (used to rank), "
      "span_mi = the measured span MI, cost = run cost; chosen = part of the new P.")

st.subheader(f"All methods for the same {n} blocks")
c1, c2 = st.columns([3, 2], gap="large")
with c1:
    table(tables.comparison_frame(rows), f"methods_n{n}", "comparison",
          "gap = objective minus the exact optimum's (0 = optimal for the MI objective). Baselines do not "
          "optimise this objective, so their gap shows how differently they choose.",
          missing="not measured for that method")
with c2:
    chart(viz.comparison_figure(rows), "fbs_comparison",
          "Lower bars reach a lower MI objective. Colours are the same for each method on every page.")
with st.expander("FBS trajectory as a table"):
    table(tables.trajectory_frame(fbs), "fbs_trajectory", "trajectory", missing="empty or not recorded")
