"""DPI spans: the span matrix M[i, j] = I(h_i; h_j) as a heatmap with the DPI bound on hover and
violating cells marked; a chosen span shows the blocks it covers and what removing it would cost."""

from __future__ import annotations

import numpy as np
import streamlit as st

from mi_prun.config import SelectConfig
from mi_prun.select import cost_matrix
from mi_prun_app import tables, viz
from mi_prun_app.ui import chart, require_analysis, table

analysis = require_analysis()
L = analysis.n_blocks
st.title("DPI spans")
st.caption("Removing the contiguous blocks i..j-1 feeds h_i straight into block j, so that run is judged by "
           "its own span MI M[i, j] = I(h_i; h_j), not by the sum of its blocks' scores. The blocks form a "
           "chain, so the data processing inequality (DPI) says a span can carry no more information than "
           "any of its sub-spans.")

dpi = analysis.dpi or {}
left, right = st.columns([3, 2], gap="large")
with right:
    st.subheader("Pick a span")
    normalised = st.toggle("Show normalised MI", value=False, key="dpi_norm",
                           disabled=analysis.span_norm is None,
                           help="MI divided to lie in [0, 1] (estimator-specific).")
    top = analysis.ranking()[0]
    start = min(top, max(L - 3, 0))
    default = (start, min(start + 2, L - 1))  # a three-block run from the most redundant block
    first, last = st.slider("Blocks to remove (first, last)", 0, L - 1, default, key="dpi_span")
    i, j = int(first), int(last) + 1
    span = np.asarray(analysis.span, dtype=float)
    bound = dpi.get("bound")
    b = float(np.asarray(bound)[i, j]) if bound is not None else float("nan")
    run_cost = SelectConfig().run_cost
    C = cost_matrix(span, analysis.span_norm, run_cost)
    block_mi = np.asarray(analysis.block_mi, dtype=float)
    m = st.columns(2)
    m[0].metric(f"Span MI M[{i}, {j}]", f"{span[i, j]:.4f} nats")
    m[1].metric("DPI bound (min over sub-spans)", "-" if not np.isfinite(b) else f"{b:.4f}")
    m = st.columns(2)
    m[0].metric(f"Removal cost ({run_cost})", f"{C[i, j]:.4f}",
                help="The run cost the selectors minimise (lower = cheaper to remove).")
    m[1].metric("Sum of the blocks' own MI", f"{block_mi[i:j].sum():.4f}",
                help="What a per-block criterion would add up instead of measuring the span.")
    width = j - i
    cheaper = sum(1 for s in range(L - width + 1) if C[s, s + width] < C[i, j])
    st.caption(f"Covers {width} block(s): {', '.join(str(x) for x in range(i, j))}. Of the other "
               f"{L - width} runs of {width} block(s), {cheaper} cost less to remove"
               + (" (this is the cheapest)." if cheaper == 0 else "."))
    if np.isfinite(b) and span[i, j] > b + 1e-12:
        st.warning("This span carries more MI than one of its sub-spans: the estimate breaks DPI here.",
                   icon=":material/warning:")
with left:
    chart(viz.span_figure(analysis, normalised=normalised, selected=(i, j)), "span_heatmap",
          "Row i, column j: MI between the input of block i and the output of block j-1. Bright cells far from "
          "the diagonal are long runs that still keep their input's information: cheap to remove together. "
          "Hover for the DPI bound; x marks cells that exceed it beyond tolerance (an estimator defect, "
          "not a property of the model). The outlined cell is the span picked on the right.")

with right:
    chart(viz.span_profile_figure(analysis, i, j), "span_profile",
          "The bars are the covered blocks' own MI; the dashed line is the span's MI. By DPI the line should "
          "sit below the shortest bar; the gap shows how much information the run loses as a whole.")

st.subheader("DPI check")
tol = dpi.get("tolerance", {})
st.markdown(f"**{dpi.get('n_violations', 0)}** of {dpi.get('n_cells', 0)} span cells break DPI beyond the "
            f"tolerance ({tol.get('rule', 'n/a')}, rtol {tol.get('rtol', '-')}, atol {tol.get('atol', '-')}). "
            + ("This estimator does not promise DPI (a mean of per-channel MIs), so small violations are "
               "expected." if dpi.get("estimator_promises_dpi") is False else ""))
viol = tables.violations_frame(analysis)
if viol.empty:
    st.caption("No violations.")
else:
    table(viol, "dpi_violations", "violations", "The worst violations: value, its bound and the sub-span "
          "that gives the bound.")
with st.expander("All spans as a table"):
    table(tables.span_frame(analysis), "span_matrix", "spans",
          missing="no value: a single block has no sub-span to bound it (DPI bound), or the estimator gives "
                  "no normalised MI")
