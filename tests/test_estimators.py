"""MI estimators against known answers (jointly Gaussian data), their invariants and their errors.

Known answers: a correlated Gaussian pair has I = -1/2 log(1 - rho^2); Gaussian vectors with
canonical correlations p_i have I = -1/2 sum_i log(1 - p_i^2). Sample sizes and tolerances are
stated per test; every random draw is seeded.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators import (
    ESTIMATORS,
    PREPROCESS,
    Estimator,
    describe_estimators,
    get_estimator,
    list_estimators,
    matrix_renyi_entropy,
    preprocess_layer,
    register,
)
from mi_prun.estimators.base import SAMPLES_FIX

ALL = ["gaussian-channel", "gaussian-joint", "renyi-kernel", "binning", "ksg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian_mi(rhos) -> float:
    return -0.5 * sum(math.log(1 - r * r) for r in rhos)


def per_channel_pairs(m: int, rhos: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (m, d): channel c of y has correlation rhos[c] with channel c of x, channels independent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, rhos.numel(), generator=g)
    y = rhos * x + torch.sqrt(1 - rhos**2) * torch.randn(m, rhos.numel(), generator=g)
    return x, y


def canonical_pairs(m: int, ps: list[float], d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (m, d) with canonical correlations ps (rest 0), hidden behind random invertible mixings."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor(ps)
    u, v = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    v[:, :len(ps)] = p * u[:, :len(ps)] + torch.sqrt(1 - p**2) * v[:, :len(ps)]
    A, B = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    return u @ A, v @ B


# ----------------------------------------------------------------------------- known answers

def test_single_correlated_pair_gaussian_estimators():
    # m = 20000, rho = 0.6: both Gaussian estimators within 0.01 nats of -1/2 log(1 - rho^2).
    x, y = per_channel_pairs(20000, torch.tensor([0.6]), seed=1)
    truth = gaussian_mi([0.6])
    for name in ("gaussian-channel", "gaussian-joint"):
        assert get_estimator(name, preprocess="none").mi(x, y) == pytest.approx(truth, abs=0.01), name


def test_gaussian_channel_known_mi():
    # m = 20000, 8 channels with rho from 0.1 to 0.9: within 0.01 nats of the mean per-channel MI.
    rhos = torch.linspace(0.1, 0.9, 8)
    x, y = per_channel_pairs(20000, rhos, seed=2)
    truth = float(np.mean([gaussian_mi([r]) for r in rhos.tolist()]))
    est = get_estimator("gaussian-channel", preprocess="none")
    assert est.mi(x, y) == pytest.approx(truth, abs=0.01)
    assert est.nmi(x, y) == pytest.approx(float((rhos**2).mean()), abs=0.01)  # mean rho^2


def test_binning_known_mi():
    # m = 20000, 16 quantile bins: within 0.03 nats of the per-channel Gaussian MI (quantisation
    # loses a little, the plug-in bias (bins-1)^2/(2m) ~ 0.006 adds a little).
    rhos = torch.linspace(0.1, 0.9, 8)
    x, y = per_channel_pairs(20000, rhos, seed=3)
    truth = float(np.mean([gaussian_mi([r]) for r in rhos.tolist()]))
    assert get_estimator("binning", preprocess="none", bins=16).mi(x, y) == pytest.approx(truth, abs=0.03)


def test_gaussian_joint_known_mi():
    # m = 20000, d = 6 mixed dimensions, canonical correlations (0.9, 0.7, 0.4): within 0.03 nats.
    ps = [0.9, 0.7, 0.4]
    x, y = canonical_pairs(20000, ps, 6, seed=4)
    est = get_estimator("gaussian-joint", preprocess="none", k=6)
    assert est.mi(x, y) == pytest.approx(gaussian_mi(ps), abs=0.03)
    # The per-channel estimator cannot see correlations hidden by the mixing: it is far off.
    assert abs(get_estimator("gaussian-channel", preprocess="none").mi(x, y) - gaussian_mi(ps)) > 0.3


def test_gaussian_joint_pca_truncation_keeps_leading_correlations():
    # Canonical pairs in the 2 highest-variance directions survive a k = 2 PCA (m = 20000, 0.03 nats).
    x, y = per_channel_pairs(20000, torch.tensor([0.8, 0.6, 0.0, 0.0, 0.0, 0.0]), seed=5)
    scale = torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    assert get_estimator("gaussian-joint", preprocess="none", k=2).mi(x * scale, y * scale) == \
        pytest.approx(gaussian_mi([0.8, 0.6]), abs=0.03)


def test_ksg_known_mi():
    # m = 2000 positions (all used), 2 + 2 dimensions, canonical correlations (0.8, 0.5):
    # KSG (k_neighbors = 3) within 0.1 nats of 0.655.
    ps = [0.8, 0.5]
    x, y = canonical_pairs(2000, ps, 2, seed=6)
    est = get_estimator("ksg", preprocess="none", k=2, max_samples=2000)
    assert est.mi(x, y) == pytest.approx(gaussian_mi(ps), abs=0.1)
    assert est.nmi(x, y) is None


# ----------------------------------------------------------------------------- renyi

def test_renyi_independent_is_about_zero():
    # 500 positions, 3 dimensions: I < 0.02 nats while each entropy is about 0.9 nats.
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    est = get_estimator("renyi-kernel", preprocess="none")
    assert 0 <= est.mi(x, y) < 0.02


def test_renyi_identical_inputs_give_the_entropy_for_clustered_data():
    # 4 equal, well-separated clusters and a bandwidth far below their distance: K is a 0/1 block
    # matrix, so A o A = A and I(X; X) = S(A) = ln 4 for every alpha.
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(200) % 4
    x = 10.0 * torch.eye(4)[labels] + 0.001 * torch.randn(200, 4, generator=g)
    for alpha in (2.0, 1.5):
        est = get_estimator("renyi-kernel", preprocess="none", bandwidth=1.0, alpha=alpha)
        K = est._prepare(x)[0]
        s = matrix_renyi_entropy(K, alpha)
        assert s == pytest.approx(math.log(4), abs=1e-3)
        assert est.mi(x, x) == pytest.approx(s, abs=1e-3)
        assert est.nmi(x, x) == pytest.approx(1.0, abs=1e-3)


def test_renyi_identical_inputs_general_case_is_bounded_by_entropy():
    # Hadamard joint: A o A is a narrower kernel with more entropy, so I(X; X) <= S(A) in general.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 3, generator=g)
    est = get_estimator("renyi-kernel", preprocess="none")
    s = est._prepare(x)[1]
    assert 0 < est.mi(x, x) <= s + 1e-9
    assert est.mi(x, x) > est.mi(x, x + torch.randn(300, 3, generator=g))


def test_renyi_alpha2_closed_form_equals_eigenvalues():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(120, 4, generator=g)
    y = x + 0.5 * torch.randn(120, 4, generator=g)
    closed = get_estimator("renyi-kernel", preprocess="none", alpha=2.0)
    eig = get_estimator("renyi-kernel", preprocess="none", alpha=2.0, method="eigen")
    assert closed.mi(x, y) == pytest.approx(eig.mi(x, y), abs=1e-8)
    K = closed._prepare(x)[0]
    assert matrix_renyi_entropy(K, 2.0, closed_form=True) == \
        pytest.approx(matrix_renyi_entropy(K, 2.0, closed_form=False), abs=1e-9)
    H = torch.stack([x, y, y + torch.randn(120, 4, generator=g)])
    np.testing.assert_allclose(closed.span_matrix(H)[0], eig.span_matrix(H)[0], atol=1e-8)


@pytest.mark.parametrize("bandwidth", ["median", "scott", "silverman", 2.5])
def test_renyi_bandwidth_rules_give_finite_mi(bandwidth):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, 8, generator=g)
    est = get_estimator("renyi-kernel", preprocess="none", bandwidth=bandwidth)
    v = est.mi(x, x + 0.3 * torch.randn(200, 8, generator=g))
    assert math.isfinite(v) and v > 0


def test_renyi_subsample_is_paired_and_seeded():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(600, 3, generator=g)
    y = x + 0.2 * torch.randn(600, 3, generator=g)
    est = get_estimator("renyi-kernel", preprocess="none", max_samples=100, seed=3)
    # the seed decides the subsample: a fresh estimator with the same seed agrees, another seed not
    assert est.mi(x, y) == get_estimator("renyi-kernel", preprocess="none", max_samples=100, seed=3).mi(x, y)
    assert est.mi(x, y) != get_estimator("renyi-kernel", preprocess="none", max_samples=100, seed=4).mi(x, y)
    # Paired subset: far more MI than between x and a shuffled y.
    assert est.mi(x, y) > 5 * est.mi(x, y[torch.randperm(600, generator=g)])


# ----------------------------------------------------------------------------- invariants

def test_every_estimator_is_monotone_in_noise():
    # m = 800, y = x + s * noise for s = 0, 0.5, 1, 2, 4 (same noise draw): MI non-increasing,
    # default options.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(800, 6, generator=g)
    noise = torch.randn(800, 6, generator=g)
    for name in ALL:
        est = get_estimator(name)
        vals = [est.mi(x, x + s * noise) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(vals)), (name, vals)
        assert vals[0] > vals[-1], (name, vals)


def test_nmi_in_unit_interval():
    x, y = per_channel_pairs(1000, torch.tensor([0.9, 0.5, 0.2, 0.0]), seed=14)
    for name in ALL:
        est = get_estimator(name, preprocess="none")
        v = est.nmi(x, y)
        if est.has_norm:
            assert 0.0 <= v <= 1.0, (name, v)
        else:
            assert v is None


def test_degenerate_constant_layer_and_channels_are_finite(caplog):
    # Layer 1 has two constant channels, layer 2 is entirely constant: finite MI, 0 with the
    # constant layer, and a warning that says so.
    g = torch.Generator().manual_seed(15)
    x = torch.randn(200, 4, generator=g)
    partial = x + 0.3 * torch.randn(200, 4, generator=g)
    partial[:, :2] = 3.0
    H = torch.stack([x, partial, torch.full((200, 4), 7.0), x + torch.randn(200, 4, generator=g)])
    for name in ALL:
        for pre in PREPROCESS:
            est = get_estimator(name, preprocess=pre)
            with caplog.at_level(logging.WARNING, logger="mi_prun.estimators"):
                span, norm = est.span_matrix(H)
            off = ~np.eye(4, dtype=bool)
            assert np.isfinite(span[off]).all(), (name, pre, span)
            assert np.allclose(span[2, [0, 1, 3]], 0.0, atol=1e-9), (name, pre, span)
            if norm is not None:
                assert np.isfinite(norm).all()
            assert math.isfinite(est.mi(H[2], H[2]))
    assert any("constant" in r.getMessage() for r in caplog.records)


def test_preprocess_rms_gives_unit_rms_and_keeps_zero_tokens():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])
    z = preprocess_layer(x, "rms")
    assert torch.isfinite(z).all()
    assert torch.allclose(z.pow(2).mean(1), torch.tensor([1.0, 0.0, 1.0]))


def test_estimators_accept_other_dtypes_and_numpy():
    x, y = per_channel_pairs(500, torch.tensor([0.7, 0.3]), seed=16)
    est = get_estimator("gaussian-channel", preprocess="none")
    ref = est.mi(x, y)
    assert est.mi(x.double(), y.double()) == pytest.approx(ref, abs=1e-5)
    assert est.mi(x.numpy(), y.numpy()) == pytest.approx(ref, abs=1e-6)


# ----------------------------------------------------------------------------- registry and options

def test_registry_lists_estimators_and_options_are_json():
    assert set(ALL) <= set(list_estimators())
    for name in ALL:
        est = get_estimator(name)
        assert est.name == name and isinstance(est, Estimator)
        assert isinstance(est.promises_dpi, bool)
        json.dumps(est.options)
        assert "preprocess" in est.options


def test_unknown_name_lists_valid_names():
    with pytest.raises(MiPrunError) as err:
        get_estimator("no-such-estimator")
    for name in ALL:
        assert name in str(err.value)


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(MiPrunError) as err:
        get_estimator("ksg", k_neighbours=3)
    msg = str(err.value)
    assert "k_neighbours" in msg and "k_neighbors" in msg and "max_samples" in msg


@pytest.mark.parametrize("name, options", [
    ("gaussian-channel", {"preprocess": "zscore"}),
    ("gaussian-channel", {"preprocess": 1}),
    ("gaussian-joint", {"k": 0}),
    ("gaussian-joint", {"k": True}),  # bools are refused where integers are expected
    ("gaussian-joint", {"k": 8.0}),
    ("gaussian-joint", {"shrinkage": 2.0}),
    ("gaussian-joint", {"shrinkage": float("nan")}),
    ("gaussian-joint", {"shrinkage": "0.1"}),
    ("renyi-kernel", {"bandwidth": "wide"}),
    ("renyi-kernel", {"bandwidth": -1.0}),
    ("renyi-kernel", {"bandwidth": float("inf")}),
    ("renyi-kernel", {"bandwidth": True}),
    ("renyi-kernel", {"alpha": -1.0}),
    ("renyi-kernel", {"alpha": 0}),
    ("renyi-kernel", {"alpha": float("nan")}),
    ("renyi-kernel", {"max_samples": 2}),
    ("renyi-kernel", {"method": "fast"}),
    ("renyi-kernel", {"seed": -1}),
    ("binning", {"bins": 1}),
    ("binning", {"bins": 1000}),
    ("binning", {"bins": False}),
    ("binning", {"bins": 2.5}),
    ("ksg", {"k_neighbors": 0}),
    ("ksg", {"k": 0}),
    ("ksg", {"k": "8"}),
    ("ksg", {"k_neighbors": 9, "max_samples": 10}),  # every point needs k_neighbors neighbours
])
def test_bad_option_values_are_refused(name, options):
    with pytest.raises(MiPrunError) as err:
        get_estimator(name, **options)
    msg = str(err.value)
    key = next(iter(options))
    assert key in msg and repr(options[key]) in msg and "Fix:" in msg, msg


def test_numpy_integers_and_floats_are_accepted_and_stored_as_python_numbers():
    est = get_estimator("ksg", k=np.int64(4), k_neighbors=np.int32(3), max_samples=np.int16(200))
    assert est.options["k"] == 4 and type(est.options["k"]) is int
    ren = get_estimator("renyi-kernel", alpha=np.float32(1.5), bandwidth=np.float64(2.0), max_samples=np.int64(50))
    assert type(ren.options["alpha"]) is float and ren.options["alpha"] == 1.5
    assert get_estimator("renyi-kernel", alpha=2).options["alpha"] == 2.0  # an int where a float is asked
    assert get_estimator("renyi-kernel", bandwidth="2.5").options["bandwidth"] == 2.5  # text from a form
    assert get_estimator("binning", bins=np.uint8(8)).options["bins"] == 8
    json.dumps(est.options), json.dumps(ren.options)


def test_options_are_checked_before_any_work():
    class Counting(Estimator):
        name = "counting-test-only"
        defaults: ClassVar[dict[str, Any]] = {"preprocess": "none", "n": 1}
        calls = 0

        def _validate(self):
            self._int_option("n", 1)

        def _prepare(self, x):
            Counting.calls += 1
            return x

        def _pair(self, px, py):
            return 0.0, None

    with pytest.raises(MiPrunError, match="n=0"):
        Counting(n=0)
    assert Counting.calls == 0


def test_large_pca_k_never_allocates_beyond_width_or_samples():
    # k = 10^12 would ask for terabytes if the PCA basis had k columns; it is capped at
    # min(k, d, m - 1), so the result equals the one with k = d.
    x, y = canonical_pairs(300, [0.8, 0.5], 5, seed=30)
    H = torch.stack([x, y, x + y])
    for name in ("ksg", "gaussian-joint"):
        huge = get_estimator(name, preprocess="none", k=10**12)
        exact = get_estimator(name, preprocess="none", k=5)
        assert huge.mi(x, y) == pytest.approx(exact.mi(x, y), abs=1e-5), name
        np.testing.assert_allclose(huge.span_matrix(H)[0], exact.span_matrix(H)[0], atol=1e-5)


def test_describe_estimators_lists_options_defaults_and_help():
    rows = describe_estimators()
    assert [r["name"] for r in rows] == list_estimators()
    for row in rows:
        cls = ESTIMATORS[row["name"]]
        assert row["description"] and row["description"] == cls.__doc__.strip().splitlines()[0]
        assert {k: v[0] for k, v in row["options"].items()} == cls.default_options()
        assert all(isinstance(h, str) and h for _, h in row["options"].values()), row
    json.dumps(rows)


# ----------------------------------------------------------------------------- default preprocessing

def test_each_estimator_declares_its_defaults_and_get_estimator_uses_them():
    for name in ALL:
        cls = ESTIMATORS[name]
        defaults = cls.default_options()
        assert defaults["preprocess"] in PREPROCESS
        assert get_estimator(name).options == defaults, name
        defaults["preprocess"] = "changed"  # a copy: changing it changes nothing
        assert cls.default_options()["preprocess"] != "changed"
        json.dumps(cls.default_options())
    assert get_estimator("gaussian-channel").options["preprocess"] == "none"


def test_gaussian_channel_standardize_center_none_are_equivalent():
    # Per-channel shift and scale do not change a correlation: on channels with very different
    # means and scales, none / center / standardize agree to float32 rounding; rms (per token) does not.
    g = torch.Generator().manual_seed(31)
    scale = 10.0 ** torch.linspace(-2, 3, 12)
    H = torch.stack([torch.randn(500, 12, generator=g) for _ in range(4)]).cumsum(0) * scale + 50.0 * scale
    x, y = H[0], H[2]
    ref = get_estimator("gaussian-channel")  # default: none
    span, norm = ref.span_matrix(H)
    for pre in ("center", "standardize"):
        est = get_estimator("gaussian-channel", preprocess=pre)
        s, n = est.span_matrix(H)
        np.testing.assert_allclose(s, span, rtol=1e-5, atol=1e-6, err_msg=pre)
        np.testing.assert_allclose(n, norm, rtol=1e-5, atol=1e-6, err_msg=pre)
        assert est.mi(x, y) == pytest.approx(ref.mi(x, y), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(est.block_mi(H), ref.block_mi(H), rtol=1e-5, atol=1e-6)
    rms = get_estimator("gaussian-channel", preprocess="rms").span_matrix(H)[0]
    assert np.nanmax(np.abs(rms - span)) > 1e-3


# ----------------------------------------------------------------------------- sample counts

@pytest.mark.parametrize("name", ALL)
def test_one_or_two_samples_are_refused(name):
    est = get_estimator(name)
    for m in (1, 2):
        H = torch.randn(3, m, 4)
        with pytest.raises(MiPrunError) as err:
            est.span_matrix(H)
        msg = str(err.value)
        assert f"got {m}" in msg and str(est.min_samples(4)) in msg and SAMPLES_FIX in msg, msg
        with pytest.raises(MiPrunError):
            est.mi(H[0], H[1])


@pytest.mark.parametrize("name", ALL)
def test_sample_thresholds_noisy_warns_normal_is_silent(name, caplog):
    est = get_estimator(name)
    d = 4
    low, noisy = est.min_samples(d), est.noisy_samples(d)
    assert 3 <= low < noisy
    with pytest.raises(MiPrunError):
        est.check_samples(low - 1, d)
    note = est.check_samples(low, d)
    assert note and str(low) in note and SAMPLES_FIX in note
    assert est.check_samples(noisy - 1, d) is not None
    assert est.check_samples(noisy, d) is None
    g = torch.Generator().manual_seed(32)
    with caplog.at_level(logging.WARNING, logger="mi_prun.estimators"):
        est.span_matrix(torch.randn(3, low, d, generator=g))
    assert any("noisy" in r.getMessage() for r in caplog.records), name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mi_prun.estimators"):
        est.span_matrix(torch.randn(3, noisy, d, generator=g))
    assert not any("noisy" in r.getMessage() for r in caplog.records), name


def test_gaussian_joint_minimum_grows_with_pca_rank():
    # m paired samples span m - 1 centred dimensions; two rank-r layers need 2 r of them, else
    # canonical correlations of 1 are forced.
    est = get_estimator("gaussian-joint", k=64)
    assert est.min_samples(4) == 10 and est.min_samples(1000) == 130
    x = torch.randn(9, 4)
    with pytest.raises(MiPrunError, match="at least 10"):
        est.mi(x, torch.randn(9, 4))
    assert get_estimator("binning", bins=8).min_samples(4) == 16
    assert get_estimator("ksg", k_neighbors=7).min_samples(4) == 9


def test_registry_refuses_duplicate_names():
    before = dict(ESTIMATORS)

    class Again(Estimator):
        name = "gaussian-channel"

        def _prepare(self, x):
            return x

        def _pair(self, px, py):
            return 0.0, None

    with pytest.raises(MiPrunError, match="already registered"):
        register(Again)
    assert ESTIMATORS == before


def test_mismatched_inputs_are_refused():
    est = get_estimator("gaussian-channel")
    with pytest.raises(MiPrunError):
        est.mi(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(MiPrunError):
        est.mi(torch.full((10, 3), float("nan")), torch.randn(10, 3))
    with pytest.raises(MiPrunError):
        est.span_matrix(torch.randn(10, 3))


def test_standardize_is_the_two_pass_formula_and_leaves_its_input_alone():
    """standardize works in place on its own buffer: the values are exactly (x - mean) / std in
    float64 (constant channels 0), and the caller's tensor is unchanged, float32 or float64."""
    from mi_prun.estimators.base import _CONST_REL, standardize

    g = torch.Generator().manual_seed(21)
    for x in (torch.randn(300, 64, generator=g), torch.randn(200, 16, generator=g).double(),
              torch.cat([torch.randn(40, 5, generator=g), torch.full((40, 3), 2.5)], 1)):
        before = x.clone()
        z, n_const = standardize(x)
        x64 = before.double()
        mean = x64.mean(0, keepdim=True)
        std = (x64 - mean).pow(2).mean(0, keepdim=True).sqrt()
        const = std <= _CONST_REL * mean.abs()
        ref = torch.where(const, torch.zeros_like(x64), (x64 - mean) / torch.where(const, 1.0, std))
        assert torch.equal(z, ref.to(torch.float32)) and n_const == int(const.sum())
        assert torch.equal(x, before)
