"""Plotly figure builders of the app: results in, `go.Figure` out.

Every builder is a pure function of an `Analysis`, a `Selection` or plain data; none imports
Streamlit (the pages add the captions and show them). Colours of the selection methods come from
one table, `METHOD_COLORS`, so a method looks the same in every chart (block MI is drawn in
MI-PRUN's colour, cosine Block Influence in ShortGPT's, angular distance in the angular baseline's);
their names from `mi_prun_app.labels`, the words the tables use too. Blocks are numbered from 0 on
every axis. Every figure goes through `_layout`, which keeps the mode bar's strip clear of titles;
log axes are labelled at 1-2-5 steps (`log_ticks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mi_prun_app.labels import METHOD_LABELS, label, sel_label  # noqa: F401 (METHOD_LABELS: viz.METHOD_LABELS)
from mi_prun_app.tables import angular_per_block

# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies.
METHOD_COLORS: dict[str, str] = {
    "fbs": "#D55E00",         # MI-PRUN, Fast-Block-Select (vermillion)
    "exact": "#CC79A7",       # exact optimum of the MI objective (reddish purple)
    "topk": "#E69F00",        # top-k block MI (orange)
    "local": "#F0E442",       # local search (yellow)
    "exhaustive": "#7F3C8D",  # enumeration (purple)
    "shortgpt": "#0072B2",    # cosine Block Influence (blue)
    "angular": "#009E73",     # angular distance (bluish green)
    "sleb": "#56B4E9",        # SLEB (sky blue)
    "mi-guided": "#8C564B",   # MI-guided greedy on calibration NLL (brown)
    "random": "#999999",      # random (grey)
    "dense": "#222222",       # the unpruned model
}
KEPT_COLOR = "#D9D9D9"
VIOLATION_COLOR = "#000000"


def color(method: str) -> str:
    return METHOD_COLORS.get(method, "#555555")


# Plotly's toolbar (the mode bar: 26 px tall, 2 px from the top, about 220 px wide at the top right)
# shows on hover over any chart; nothing is drawn in the top strip it may cover, whatever the
# chart's width: the title starts below it, then the legend, then the plot (subplot titles sit
# right above their plots, so inside the margin too).
MODEBAR_PX = 34
TITLE_PX = 26
LEGEND_ROW_PX = 24


def _layout(fig: go.Figure, title: str | None = None, height: int = 360, legend_rows: int | None = None
            ) -> go.Figure:
    """Every figure's common layout (one place): the top strip left to the mode bar, the title
    below it (in pixels from the top), `legend_rows` rows of horizontal legend above the plot (by
    default one when the figure has more than one trace, Plotly's rule for showing a legend).
    Call it last: it reads the traces."""
    if legend_rows is None:
        legend_rows = int(len(fig.data) > 1 and fig.layout.showlegend is not False)
    # Subplot titles (make_subplots) hang above the top of their plots: a row for them too.
    above = any(a.yanchor == "bottom" and a.y is not None and a.y >= 1 for a in fig.layout.annotations or ())
    top = (MODEBAR_PX + (TITLE_PX if title else 0) + (TITLE_PX if above else 0)
           + LEGEND_ROW_PX * max(int(legend_rows), 0) + 4)
    total = max(int(height), top + 220)
    fig.update_layout(template="plotly_white", height=total,
                      margin=dict(l=50, r=20, t=top, b=45),
                      font=dict(size=12),
                      title=dict(text=title, x=0.0, xanchor="left", yref="container", yanchor="top",
                                 y=1.0 - MODEBAR_PX / total, font=dict(size=14)) if title else None,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0))
    return fig


def log_ticks(values: Iterable[float], pad: float = 1.15) -> dict[str, Any]:
    """A log axis labelled at 1-2-5 steps per decade (finer steps only when the data span less than
    three of those), never at every minor tick: {"range", "tickvals", "ticktext"} for `update_yaxes`."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    if not vals:
        return {}
    lo, hi = min(vals) / pad, max(vals) * pad
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
                 for m in steps if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            break
    text = [f"{t:,.0f}" if t >= 10 else f"{t:g}" for t in ticks]
    return {"range": [float(np.log10(lo)), float(np.log10(hi))], "tickvals": ticks, "ticktext": text}


# ----------------------------------------------------------------------------------------------
# Block MI page

def block_scores_figure(analysis: Any, removed: Iterable[int] = ()) -> go.Figure:
    """Block MI next to the baselines, one panel each (x = block). Blocks in `removed` get a
    black outline. Block MI: high = redundant; cosine BI and angular distance: low = redundant."""
    L = analysis.n_blocks
    blocks = np.arange(L)
    removed = set(int(b) for b in removed)
    outline = dict(color=["#000000" if b in removed else "rgba(0,0,0,0)" for b in blocks], width=2)
    panels: list[tuple[str, str, np.ndarray | None, str]] = [
        ("block MI", "fbs", np.asarray(analysis.block_mi, dtype=float), "MI (nats) - high = redundant"),
        ("cosine BI", "shortgpt", None if analysis.baselines.get("cosine_bi") is None
         else np.asarray(analysis.baselines["cosine_bi"], dtype=float), "Block Influence - low = redundant"),
        ("angular distance", "angular", angular_per_block(analysis), "angular distance / pi - low = redundant"),
    ]
    panels = [p for p in panels if p[2] is not None]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[3] for p in panels],
                        horizontal_spacing=0.06)
    for k, (name, method, values, _) in enumerate(panels, 1):
        fig.add_trace(go.Bar(x=blocks, y=values, name=name, marker=dict(color=color(method), line=outline),
                             hovertemplate=f"block %{{x}}<br>{name} %{{y:.4f}}<extra></extra>"), row=1, col=k)
        fig.update_xaxes(title_text="block", row=1, col=k, dtick=max(1, L // 10))
    fig.update_annotations(font_size=12)
    fig = _layout(fig, height=330, legend_rows=0)
    fig.update_layout(showlegend=False)  # the panel titles name each criterion
    return fig


def stability_figure(analysis: Any) -> go.Figure:
    """Block MI per group of calibration samples (blocks x groups). Rows that keep their colour
    across columns mean the ranking does not depend on which text was used."""
    batches = analysis.block_mi_batches
    fig = go.Figure()
    if batches is None:
        return _layout(fig, "no per-batch block MI in this analysis")
    z = np.asarray(batches, dtype=float)
    fig.add_trace(go.Heatmap(z=z, x=np.arange(z.shape[1]), y=np.arange(z.shape[0]), colorscale="Viridis",
                             colorbar=dict(title="MI"), name="block MI per group",
                             hovertemplate="block %{y}<br>group %{x}<br>MI %{z:.4f}<extra></extra>"))
    tau = (analysis.stability or {}).get("kendall_tau_halves")
    title = "Block MI per calibration group" + (f" (Kendall tau between halves {tau:.2f})"
                                                 if isinstance(tau, (int, float)) else "")
    fig.update_xaxes(title_text="calibration group", dtick=1)
    fig.update_yaxes(title_text="block", autorange="reversed", dtick=max(1, z.shape[0] // 15))
    return _layout(fig, title, height=max(300, min(520, 14 * z.shape[0] + 120)))


# ----------------------------------------------------------------------------------------------
# DPI spans page

def span_figure(analysis: Any, normalised: bool = False,
                selected: tuple[int, int] | None = None) -> go.Figure:
    """The span matrix M[i, j] = I(h_i; h_j) (upper triangle; row i = input of block i, column j =
    output of block j-1). Hover shows the blocks covered, the MI and the DPI bound from its
    sub-spans; cells that break DPI beyond tolerance carry an x; `selected` is outlined."""
    M = np.asarray(analysis.span_norm if normalised and analysis.span_norm is not None else analysis.span,
                   dtype=float)
    n = M.shape[0]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    z = np.where(upper, M, np.nan)
    bound = (analysis.dpi or {}).get("bound")
    bound = np.asarray(bound, dtype=float) if bound is not None else np.full((n, n), np.nan)
    raw = np.asarray(analysis.span, dtype=float)
    custom = np.empty((n, n, 3), dtype=object)
    for i in range(n):
        for j in range(n):
            blocks = f"{i}..{j - 1}" if j - 1 > i else (f"{i}" if j - 1 == i else "-")
            custom[i, j, 0] = blocks
            custom[i, j, 1] = f"{bound[i, j]:.4f}" if np.isfinite(bound[i, j]) else "none (single block)"
            custom[i, j, 2] = f"{raw[i, j]:.4f}" if np.isfinite(raw[i, j]) else "-"
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=z, x=np.arange(n), y=np.arange(n), customdata=custom, colorscale="Viridis",
        colorbar=dict(title="NMI" if normalised else "MI (nats)"), name="span",
        hovertemplate=("span h_%{y} -> h_%{x}<br>removes blocks %{customdata[0]}<br>MI %{customdata[2]} nats"
                       + ("<br>normalised %{z:.3f}" if normalised else "")
                       + "<br>DPI bound (min over sub-spans) %{customdata[1]}<extra></extra>")))
    cells = (analysis.dpi or {}).get("cells") or []
    if cells:
        fig.add_trace(go.Scatter(x=[c[1] for c in cells], y=[c[0] for c in cells], mode="markers",
                                 name="breaks DPI", marker=dict(symbol="x", size=9, color=VIOLATION_COLOR,
                                                                 line=dict(width=1, color="white")),
                                 hovertemplate="span h_%{y} -> h_%{x} breaks DPI<extra></extra>"))
    if selected is not None:
        i, j = selected
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                      line=dict(color=color("fbs"), width=3))
        fig.add_trace(go.Scatter(x=[j], y=[i], mode="markers", name="selected span",
                                 marker=dict(symbol="square-open", size=14, color=color("fbs")),
                                 hoverinfo="skip"))
    step = max(1, n // 16)
    fig.update_xaxes(title_text="j: output of block j-1 (h_j)", dtick=step, constrain="domain")
    fig.update_yaxes(title_text="i: input of block i (h_i)", autorange="reversed", dtick=step,
                     scaleanchor="x")
    return _layout(fig, "Span MI M[i, j] = I(h_i; h_j)" + (" (normalised)" if normalised else ""),
                   height=520)


def span_profile_figure(analysis: Any, i: int, j: int) -> go.Figure:
    """The blocks a span i..j-1 covers: their single-block MI next to the span's own MI and its
    DPI bound (the span can carry no more than its weakest block)."""
    blocks = list(range(i, j))
    mi = np.asarray(analysis.block_mi, dtype=float)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=blocks, y=mi[blocks], name="block MI of each covered block",
                         marker_color=color("fbs"), hovertemplate="block %{x}<br>MI %{y:.4f}<extra></extra>"))
    span = float(np.asarray(analysis.span, dtype=float)[i, j])
    fig.add_hline(y=span, line=dict(color="#000000", dash="dash"),
                  annotation_text=f"span MI M[{i},{j}] = {span:.3f}", annotation_position="top left")
    fig.update_xaxes(title_text="block", dtick=1)
    fig.update_yaxes(title_text="MI (nats)")
    return _layout(fig, f"Blocks {i}..{j - 1}: the span against its members", height=300)


