"""Block MI: per-block MI next to the baselines (cosine Block Influence, angular distance), the
rankings side by side, and the per-batch stability heatmap with the rank agreement."""

from __future__ import annotations

import streamlit as st

from mi_prun_app import tables, viz
from mi_prun_app.ui import chart, n_remove, require_analysis, table

analysis = require_analysis()
st.title("Block MI")
st.caption("MI_b = I(h_b; h_b+1): how much of block b's input survives in its output. Residual blocks "
           "that barely change the stream keep MI high, so **high MI = redundant**. The baselines score "
           "the same captured states: ShortGPT's cosine Block Influence and the angular distance of "
           "Gromov et al., where **low = redundant**.")

mark_top = st.toggle("Outline the most redundant blocks by MI", value=True, key="bm_outline")
n_mark = n_remove(analysis)
removed = analysis.ranking()[:n_mark] if mark_top else []
chart(viz.block_scores_figure(analysis, removed=removed), "block_scores",
      "Each bar is one block (numbered from 0). Look for blocks that all three criteria call redundant "
      "(tall MI bar, short Block-Influence and angular bars): they are the safest to remove. Where the "
      f"criteria disagree, the prune pages show which choice costs less perplexity. Outlined: the {n_mark} "
      "highest-MI blocks (the FBS and prune pages set how many).")

st.subheader("Rankings side by side")
df = tables.ranking_frame(analysis)
table(df.sort_values("rank_mi"), "block_rankings", "rankings",
      "Rank 0 = most redundant (removed first by that criterion); ranks are numbered from 0, like "
      "blocks. Sorted by the MI rank.")

st.subheader("Stability across calibration text")
stab = analysis.stability or {}
tau = stab.get("kendall_tau_halves")
cols = st.columns(3)
cols[0].metric("Kendall tau between two halves", "-" if tau is None else f"{tau:.2f}",
               help="1 = both halves of the calibration text rank the blocks identically; 0 = unrelated.")
cols[1].metric("Calibration groups", stab.get("n_groups", "-"))
rel = stab.get("rel_std")
cols[2].metric("Mean relative spread", "-" if rel is None else f"{100 * rel:.1f} %",
               help="Std / mean of each block's MI across groups, averaged over blocks.")
chart(viz.stability_figure(analysis), "stability",
      "Each column is block MI measured on a different group of calibration samples. Rows that keep their "
      "colour across columns mean the ranking does not hinge on which text was used; a tau near 1 says the "
      "same in one number. Low agreement: use more samples.")
table(tables.stability_frame(analysis), "block_mi_per_group", "stability_table")
