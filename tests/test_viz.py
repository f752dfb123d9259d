"""Figure builders of the app (mi_prun_app.viz): right data in the right traces, one colour per
method; no Streamlit and no app code in the core. Uses a synthetic analysis, so no model is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mi_prun.results import Analysis
from mi_prun_app import viz

ROOT = Path(__file__).resolve().parents[1]


def synthetic_analysis(L: int = 8, B: int = 4, seed: int = 0) -> Analysis:
    """A residual-like chain: span MI decays with distance; one DPI violation planted at (0, 3)."""
    from mi_prun.scores import dpi_report

    rng = np.random.default_rng(seed)
    block_mi = rng.uniform(0.3, 1.5, L)
    span = np.full((L + 1, L + 1), np.nan)
    for i in range(L + 1):
        for j in range(i + 1, L + 1):
            span[i, j] = span[j, i] = float(block_mi[i:j].min() * 0.9 ** (j - i - 1))
    span[0, 3] = span[3, 0] = 5.0  # breaks DPI on purpose
    norm = 1 - np.exp(-2 * np.nan_to_num(span, nan=np.inf))
    dpi = dpi_report(span)
    ang = rng.uniform(0.1, 0.5, (L + 1, L + 1))
    ang = (ang + ang.T) / 2
    np.fill_diagonal(ang, 0)
    return Analysis(model={"spec": "synthetic", "n_blocks": L}, calibration={"source": "synthetic"},
                    estimator="gaussian-channel", estimator_options={"preprocess": "standardize"},
                    block_mi=block_mi, span=span, span_norm=norm, dpi=dpi,
                    block_mi_batches=block_mi[:, None] + rng.normal(0, 0.01, (L, B)),
                    stability={"kendall_tau_halves": 0.8, "n_groups": B},
                    baselines={"cosine_bi": rng.uniform(0, 1, L), "angular": ang})


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return synthetic_analysis()


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return found[0]


def test_block_scores_figure_data_and_colours(analysis):
    fig = viz.block_scores_figure(analysis, removed=[2, 5])
    mi = trace(fig, "block MI")
    np.testing.assert_allclose(np.asarray(mi.y, float), analysis.block_mi)
    np.testing.assert_array_equal(np.asarray(mi.x), np.arange(analysis.n_blocks))
    np.testing.assert_allclose(np.asarray(trace(fig, "cosine BI").y, float), analysis.baselines["cosine_bi"])
    ang = np.asarray(trace(fig, "angular distance").y, float)
    np.testing.assert_allclose(ang, [analysis.baselines["angular"][b, b + 1] for b in range(analysis.n_blocks)])
    assert mi.marker.color == viz.METHOD_COLORS["fbs"]
    assert trace(fig, "cosine BI").marker.color == viz.METHOD_COLORS["shortgpt"]
    assert trace(fig, "angular distance").marker.color == viz.METHOD_COLORS["angular"]
    outlined = [b for b, c in enumerate(mi.marker.line.color) if c == "#000000"]
    assert outlined == [2, 5]


def test_stability_figure(analysis):
    fig = viz.stability_figure(analysis)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), analysis.block_mi_batches)
    assert "0.80" in fig.layout.title.text


def test_span_figure_marks_violations_and_selection(analysis):
    fig = viz.span_figure(analysis, selected=(2, 5))
    z = np.asarray(trace(fig, "span").z, dtype=float)
    n = analysis.n_blocks + 1
    iu = np.triu_indices(n, 1)
    np.testing.assert_allclose(z[iu], analysis.span[iu])
    assert np.isnan(z[np.tril_indices(n)]).all()  # lower triangle and diagonal left empty
    bad = trace(fig, "breaks DPI")
    assert [0, 3] in [[int(y), int(x)] for x, y in zip(bad.x, bad.y)]
    sel = trace(fig, "selected span")
    assert (int(sel.y[0]), int(sel.x[0])) == (2, 5)
    # hover carries the blocks covered and the DPI bound
    custom = trace(fig, "span").customdata
    assert custom[2][5][0] == "2..4"
    assert custom[0][1][1].startswith("none")
    assert "DPI bound" in trace(fig, "span").hovertemplate
    norm = viz.span_figure(analysis, normalised=True)
    np.testing.assert_allclose(np.asarray(norm.data[0].z, float)[iu], analysis.span_norm[iu])


def test_span_profile_figure(analysis):
    fig = viz.span_profile_figure(analysis, 1, 4)
    np.testing.assert_array_equal(np.asarray(fig.data[0].x), [1, 2, 3])
    np.testing.assert_allclose(np.asarray(fig.data[0].y, float), analysis.block_mi[1:4])


def test_fbs_figures_follow_the_trajectory(analysis):
    from mi_prun.select import select

    fbs = select(analysis, "fbs", n=3)
    exact = select(analysis, "exact", n=3)
    fig = viz.fbs_objective_figure(fbs, exact_objective=exact.objective, current=0)
    line = trace(fig, viz.label("fbs"))
    np.testing.assert_allclose(np.asarray(line.y, float), [s["objective"] for s in fbs.trajectory])
    assert np.allclose(np.asarray(trace(fig, viz.label("exact")).y, float), exact.objective)
    assert line.line.color == viz.METHOD_COLORS["fbs"]

    z = viz.fbs_pool_matrix(fbs)
    assert z.shape == (analysis.n_blocks, len(fbs.trajectory))
    for k, step in enumerate(fbs.trajectory):
        assert sorted(np.flatnonzero(z[:, k] == 2).tolist()) == sorted(step["P"])
        assert sorted(np.flatnonzero(z[:, k] == 1).tolist()) == sorted(step["A"])
    pools = viz.fbs_pools_figure(fbs, current=len(fbs.trajectory) - 1)
    np.testing.assert_allclose(np.asarray(pools.data[0].z, float), z)
    if len(fbs.trajectory) > 1:
        assert len(pools.frames) == len(fbs.trajectory)
        assert pools.layout.updatemenus[0].buttons[0].label == "Play"


def test_blocks_column_figure():
    fig = viz.blocks_column_figure(10, {"fbs": [3, 4], "shortgpt": [1, 7]})
    assert sorted(trace(fig, "MI-PRUN (FBS) removed").y) == [3, 4]
    assert sorted(trace(fig, "ShortGPT (cosine BI) removed").y) == [1, 7]
    assert len(trace(fig, "MI-PRUN (FBS) kept").y) == 8
    assert trace(fig, "ShortGPT (cosine BI) removed").marker.color == viz.METHOD_COLORS["shortgpt"]


def test_ppl_curve_figure_sorts_points_per_method():
    pts = [{"method": "fbs", "n": 2, "ppl": 30.0}, {"method": "fbs", "n": 1, "ppl": 20.0},
           {"method": "random", "n": 1, "ppl": 50.0}]
    fig = viz.ppl_curve_figure(pts, dense_ppl=10.0, protocol="8 x 128 tokens")
    f = trace(fig, viz.label("fbs"))
    assert list(f.x) == [1, 2] and list(f.y) == [20.0, 30.0]
    assert f.line.color == viz.METHOD_COLORS["fbs"]
    assert fig.layout.yaxis.type == "log"
    assert "8 x 128 tokens" in fig.layout.title.text
    # The dense line is drawn in data units (a shape on a log axis would read 10 as 10^10).
    dense = trace(fig, "dense 10.00")
    assert list(dense.y) == [10.0, 10.0] and not fig.layout.shapes


def test_every_method_has_a_colour_and_a_label():
    from mi_prun.select import SELECTORS

    for name in SELECTORS:
        assert name in viz.METHOD_COLORS and name in viz.METHOD_LABELS
    assert len(set(viz.METHOD_COLORS.values())) == len(viz.METHOD_COLORS)  # distinct colours


def test_core_and_app_helpers_never_import_streamlit():
    # The app's Streamlit-free helpers and the core; only mi_prun_app.ui (the pages' glue) may.
    code = ("import sys, mi_prun_app, mi_prun_app.state, mi_prun_app.tables, mi_prun_app.viz, mi_prun.pipeline, "
            "mi_prun.select, mi_prun.export, mi_prun.cli;"
            "sys.exit(1 if 'streamlit' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_core_holds_no_app_code():
    """mi_prun/ never imports Streamlit or the app package, and its old app modules are gone."""
    core = ROOT / "mi_prun"
    assert not (core / "appstate.py").exists() and not (core / "viz.py").exists()
    for path in core.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for banned in ("import streamlit", "from streamlit", "mi_prun_app", "plotly"):
            assert banned not in text, f"{path.relative_to(ROOT)} mentions {banned!r}"


def _verified_selection():
    """A verified Selection as `verified_select` returns it (no model needed to draw it)."""
    from mi_prun.select.selection import make_selection
    from dataclasses import replace

    from mi_prun.select.selection import ScoredSet

    sel = make_selection("fbs", 2, 8, (2, 3), 0.5, "neg-mi", 0.1, forward_passes=3)
    cands = [ScoredSet((4, 5), ("fbs", "topk"), 0.4, 3.2, False, "candidate"),
             ScoredSet((2, 3), ("exact:neg-mi#2",), 0.5, 3.0, True, "candidate"),
             ScoredSet((2, 4), ("swap:exact:neg-mi#2",), 0.7, 3.1, False, "swap"),
             # dropped by the race after 4 samples: its NLL is the paired estimate
             ScoredSet((1, 4), ("swap:exact:neg-mi#2",), 0.8, 3.9, False, "swap", complete=False, samples=4,
                       units=512)]
    return replace(sel, verified=True, nll=3.0, candidates=cands, winner_source="exact:neg-mi#2",
                   one_pass_removed=(4, 5), one_pass_nll=3.2,
                   verification={"budget": 16, "passes": 3, "dense_passes": 1, "dense_nll": 2.5,
                                 "one_pass_gap_nats": 0.2, "candidates_proposed": 3})


def test_candidates_figure_and_table():
    from mi_prun_app import tables

    sel = _verified_selection()
    fig = viz.candidates_figure(sel)
    dots = trace(fig, "candidate sets")
    assert list(dots.x) == ["2 3", "2 4", "4 5", "1 4"] and list(dots.y) == [3.0, 3.1, 3.2, 3.9]  # best first
    assert "dropped after 4 samples" in dots.customdata[3][3] and dots.customdata[0][3] == "all samples"
    assert dots.marker.color[0] == viz.METHOD_COLORS["fbs"]  # the winner
    assert dots.marker.line.color[2] == "#000000"  # the one-pass answer is circled
    assert list(trace(fig, "dense NLL 2.5000").y) == [2.5, 2.5]
    df = tables.verified_candidates_frame(sel)
    assert list(df["removed"]) == ["4 5", "2 3", "2 4", "1 4"]  # scoring order
    assert list(df["winner"]) == [False, True, False, False] and list(df["one_pass"]) == [True, False, False, False]
    assert list(df["samples"]) == ["all", "all", "all", "4"]
    assert df["proposed_by"][0] == "MI-PRUN (FBS)" and df["proposers"][0] == "MI-PRUN (FBS); MI top-k"
    assert df["proposed_by"][1] == "MI exact optimum (neg-mi), 2nd best"
    assert df["proposed_by"][2] == "swap from MI exact optimum (neg-mi), 2nd best"
    np.testing.assert_allclose(df["nll_vs_winner"], [0.2, 0.0, 0.1, 0.9], atol=1e-12)
    np.testing.assert_allclose(df["ppl"], np.exp([3.2, 3.0, 3.1, 3.9]))


def test_ppl_curve_draws_verified_and_healed_lines_and_the_table_pairs_them():
    from mi_prun_app import tables

    pts = [{"method": "fbs", "n": 1, "ppl": 20.0, "removed": "3", "verified": True, "healed": False},
           {"method": "fbs", "n": 1, "ppl": 15.0, "removed": "3", "verified": True, "healed": True},
           {"method": "fbs", "n": 2, "ppl": 40.0, "removed": "3 4", "verified": False, "healed": False},
           {"method": "shortgpt", "n": 1, "ppl": 30.0, "removed": "5", "verified": False, "healed": False}]
    fig = viz.ppl_curve_figure(pts)
    assert trace(fig, "MI-PRUN (FBS) verified").marker.symbol == "diamond"
    healed = trace(fig, "MI-PRUN (FBS) verified healed")
    assert healed.line.dash == "dash" and healed.line.color == viz.METHOD_COLORS["fbs"] and list(healed.y) == [15.0]
    assert list(trace(fig, "MI-PRUN (FBS)").x) == [2]  # the one-pass point is its own line
    df = tables.ppl_frame(pts)
    assert len(df) == 3
    row = df[df["method"] == "MI-PRUN (FBS) verified"].iloc[0]  # the legend's words
    assert (row["ppl"], row["ppl_healed"], row["healed_ratio"]) == (20.0, 15.0, 0.75)
    assert df[df["method"] == "ShortGPT (cosine BI)"]["ppl_healed"].isna().all()
    assert set(df["method"]) <= {t.name for t in fig.data}


def test_blocks_column_marks_the_verified_selection():
    fig = viz.blocks_column_figure(6, {"fbs": [3, 4], "fbs|verified": [2, 3]})
    ver = trace(fig, "MI-PRUN (FBS) verified removed")
    assert sorted(ver.y) == [2, 3] and ver.marker.symbol == "diamond"
    assert ver.marker.color == viz.METHOD_COLORS["fbs"]


def test_tables_use_the_legends_words_and_never_show_none():
    """A table row and a legend entry name a method the same; a missing value reads "—" on screen
    (the CSV keeps it empty), never None or nan."""
    import pandas as pd

    from mi_prun_app import tables
    from mi_prun_app.labels import MISSING, proposer_label

    rows = [{"method": "fbs", "removed": [1, 2], "objective": 0.5, "gap": 0.0},
            {"method": "shortgpt", "removed": [3, 4], "objective": 0.9, "gap": None},
            {"method": "sleb", "removed": None, "feasible": False, "reason": "needs a model"}]
    df = tables.comparison_frame(rows)
    assert list(df["method"]) == ["MI-PRUN (FBS)", "ShortGPT (cosine BI)", "SLEB"]
    assert list(df["method"][:2]) == [t for t in viz.comparison_figure(rows).data[0].x]  # the bars' labels
    shown, missing = tables.displayed(df)
    assert missing
    cells = [str(v) for v in shown.to_numpy().ravel()]
    assert not {"None", "nan", "NaN", "<NA>", ""} & set(cells) and MISSING in cells
    assert shown.loc[0, "gap"] == "0" and shown.loc[1, "gap"] == MISSING
    assert tables.csv_bytes(df).decode().splitlines()[2].startswith("ShortGPT (cosine BI),3 4,0.9,,")
    same, none_missing = tables.displayed(pd.DataFrame({"a": [1.5, 2.0]}))
    assert not none_missing and same["a"].tolist() == [1.5, 2.0]  # numbers stay numbers where none is missing
    assert proposer_label("fbs-pool@2") == "MI-PRUN (FBS) pool, iteration 2"
    assert proposer_label("exact:neg-mi#1") == "MI exact optimum (neg-mi)"
    assert proposer_label("put-back:3") == "block 3 put back" and proposer_label("angular#1") == "Angular distance, window 1"
    assert proposer_label("exchange:exchange:shortgpt") == "exchange from exchange from ShortGPT (cosine BI)"


def test_the_mode_bar_strip_stays_clear_and_titles_sit_below_it():
    """Plotly's toolbar covers the top 28 px at the right on hover: every figure's title starts below
    that strip (in pixels from the top, whatever the width), and the plot area below the title and
    the legend rows."""
    a = _verified_selection()
    figs = [viz.candidates_figure(a), viz.blocks_column_figure(6, {"fbs": [3, 4]}),
            viz.ppl_curve_figure([{"method": m, "n": k, "ppl": 10.0 * k + i} for i, m in enumerate(("fbs", "exact", "shortgpt", "angular", "random"))
                                  for k in (1, 2)], dense_ppl=5.0)]
    for fig in figs:
        lay = fig.layout
        assert lay.title.yref == "container" and lay.title.yanchor == "top"
        assert (1 - lay.title.y) * lay.height >= viz.MODEBAR_PX - 1e-9
        assert lay.margin.t >= viz.MODEBAR_PX + viz.TITLE_PX
    ppl = figs[2]
    assert ppl.layout.margin.t >= viz.MODEBAR_PX + viz.TITLE_PX + 3 * viz.LEGEND_ROW_PX  # 6 entries, 2 a row


def test_log_axis_is_labelled_at_1_2_5_steps_not_every_minor_tick():
    fig = viz.ppl_curve_figure([{"method": "fbs", "n": 1, "ppl": 45.0}, {"method": "fbs", "n": 4, "ppl": 900.0}],
                               dense_ppl=40.0)
    y = fig.layout.yaxis
    assert y.type == "log" and list(y.tickvals) == [50, 100, 200, 500, 1000]
    assert list(y.ticktext) == ["50", "100", "200", "500", "1,000"]
    narrow = viz.log_ticks([44.0, 58.0])
    assert len(narrow["tickvals"]) >= 3 and all(38 <= t <= 67 for t in narrow["tickvals"])
    assert viz.log_ticks([]) == {}


def test_a_single_n_is_bars_not_a_column_of_dots():
    pts = [{"method": "fbs", "n": 3, "ppl": 80.0, "verified": True}, {"method": "shortgpt", "n": 3, "ppl": 95.0},
           {"method": "fbs", "n": 3, "ppl": 60.0, "verified": True, "healed": True}]
    fig = viz.ppl_curve_figure(pts, dense_ppl=40.0)
    assert {t.type for t in fig.data} == {"bar"}
    assert [t.name for t in fig.data] == ["MI-PRUN (FBS) verified", "ShortGPT (cosine BI)",
                                          "MI-PRUN (FBS) verified healed", "Dense (unpruned)"]
    assert fig.data[2].marker.pattern.shape == "/" and list(fig.data[0].text) == ["80.0"]
    assert "compute more n to see a curve" in fig.layout.xaxis.title.text
    assert "3 blocks removed" in fig.layout.title.text