# ----------------------------------------------------------------------------------------------
# Fast-Block-Select page

def fbs_objective_figure(selection: Any, exact_objective: float | None = None,
                         current: int | None = None) -> go.Figure:
    """Objective (sum of run costs, lower = better) per FBS iteration, with the exact optimum."""
    traj = selection.trajectory or []
    it = [s.get("iteration", k) for k, s in enumerate(traj)]
    obj = [s.get("objective") for s in traj]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=it, y=obj, mode="lines+markers", name=label("fbs"),
                             line=dict(color=color("fbs"), width=2),
                             hovertemplate="iteration %{x}<br>objective %{y:.4f}<extra></extra>"))
    if exact_objective is not None and np.isfinite(exact_objective):
        fig.add_trace(go.Scatter(x=[min(it, default=0), max(it, default=0)], y=[exact_objective] * 2,
                                 mode="lines", name=label("exact"),
                                 line=dict(color=color("exact"), dash="dash", width=2)))
    if current is not None:
        fig.add_vline(x=current, line=dict(color="#888888", dash="dot"))
    fig.update_xaxes(title_text="iteration", dtick=1)
    fig.update_yaxes(title_text=f"objective ({selection.run_cost}, lower = better)")
    return _layout(fig, "FBS objective per iteration", height=320)


