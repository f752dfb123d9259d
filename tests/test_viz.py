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
            "mi_prun.select, mi_prun.prune, mi_prun.cli;"
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
