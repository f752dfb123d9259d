"""Scores of a capture: span matrix on synthetic Markov chains (DPI), the DPI report, stability,
Kendall tau, and the cosine / angular baselines on hand-made vectors."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators import get_estimator, list_estimators
from mi_prun.results import Analysis
from mi_prun.scores import (
    angular_distance_matrix,
    block_mi_from_span,
    cosine_block_influence,
    dpi_report,
    kendall_tau,
    score_capture,
    stability,
)

ALL = ["gaussian-channel", "gaussian-joint", "renyi-kernel", "binning", "ksg"]
TOL = (0.02, 0.01)  # DPI tolerance used on the chains: rtol 2 %, atol 0.01 nats


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rotation_chain(L: int = 5, m: int = 2000, d: int = 6, seed: int = 0) -> torch.Tensor:
    """h_{b+1} = (h_b Q_b) * s_b + sigma_b noise: random rotation, scaling, growing noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    H = [x]
    for b in range(L):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        s = 0.5 + 1.5 * torch.rand(d, generator=g)
        x = (x @ Q) * s + (0.2 + 0.1 * b) * torch.randn(m, d, generator=g)
        H.append(x)
    return torch.stack(H)  # (L+1, m, d)


def residual_chain(L: int = 5, m: int = 2000, d: int = 6, seed: int = 0) -> torch.Tensor:
    """h_{b+1} = h_b + tanh(h_b A_b) + sigma_b noise: a residual stream, channels kept in place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    H = [x]
    for b in range(L):
        A = 0.3 * torch.randn(d, d, generator=g) / math.sqrt(d)
        x = x + torch.tanh(x @ A) + (0.2 + 0.1 * b) * torch.randn(m, d, generator=g)
        H.append(x)
    return torch.stack(H)


def small_estimators():
    """Every estimator, with options small enough for the pairwise-loop comparison."""
    return [get_estimator("gaussian-channel"), get_estimator("gaussian-joint", k=4, shrinkage=0.1),
            get_estimator("renyi-kernel", max_samples=150),
            get_estimator("renyi-kernel", alpha=1.5, max_samples=80),
            get_estimator("renyi-kernel", alpha=1.0, bandwidth="scott", max_samples=60),
            get_estimator("binning", bins=8), get_estimator("ksg", max_samples=150, k=3)]


# ----------------------------------------------------------------------------- DPI on chains

@pytest.mark.parametrize("name", ["gaussian-joint", "ksg"])
def test_dpi_holds_on_rotation_chain_for_joint_estimators(name):
    # 6 layers, m = 2000 (KSG subsamples 1000), 6 dims: no violation beyond (2 %, 0.01 nats).
    est = get_estimator(name, preprocess="none")
    assert est.promises_dpi
    rep = dpi_report(est.span_matrix(rotation_chain())[0], TOL)
    assert rep["n_violations"] == 0, rep["worst"]


@pytest.mark.parametrize("name", ["gaussian-channel", "binning", "gaussian-joint"])
def test_dpi_holds_on_residual_chain(name):
    rep = dpi_report(get_estimator(name, preprocess="none").span_matrix(residual_chain())[0], TOL)
    assert rep["n_violations"] == 0, rep["worst"]


@pytest.mark.parametrize("name", ["gaussian-channel", "binning"])
def test_per_channel_estimators_break_dpi_on_rotation_chain(name):
    # Why they do not promise DPI: a rotation moves information across channels, so a span can
    # score higher than its own sub-spans. dpi_report must catch it.
    est = get_estimator(name, preprocess="none")
    assert not est.promises_dpi
    rep = dpi_report(est.span_matrix(rotation_chain())[0], TOL)
    assert rep["n_violations"] > 0


# ----------------------------------------------------------------------------- dpi_report

def brute_bound(M: np.ndarray) -> np.ndarray:
    n = M.shape[0]
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 2, n):
            subs = [M[a, b] for a in range(i, j) for b in range(a + 1, j + 1) if (a, b) != (i, j)]
            out[i, j] = out[j, i] = min(subs)
    return out


def test_dpi_bound_matches_brute_force():
    rng = np.random.default_rng(0)
    M = rng.random((7, 7))
    M = (M + M.T) / 2
    np.fill_diagonal(M, np.nan)
    np.testing.assert_allclose(dpi_report(M)["bound"], brute_bound(M))


def test_dpi_report_finds_planted_violations():
    n = 7
    i, j = np.indices((n, n))
    M = 1.0 / np.maximum(np.abs(j - i), 1)  # M[i, j] = 1 / (j - i): satisfies DPI
    np.fill_diagonal(M, np.nan)
    clean = dpi_report(M, (0.0, 1e-9))
    assert clean["n_violations"] == 0 and clean["n_cells"] == 15  # cells with j - i >= 2
    M[1, 5] = M[5, 1] = 0.9  # bound: its length-3 sub-spans, 1/3
    M[0, 6] = M[6, 0] = 0.2 + 0.005  # bound 1/5 (spans (0,5), (1,6)); excess 0.005 < atol 0.01
    rep = dpi_report(M, (0.0, 0.01))
    assert rep["n_violations"] == 1 and rep["cells"] == [[1, 5]]
    worst = rep["worst"][0]
    assert (worst["i"], worst["j"]) == (1, 5)
    assert worst["value"] == pytest.approx(0.9)
    assert worst["bound"] == pytest.approx(1 / 3) and worst["excess"] == pytest.approx(0.9 - 1 / 3)
    a, b = worst["bound_cell"]
    assert 1 <= a < b <= 5 and b - a == 3 and M[a, b] == pytest.approx(1 / 3)
    # Relative tolerance alone: 0.005 > 0.01 * 0.2, so (0, 6) is reported too, after (1, 5).
    rep_rel = dpi_report(M, (0.01, 0.0))
    assert rep_rel["cells"] == [[0, 6], [1, 5]] and rep_rel["worst"][0]["i"] == 1
    # A single float sets both tolerances: 0.01 + 0.01 * 0.2 > 0.005.
    assert dpi_report(M, 0.01)["cells"] == [[1, 5]]
    json.dumps({k: v for k, v in rep.items() if k != "bound"})
    assert isinstance(rep["bound"], np.ndarray) and rep["bound"].shape == (n, n)


def test_dpi_report_skips_nan_and_refuses_bad_input():
    M = np.full((4, 4), np.nan)
    assert dpi_report(M)["n_cells"] == 0
    with pytest.raises(MiPrunError):
        dpi_report(np.zeros((3, 4)))
    with pytest.raises(MiPrunError):
        dpi_report(np.zeros((3, 3)), (-1.0, 0.0))


# ----------------------------------------------------------------------------- span properties

def test_span_matrix_equals_pairwise_loop_for_every_estimator():
    H = residual_chain(L=3, m=200, d=4, seed=1)
    for est in small_estimators():
        span, norm = est.span_matrix(H)
        n = H.shape[0]
        loop = np.array([[est.mi(H[i], H[j]) if i != j else np.nan for j in range(n)] for i in range(n)])
        np.testing.assert_allclose(span, loop, rtol=1e-4, atol=1e-5, err_msg=repr(est))
        if norm is not None:
            nl = np.array([[est.nmi(H[i], H[j]) if i != j else 1.0 for j in range(n)] for i in range(n)])
            np.testing.assert_allclose(norm, nl, rtol=1e-4, atol=1e-5, err_msg=repr(est))
        np.testing.assert_allclose(est.block_mi(H), block_mi_from_span(span), rtol=1e-4, atol=1e-5)


def test_span_shape_symmetry_diagonal_and_block_mi():
    H = residual_chain(L=4, m=400, d=4, seed=2)
    for name in list_estimators():
        span, norm = get_estimator(name).span_matrix(H)
        assert span.shape == (5, 5)
        assert np.isnan(np.diag(span)).all()
        off = ~np.eye(5, dtype=bool)
        assert np.isfinite(span[off]).all() and (span[off] >= 0).all()
        np.testing.assert_array_equal(span, span.T)
        bm = block_mi_from_span(span)
        assert bm.shape == (4,)
        assert all(bm[b] == span[b, b + 1] for b in range(4))
        if norm is not None:
            assert (np.diag(norm) == 1).all() and np.array_equal(norm, norm.T)
            assert ((norm[off] >= 0) & (norm[off] <= 1)).all()


# ----------------------------------------------------------------------------- stability

def test_kendall_tau_hand_computed():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    # Ties: pairs (0,1) tied in a, (1,2) tied in b; 4 concordant: tau_b = 4 / sqrt(5 * 5).
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(MiPrunError):
        kendall_tau([1, 2], [1, 2, 3])


def test_stability_groups_and_halves():
    L, per_sample, N = 4, 40, 10
    H = residual_chain(L=L, m=per_sample * N, d=4, seed=3)
    batch_index = torch.arange(N).repeat_interleave(per_sample)
    est = get_estimator("gaussian-channel")
    batches, info = stability(H, batch_index, est, n_groups=4, seed=0)
    assert batches.shape == (L, 4)
    assert info["n_groups"] == 4 and sum(info["group_n_samples"]) == N
    assert sum(info["group_n_positions"]) == per_sample * N
    assert -1.0 <= info["kendall_tau_halves"] <= 1.0
    json.dumps(info)
    again, _ = stability(H, batch_index, est, n_groups=4, seed=0)
    np.testing.assert_array_equal(batches, again)  # seeded
    few, info_few = stability(H, torch.zeros(per_sample * N, dtype=torch.long), est, n_groups=8)
    assert few.shape == (L, 1) and info_few["kendall_tau_halves"] is None


def test_stability_ranking_agrees_on_clear_chain():
    # Blocks with very different noise: both halves give the same ranking (tau = 1).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 4, generator=g)
    H = [x]
    for noise in (0.1, 1.0, 0.3, 3.0):
        x = x + noise * torch.randn(2000, 4, generator=g)
        H.append(x)
    H = torch.stack(H)
    _, info = stability(H, torch.arange(20).repeat_interleave(100), "gaussian-channel", seed=1)
    assert info["kendall_tau_halves"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- baselines

def test_cosine_bi_and_angular_on_hand_made_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    layers = [e1, 3 * e1, e2, -e2, diag]  # identical direction, orthogonal, opposite, 45 degrees
    H = torch.stack([v.expand(5, 2) for v in layers])  # (5, 5 positions, 2)
    bi = cosine_block_influence(H)
    np.testing.assert_allclose(bi, [0.0, 1.0, 2.0, 1.0 + 1 / math.sqrt(2)], atol=1e-12)
    ang = angular_distance_matrix(H)
    assert ang.shape == (5, 5) and np.array_equal(ang, ang.T) and (np.diag(ang) == 0).all()
    assert ang[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert ang[1, 2] == pytest.approx(0.5) and ang[0, 2] == pytest.approx(0.5)
    assert ang[2, 3] == pytest.approx(1.0)
    assert ang[0, 4] == pytest.approx(0.25) and ang[3, 4] == pytest.approx(0.75)


def test_angular_matches_per_pair_loop():
    H = rotation_chain(L=3, m=50, d=5, seed=5)
    ang = angular_distance_matrix(H)
    for i in range(4):
        for j in range(i + 1, 4):
            cos = torch.nn.functional.cosine_similarity(H[i].double(), H[j].double(), dim=1)
            ref = float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi)
            assert ang[i, j] == pytest.approx(ref, abs=1e-9)


# ----------------------------------------------------------------------------- score_capture

def test_score_capture_fills_analysis_fields(tmp_path):
    L, N = 4, 8
    H = residual_chain(L=L, m=N * 50, d=4, seed=6)
    batch_index = torch.arange(N).repeat_interleave(50)
    calls = []
    est = get_estimator("gaussian-joint", k=4)
    out = score_capture(H, batch_index, est, n_groups=4, seed=0,
                        progress=lambda stage, f, msg: calls.append((stage, f, msg)))
    assert set(out) == {"block_mi", "span", "span_norm", "dpi", "block_mi_batches", "stability",
                        "baselines", "timings"}
    assert set(out) <= {f.name for f in fields(Analysis)}
    assert out["block_mi"].shape == (L,) and out["block_mi_batches"].shape == (L, 4)
    assert set(out["baselines"]) == {"cosine_bi", "angular"}
    assert {"span", "dpi", "stability", "baselines", "total"} <= set(out["timings"])
    assert {c[0] for c in calls} == {"span", "dpi", "stability", "baselines"}
    assert all(0.0 <= c[1] <= 1.0 for c in calls)
    json.dumps({k: v for k, v in out["dpi"].items() if k != "bound"})
    json.dumps(out["stability"])
    # The result is an Analysis that saves and reloads.
    a = Analysis(model={"name": "synthetic"}, calibration={}, estimator=est.name,
                 estimator_options=est.options, **out)
    b = Analysis.load(a.save(tmp_path / "analysis"))
    np.testing.assert_array_equal(b.block_mi, a.block_mi)


def test_score_capture_refuses_wrong_batch_index():
    H = residual_chain(L=2, m=100, d=3)
    with pytest.raises(MiPrunError):
        score_capture(H, torch.zeros(99, dtype=torch.long), "gaussian-channel")