def fbs_pool_matrix(selection: Any) -> np.ndarray:
    """(L, iterations) codes: 2 = in the prune pool P, 1 = in the alternative pool A, 0 = neither."""
    traj = selection.trajectory or []
    z = np.zeros((selection.n_blocks, max(len(traj), 1)))
    for k, step in enumerate(traj):
        for b in step.get("A", []):
            z[int(b), k] = 1
        for b in step.get("P", []):
            z[int(b), k] = 2
    return z


_POOL_SCALE = [[0.0, "#F2F2F2"], [0.33, "#F2F2F2"], [0.33, "#F6C6A8"], [0.66, "#F6C6A8"],
               [0.66, METHOD_COLORS["fbs"]], [1.0, METHOD_COLORS["fbs"]]]


def fbs_pools_figure(selection: Any, current: int | None = None, animate: bool = True) -> go.Figure:
    """The chosen set per iteration as a blocks x iterations map (dark = prune pool P, light =
    alternative pool A). With `animate`, a play button reveals the iterations one by one."""
    z = fbs_pool_matrix(selection)
    L, T = z.shape
    its = np.arange(T)
    text = np.where(z == 2, "P (prune)", np.where(z == 1, "A (alternative)", "-"))
    heat = dict(x=its, y=np.arange(L), colorscale=_POOL_SCALE, zmin=0, zmax=2, showscale=False,
                xgap=1, ygap=1, name="pools",
                hovertemplate="iteration %{x}<br>block %{y}<br>%{text}<extra></extra>")
    fig = go.Figure(go.Heatmap(z=z, text=text, **heat))
    if current is not None:
        fig.add_shape(type="rect", x0=current - 0.5, x1=current + 0.5, y0=-0.5, y1=L - 0.5,
                      line=dict(color="#000000", width=2))
    if animate and T > 1:
        frames = []
        for k in range(T):
            zk = np.where(its[None, :] <= k, z, np.nan)
            frames.append(go.Frame(data=[go.Heatmap(z=zk, text=text, **heat)], name=str(k)))
        fig.frames = frames
        fig.update_layout(
            updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=-0.18, xanchor="left",
                              buttons=[dict(label="Play", method="animate",
                                            args=[None, dict(frame=dict(duration=700, redraw=True),
                                                             fromcurrent=False, transition=dict(duration=0))])])],
            sliders=[dict(active=T - 1, x=0.12, y=-0.12, len=0.85, currentvalue=dict(prefix="iteration ", xanchor="right"),
                          steps=[dict(label=str(k), method="animate",
                                      args=[[str(k)], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                                 for k in range(T)])])
    fig.update_xaxes(title_text="iteration", dtick=1)
    fig.update_yaxes(title_text="block", autorange="reversed", dtick=max(1, L // 15))
    return _layout(fig, "Prune pool P (dark) and alternative pool A (light) per iteration",
                   height=max(320, min(560, 14 * L + 170)))


# ----------------------------------------------------------------------------------------------
# Prune and export page

def blocks_column_figure(n_blocks: int, removed_by_method: Mapping[str, Sequence[int]]) -> go.Figure:
    """The model as a column of blocks per method (block 0 at the bottom, next to the embeddings);
    removed blocks in the method's colour, kept blocks grey. A key `method|verified` is that
    method's verified selection (labelled so, same colour, diamond markers)."""
    fig = go.Figure()
    size = max(6, min(22, int(420 / max(n_blocks, 1))))
    for key, removed in removed_by_method.items():
        method, _, tag = key.partition("|")
        verified = tag == "verified"
        name = sel_label(method, verified)
        removed = sorted(int(b) for b in removed)
        kept = [b for b in range(n_blocks) if b not in set(removed)]
        fig.add_trace(go.Scatter(x=[name] * len(kept), y=kept, mode="markers", name=f"{name} kept",
                                 showlegend=False, marker=dict(symbol="square", size=size, color=KEPT_COLOR),
                                 hovertemplate=f"{name}<br>block %{{y}} kept<extra></extra>"))
        fig.add_trace(go.Scatter(x=[name] * len(removed), y=removed, mode="markers", name=f"{name} removed",
                                 marker=dict(symbol="diamond" if verified else "square", size=size,
                                             color=color(method), line=dict(color="#000000", width=1)),
                                 hovertemplate=f"{name}<br>block %{{y}} removed<extra></extra>"))
    fig.update_yaxes(title_text="block (0 = first)", range=[-0.7, n_blocks - 0.3], dtick=max(1, n_blocks // 15))
    fig.update_xaxes(title_text=None)
    fig = _layout(fig, "Which blocks each method removes", height=max(320, min(560, 13 * n_blocks + 150)),
                  legend_rows=0)
    fig.update_layout(showlegend=False)  # the x axis names every column
    return fig


def ppl_curve_figure(points: Iterable[Mapping[str, Any]], dense_ppl: float | None = None,
                     protocol: str | None = None) -> go.Figure:
    """Perplexity against the number of removed blocks, one line per method (log scale, labelled at
    1-2-5 steps); a point with `verified` True belongs to the method's verified line (diamonds), one
    with `healed` True to its healed line (dashed, same colour). With a single n computed there is no
    curve to draw: one bar per method (healed ones hatched), the dense model's bar beside them."""
    by_line: dict[tuple[str, bool, bool], list[tuple[int, float]]] = {}
    for p in points:
        key = (str(p["method"]), bool(p.get("verified", False)), bool(p.get("healed", False)))
        by_line.setdefault(key, []).append((int(p["n"]), float(p["ppl"])))
    lines = sorted(by_line.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1]))
    ns = sorted({n for pts in by_line.values() for n, _ in pts})
    dense_ok = dense_ppl is not None and np.isfinite(dense_ppl)
    ys = [v for pts in by_line.values() for _, v in pts] + ([dense_ppl] if dense_ok else [])
    fig = go.Figure()
    suffix = f" - {protocol}" if protocol else ""
    if len(ns) == 1:
        for (method, verified, healed), pts in lines:
            name = sel_label(method, verified, healed)
            v = min(v for _, v in pts)
            fig.add_trace(go.Bar(x=[name], y=[v], name=name, text=[f"{v:.1f}"], textposition="outside",
                                 marker=dict(color=color(method), pattern_shape="/" if healed else ""),
                                 hovertemplate=f"{name}<br>{ns[0]} blocks removed<br>perplexity %{{y:.2f}}"
                                               "<extra></extra>"))
        if dense_ok:
            name = label("dense")
            fig.add_trace(go.Bar(x=[name], y=[dense_ppl], name=name, text=[f"{dense_ppl:.1f}"],
                                 textposition="outside", marker=dict(color=color("dense")),
                                 hovertemplate=f"{name}<br>perplexity %{{y:.2f}}<extra></extra>"))
        fig.update_xaxes(title_text=f"{ns[0]} blocks removed (compute more n to see a curve)", type="category")
        fig.update_yaxes(title_text="perplexity (log scale, lower = better)", type="log",
                         **log_ticks(ys, pad=1.6))
        fig = _layout(fig, f"Perplexity with {ns[0]} blocks removed{suffix}", height=380, legend_rows=0)
        fig.update_layout(showlegend=False)  # the x axis names every bar
        return fig
    for (method, verified, healed), pts in lines:
        pts = sorted(set(pts))
        name = sel_label(method, verified, healed)
        fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=[v for _, v in pts], mode="lines+markers", name=name,
                                 line=dict(color=color(method), width=3 if verified else 2,
                                           dash="dash" if healed else "solid"),
                                 marker=dict(symbol="diamond" if verified else "circle", size=8 if verified else 6),
                                 hovertemplate=f"{name}<br>%{{x}} blocks removed<br>"
                                               "perplexity %{y:.2f}<extra></extra>"))
    if dense_ok:
        # A trace, not add_hline: on a log axis Plotly reads shape coordinates as log10 values,
        # which stretched the axis to 10^dense.
        fig.add_trace(go.Scatter(x=[ns[0] - 0.5, ns[-1] + 0.5] if ns else [-0.5, 0.5], y=[dense_ppl, dense_ppl],
                                 mode="lines", name=f"dense {dense_ppl:.2f}", line=dict(color=color("dense"), dash="dot"),
                                 hovertemplate=f"dense {dense_ppl:.2f}<extra></extra>"))
    fig.update_xaxes(title_text="blocks removed", dtick=1)
    fig.update_yaxes(title_text="perplexity (log scale, lower = better)", type="log", **log_ticks(ys))
    # Two legend entries a row: the prune page draws this chart in a column about 570 px wide.
    return _layout(fig, "Perplexity against blocks removed" + suffix, height=380,
                   legend_rows=(len(fig.data) + 1) // 2)


def candidates_figure(selection: Any) -> go.Figure:
    """The verified search's candidate sets by their verification NLL (lower = better), best first:
    the winner in MI-PRUN's colour, sets found by local search (swaps, exchanges) lighter, the one-pass
    answer circled in black; the dotted line is the dense model's NLL. The smaller sets an exchange
    measures on its way (one block put back) are in the table only."""
    rows = sorted((r for r in selection.candidates or [] if len(r.removed) == selection.n and np.isfinite(r.nll)),
                  key=lambda r: r.nll)  # put-back steps and broken passes: table only
    winner = tuple(selection.removed)
    one = None if selection.one_pass_removed is None else tuple(selection.one_pass_removed)
    xs = [" ".join(map(str, r.removed)) for r in rows]
    colours = [color("fbs") if r.removed == winner else
               ("#F6C6A8" if r.stage in ("swap", "exchange") else "#BBBBBB") for r in rows]
    outline = ["#000000" if one is not None and r.removed == one else "rgba(0,0,0,0)" for r in rows]
    custom = [[", ".join(r.proposers), r.stage, "yes" if r.cached else "no",
               "all samples" if r.complete else f"dropped after {r.samples} samples (paired estimate)"]
              for r in rows]
    fig = go.Figure(go.Scatter(
        x=xs, y=[r.nll for r in rows], mode="markers", name="candidate sets", customdata=custom,
        marker=dict(size=14, color=colours, symbol="diamond", line=dict(color=outline, width=2)),
        hovertemplate=("removes %{x}<br>NLL %{y:.4f}<br>proposed by %{customdata[0]}<br>"
                       "stage %{customdata[1]}, cached %{customdata[2]}<br>%{customdata[3]}<extra></extra>")))
    dense = (selection.verification or {}).get("dense_nll")
    if dense is not None and xs and np.isfinite(dense):
        fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[dense, dense], mode="lines", name=f"dense NLL {dense:.4f}",
                                 line=dict(color=color("dense"), dash="dot"), hoverinfo="skip"))
    fig.update_xaxes(title_text="removed blocks (best first)", type="category")
    fig.update_yaxes(title_text="verification NLL (nats/token, lower = better)")
    return _layout(fig, "Verified search: each set's NLL", height=340)  # short: a narrow column, no wrap


def comparison_figure(rows: Iterable[Mapping[str, Any]]) -> go.Figure:
    """The MI objective each method reaches (lower = better) for the same number of blocks."""
    rows = [r for r in rows if r.get("feasible", True) and r.get("objective") is not None]
    fig = go.Figure(go.Bar(x=[label(r["method"]) for r in rows], y=[r["objective"] for r in rows],
                           marker_color=[color(r["method"]) for r in rows], name="objective",
                           hovertemplate="%{x}<br>objective %{y:.4f}<extra></extra>"))
    fig.update_yaxes(title_text="objective (lower = better)")
    return _layout(fig, "MI objective of each method's choice", height=300)
