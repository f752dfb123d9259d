"""Tests of block selection: exact DP against enumeration, FBS invariants, baselines, SLEB, errors."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functools
import types

import mi_prun.select as select_module
from mi_prun.errors import MiPrunError
from mi_prun.models import find_blocks
from mi_prun.results import Analysis

RUN_COST_NAMES = ("neg-mi", "info-loss", "neg-log-nmi")

# These tests check the selectors' mechanics on hand-made span matrices (many without normalised
# MI) with every block removable, so they call the library with the raw settings below unless a
# test says otherwise; the shipped defaults (SelectConfig) are tested in tests/test_defaults.py.
RAW = {"run_cost": "neg-mi", "protect_ends": False}
S = types.SimpleNamespace(**{name: getattr(select_module, name) for name in select_module.__all__})
S.select = functools.partial(select_module.select, **RAW)
S.compare = functools.partial(select_module.compare, **RAW)
S.sleb_select = functools.partial(select_module.sleb_select, **RAW)


def make_analysis(span: np.ndarray, span_norm: np.ndarray | None = None,
                  baselines: dict | None = None) -> Analysis:
    L = span.shape[0] - 1
    block_mi = np.array([span[b, b + 1] for b in range(L)])
    return Analysis(model={}, calibration={}, estimator="x", estimator_options={},
                    block_mi=block_mi, span=span, span_norm=span_norm, baselines=baselines or {})


def random_analysis(rng: np.random.Generator, L: int) -> Analysis:
    """Random symmetric span matrices (no DPI): the objective is still additive over runs."""
    A = rng.uniform(0.0, 5.0, (L + 1, L + 1))
    span = (A + A.T) / 2
    np.fill_diagonal(span, np.nan)
    B = rng.uniform(0.01, 1.0, (L + 1, L + 1))
    norm = (B + B.T) / 2
    np.fill_diagonal(norm, 1.0)
    return make_analysis(span, norm)


def chain_analysis(rng: np.random.Generator, L: int) -> Analysis:
    """A Gaussian Markov chain h_{b+1} = rho_b h_b + noise: DPI holds, MI = -1/2 log(1 - rho^2)."""
    rho = rng.uniform(0.3, 0.99, L)
    span = np.full((L + 1, L + 1), np.nan)
    norm = np.ones((L + 1, L + 1))
    for i in range(L + 1):
        for j in range(i + 1, L + 1):
            r = float(np.prod(rho[i:j]))
            span[i, j] = span[j, i] = -0.5 * math.log(1 - r * r)
            norm[i, j] = norm[j, i] = r * r
    angular = np.arccos(np.clip(norm, 0, 1)) / np.pi
    return make_analysis(span, norm, {"cosine_bi": 1 - rho, "angular": angular})


def without_timing(obj):
    """A selection dict with wall-clock fields removed, for determinism checks."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in ("elapsed", "seconds")}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# runs and costs


def test_runs_of_merges_adjacent_blocks():
    assert S.runs_of([]) == []
    assert S.runs_of([3]) == [(3, 4)]
    assert S.runs_of([5, 1, 2, 7, 6]) == [(1, 3), (5, 8)]
    assert S.runs_of([0, 1, 2, 3]) == [(0, 4)]
    assert S.runs_of([0, 2, 4]) == [(0, 1), (2, 3), (4, 5)]


def test_set_cost_judges_adjacent_runs_as_one():
    C = np.full((5, 5), np.inf)
    for i in range(5):
        for j in range(i + 1, 5):
            C[i, j] = 10.0 * i + j
    assert S.set_cost([1, 2], C) == C[1, 3]  # one run, not C[1,2] + C[2,3]
    assert S.set_cost([0, 2, 3], C) == C[0, 1] + C[2, 4]
    assert S.set_cost([], C) == 0.0


def test_exact_never_splits_a_run_into_touching_runs():
    # Single blocks are cheap, but blocks 1 and 2 together form ONE run judged by C[1, 3]: the
    # optimum must not take {1, 2} at the price of two singles.
    L = 4
    span = np.full((L + 1, L + 1), 1.0)
    np.fill_diagonal(span, np.nan)
    span[1, 2] = span[2, 1] = span[2, 3] = span[3, 2] = 10.0  # singles 1 and 2: very redundant
    span[1, 3] = span[3, 1] = 0.0  # ...but removing both loses everything
    a = make_analysis(span)
    exact = S.select(a, "exact", n=2)
    brute = min(itertools.combinations(range(L), 2),
                key=lambda s: S.set_cost(s, S.cost_matrix(span, None, "neg-mi")))
    assert exact.removed != (1, 2)
    assert exact.objective == pytest.approx(S.set_cost(brute, S.cost_matrix(span, None, "neg-mi")))


def test_cost_matrix_run_costs():
    rng = np.random.default_rng(0)
    a = random_analysis(rng, 5)
    C = S.cost_matrix(a.span, a.span_norm, "neg-mi")
    scale = np.nanmax(a.span)
    assert C[1, 3] == pytest.approx(-a.span[1, 3] / scale)
    assert np.isinf(C[3, 1]) and np.isinf(C[2, 2])
    assert S.cost_matrix(a.span, a.span_norm, "info-loss")[0, 4] == pytest.approx(1 - a.span_norm[0, 4])
    assert S.cost_matrix(a.span, a.span_norm, "neg-log-nmi")[0, 4] == pytest.approx(
        -math.log(a.span_norm[0, 4]))
    # scalar calls give the same as the vectorised matrix
    assert S.RUN_COSTS["neg-mi"].fn(a.span, a.span_norm, 1, 3) == pytest.approx(C[1, 3])


def test_non_finite_span_entry_is_never_chosen():
    rng = np.random.default_rng(1)
    a = random_analysis(rng, 6)
    a.span[2, 3] = a.span[3, 2] = np.nan  # block_mi keeps its finite value: topk still picks 2
    for method in ("exact", "exhaustive", "fbs", "local"):
        s = S.select(a, method, n=2)
        assert (2, 3) not in s.runs and math.isfinite(s.objective)


# ---------------------------------------------------------------------------------------------
# exact = exhaustive


@settings(max_examples=150, deadline=None, derandomize=True)
@given(L=st.integers(3, 9), data=st.data())
def test_exact_equals_exhaustive(L, data):
    protect = data.draw(st.booleans(), label="protect_ends")
    if protect and L < 3:
        return
    n = data.draw(st.integers(1, L - 2 if protect else L - 1), label="n")
    run_cost = data.draw(st.sampled_from(RUN_COST_NAMES), label="run_cost")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    a = random_analysis(np.random.default_rng(seed), L)
    exact = S.select(a, "exact", n=n, run_cost=run_cost, protect_ends=protect)
    brute = S.select(a, "exhaustive", n=n, run_cost=run_cost, protect_ends=protect)
    C = S.cost_matrix(a.span, a.span_norm, run_cost)
    for s in (exact, brute):
        assert len(s.removed) == n == len(set(s.removed))
        assert set(s.removed) | set(s.kept) == set(range(L))
        assert s.objective == pytest.approx(S.set_cost(s.removed, C), abs=1e-12)
        if protect:
            assert 0 not in s.removed and L - 1 not in s.removed
    assert exact.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-9)
    # no heuristic beats the optimum
    for method in ("fbs", "local", "topk"):
        other = S.select(a, method, n=n, run_cost=run_cost, protect_ends=protect)
        assert other.objective >= exact.objective - 1e-9


# ---------------------------------------------------------------------------------------------
# FBS and local search


@pytest.mark.parametrize("run_cost", RUN_COST_NAMES)
@pytest.mark.parametrize("seed", range(6))
def test_fbs_monotone_never_worse_deterministic(seed, run_cost):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(8, 20))
    n = int(rng.integers(2, L // 2 + 1))
    a = chain_analysis(rng, L) if seed % 2 else random_analysis(rng, L)
    topk = S.select(a, "topk", n=n, run_cost=run_cost)
    fbs = S.select(a, "fbs", n=n, run_cost=run_cost)
    assert fbs.objective <= topk.objective + 1e-12
    traj = fbs.trajectory
    assert traj[0]["P"] == list(topk.removed)
    assert traj[0]["objective"] == pytest.approx(topk.objective)
    objs = [t["objective"] for t in traj]
    assert all(b <= a_ + 1e-12 for a_, b in zip(objs, objs[1:]))
    assert all(len(t["P"]) == n for t in traj)
    assert traj[-1]["P"] == list(fbs.removed)
    assert fbs.objective == pytest.approx(objs[-1])
    assert len(traj) <= 1 + 20
    for t in traj[1:]:
        assert not set(t["P"]) & set(t["A"])
        for c in t["candidates"]:
            assert {"start", "end", "coarse", "span_mi", "cost"} <= set(c)
    again = S.select(a, "fbs", n=n, run_cost=run_cost)
    assert without_timing(again.to_dict()) == without_timing(fbs.to_dict())
    json.dumps(fbs.to_dict(), allow_nan=False)
    local = S.select(a, "local", n=n, run_cost=run_cost)
    assert local.objective <= topk.objective + 1e-12
    assert [t["objective"] for t in local.trajectory] == sorted(
        (t["objective"] for t in local.trajectory), reverse=True)


def hand_analysis() -> Analysis:
    """L = 6 blocks, priced with run_cost="info-loss" (C[i, j] = 1 - NMI[i, j]).

    Block MI (which orders the pools and the coarse scores -MI_b): 1.0, 3.0, 2.0, 1.5, 2.5, 0.5,
    so the redundancy ranking is 1, 4, 2, 3, 0, 5. Run costs that matter:
    single blocks 0..5: 0.40, 0.10, 0.30, 0.35, 0.15, 0.50;
    pairs: C[1, 3] = 0.20 (blocks 1-2), C[2, 4] = 0.12 (blocks 2-3); every other run 0.50.
    For n = 2: top-k removes {1, 4} at 0.10 + 0.15 = 0.25; the optimum is {2, 3} at 0.12.
    """
    L = 6
    mi = [1.0, 3.0, 2.0, 1.5, 2.5, 0.5]
    span = np.full((L + 1, L + 1), np.nan)
    for i in range(L + 1):
        for j in range(i + 1, L + 1):  # DPI-consistent MI: a span never exceeds its weakest block
            span[i, j] = span[j, i] = min(mi[i:j]) * 0.9 ** (j - i - 1)
    nmi = np.full((L + 1, L + 1), 0.5)
    np.fill_diagonal(nmi, 1.0)
    for (i, j), value in {(0, 1): 0.60, (1, 2): 0.90, (2, 3): 0.70, (3, 4): 0.65, (4, 5): 0.85,
                          (5, 6): 0.50, (1, 3): 0.80, (2, 4): 0.88}.items():
        nmi[i, j] = nmi[j, i] = value
    a = make_analysis(span, nmi)
    assert list(a.block_mi) == mi
    return a


def test_fbs_follows_the_procedure_by_hand():
    # k = 1, pool = n = 2. Iteration 0: P = top-2 = {1, 4}, A = next 2 of the ranking = {2, 3}.
    # Iteration 1: windows inside P u A = {1, 2, 3, 4}; best coarse single: block 1 (-3.0), best
    # coarse pair: 1-2 (-5.0, ahead of 3-4 at -4.0 and 2-3 at -3.5); P's runs (4, 5) added.
    # Combinations of exactly 2 blocks: {(1,2), (4,5)} = 0.25 or {(1,3)} = 0.20 -> P = {1, 2},
    # A = {4, 3}. Iteration 2 measures the same windows, P's run (1, 3) is the best: no change, stop.
    # Window 2-3 (the optimum) is never measured with k = 1: FBS is a heuristic, not the optimum.
    a = hand_analysis()
    s = S.select(a, "fbs", n=2, run_cost="info-loss", k=1)
    t = s.trajectory
    assert [x["iteration"] for x in t] == [0, 1, 2]
    assert [x["P"] for x in t] == [[1, 4], [1, 2], [1, 2]]
    assert [x["A"] for x in t] == [[2, 3], [3, 4], [3, 4]]
    assert [x["changed"] for x in t] == [True, True, False]
    assert [x["objective"] for x in t] == pytest.approx([0.25, 0.20, 0.20])

    def cands(x):
        return [(c["start"], c["end"], c["coarse"], c["source"], c["chosen"]) for c in x["candidates"]]

    assert cands(t[0]) == [(1, 2, -3.0, "P", True), (4, 5, -2.5, "P", True)]
    assert cands(t[1]) == [(1, 2, -3.0, "window", False), (1, 3, -5.0, "window", True),
                           (4, 5, -2.5, "P", False)]
    assert cands(t[2]) == [(1, 2, -3.0, "window", False), (1, 3, -5.0, "window", True)]
    assert [c["cost"] for c in t[1]["candidates"]] == pytest.approx([0.10, 0.20, 0.15])
    assert [c["span_mi"] for c in t[1]["candidates"]] == pytest.approx([3.0, 1.8, 2.5])
    assert s.removed == (1, 2) and s.objective == pytest.approx(0.20)
    assert s.span_lookups == 3  # (1,2), (4,5), (1,3): all that was read
    exact = S.select(a, "exact", n=2, run_cost="info-loss")
    assert exact.removed == (2, 3) and exact.objective == pytest.approx(0.12)


def test_fbs_improves_on_topk_with_a_contiguous_run():
    # Top-k removes the two highest-MI blocks 1 and 4: two runs, 0.25. With the default k every
    # window inside P u A is measured, and FBS moves to the single run 2-3 (0.12), the optimum.
    a = hand_analysis()
    topk = S.select(a, "topk", n=2, run_cost="info-loss")
    fbs = S.select(a, "fbs", n=2, run_cost="info-loss")
    assert topk.removed == (1, 4) and topk.runs == [(1, 2), (4, 5)]
    assert topk.objective == pytest.approx(0.25)
    assert fbs.removed == (2, 3) and fbs.runs == [(2, 4)] and fbs.objective == pytest.approx(0.12)
    assert [x["P"] for x in fbs.trajectory] == [[1, 4], [2, 3], [2, 3]]
    assert fbs.objective == pytest.approx(S.select(a, "exact", n=2, run_cost="info-loss").objective)
    measured = {(c["start"], c["end"]) for c in fbs.trajectory[1]["candidates"]}
    assert measured == {(1, 2), (2, 3), (3, 4), (4, 5), (1, 3), (2, 4), (3, 5)}


def test_fbs_options_and_iteration_cap():
    a = chain_analysis(np.random.default_rng(3), 16)
    s = S.select(a, "fbs", n=5, k=2, pool=3, max_iter=1)
    assert len(s.trajectory) <= 2
    assert s.options["k"] == 2 and s.options["pool"] == 3 and s.options["max_iter"] == 1
    assert s.span_lookups > 0
    zero = S.select(a, "fbs", n=5, max_iter=0)
    assert zero.removed == S.select(a, "topk", n=5).removed


# ---------------------------------------------------------------------------------------------
# baselines and constraints


def test_baselines_and_topk():
    a = chain_analysis(np.random.default_rng(4), 10)
    topk = S.select(a, "topk", n=3)
    assert list(topk.removed) == sorted(a.ranking()[:3])
    bi = a.baselines["cosine_bi"]
    assert list(S.select(a, "shortgpt", n=3).removed) == sorted(np.argsort(bi, kind="stable")[:3].tolist())
    ang = S.select(a, "angular", n=3)
    starts = range(10 - 3 + 1)
    best = min(starts, key=lambda i: (a.baselines["angular"][i, i + 3], i))
    assert ang.removed == (best, best + 1, best + 2) and len(ang.runs) == 1
    r1 = S.select(a, "random", n=4, seed=7)
    assert r1.removed == S.select(a, "random", n=4, seed=7).removed
    assert math.isfinite(r1.objective)  # every method reports the MI objective
    for s in (topk, ang, r1):
        assert s.forward_passes == 0


def test_topk_ties_go_to_lowest_index():
    span = np.full((6, 6), 1.0)
    np.fill_diagonal(span, np.nan)
    assert S.select(make_analysis(span), "topk", n=2).removed == (0, 1)


@pytest.mark.parametrize("method", ["topk", "fbs", "local", "exact", "exhaustive", "shortgpt",
                                    "angular", "random"])
def test_protect_ends_respected(method):
    a = chain_analysis(np.random.default_rng(5), 8)
    s = S.select(a, method, n=6, protect_ends=True)
    assert s.removed == tuple(range(1, 7))
    s = S.select(a, method, n=3, protect_ends=True)
    assert 0 not in s.removed and 7 not in s.removed and len(s.removed) == 3


def test_selection_roundtrip():
    a = chain_analysis(np.random.default_rng(6), 9)
    s = S.select(a, "fbs", ratio=0.3)
    assert s.n == 3 and s.ratio == 0.3
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = S.Selection.from_dict(json.loads(text))
    assert back == s
    assert back.to_dict() == d
    with pytest.raises(MiPrunError):
        S.Selection.from_dict({"method": "x"})


def test_compare_reports_gaps_and_refusals():
    a = chain_analysis(np.random.default_rng(7), 12)
    rows = S.compare(a, n=4, methods=("fbs", "local", "exact", "exhaustive", "topk"))
    by = {r["method"]: r for r in rows}
    assert by["exact"]["gap"] == 0 and by["exhaustive"]["gap"] == pytest.approx(0, abs=1e-12)
    assert all(r["feasible"] and r["gap"] >= -1e-12 for r in rows)
    rows = S.compare(a, n=4, methods=("exact", "exhaustive"),
                     options={"exhaustive": {"max_combinations": 10}})
    refused = [r for r in rows if r["method"] == "exhaustive"][0]
    assert not refused["feasible"] and "495" in refused["reason"]


# ---------------------------------------------------------------------------------------------
# bad input


def test_resolve_n():
    assert S.resolve_n(6, n=2) == 2
    assert S.resolve_n(6, ratio=0.25) == 2  # 1.5 rounds up
    assert S.resolve_n(30, ratio=0.1) == 3
    assert S.resolve_n(6, n=4, protect_ends=True) == 4
    for kwargs, fragment in [({}, "exactly one"), ({"n": 1, "ratio": 0.5}, "exactly one"),
                             ({"n": 0}, "at least 1"), ({"n": -2}, "at least 1"),
                             ({"n": 6}, "all 6 blocks"), ({"n": 9}, "all 6 blocks"),
                             ({"ratio": 0.0}, "between 0 and 1"), ({"ratio": 1.0}, "between 0 and 1"),
                             ({"ratio": 1.5}, "between 0 and 1"), ({"ratio": -0.1}, "between 0 and 1"),
                             ({"ratio": 0.01}, "rounds to 0"), ({"n": 2.5}, "whole number"),
                             ({"n": 5, "protect_ends": True}, "removable")]:
        with pytest.raises(MiPrunError, match=fragment):
            S.resolve_n(6, **kwargs)


def test_bad_input_messages():
    a = random_analysis(np.random.default_rng(8), 6)
    for kwargs in ({"n": 0}, {"n": 6}, {"ratio": 1.2}):
        with pytest.raises(MiPrunError):
            S.select(a, "exact", **kwargs)
    with pytest.raises(MiPrunError) as err:
        S.select(a, "nope", n=2)
    assert "exact" in str(err.value) and "fbs" in str(err.value)
    with pytest.raises(MiPrunError, match="does not take"):
        S.select(a, "fbs", n=2, bogus=1)
    with pytest.raises(MiPrunError, match="unknown run cost"):
        S.select(a, "exact", n=2, run_cost="nope")
    with pytest.raises(MiPrunError, match=r"forward passes of the model.*Fix: pass the model"):
        S.select(a, "sleb", n=2)
    no_norm = make_analysis(a.span)
    with pytest.raises(MiPrunError, match="neg-mi"):
        S.select(no_norm, "exact", n=2, run_cost="info-loss")
    with pytest.raises(MiPrunError, match="cosine_bi"):
        S.select(no_norm, "shortgpt", n=2)
    big = random_analysis(np.random.default_rng(9), 40)
    with pytest.raises(MiPrunError) as err:
        S.select(big, "exhaustive", n=20)
    assert f"{math.comb(40, 20):,}" in str(err.value) and "2,000,000" in str(err.value)
    assert len(S.select(big, "exact", n=20).removed) == 20  # the DP handles it


def test_registries_refuse_duplicates():
    with pytest.raises(MiPrunError, match="already registered"):
        S.register_selector("exact")(lambda p: None)
    with pytest.raises(MiPrunError, match="already registered"):
        S.register_run_cost("neg-mi", S.RUN_COSTS["neg-mi"].fn)


def test_registered_run_cost_is_usable_and_described(monkeypatch):
    from mi_prun.select import costs

    # a fresh registry in the module that owns it, so the test leaves the real one untouched
    monkeypatch.setattr(costs, "RUN_COSTS", dict(costs.RUN_COSTS))
    costs.register_run_cost("sqrt-length", lambda span, norm, i, j: np.sqrt(j - i), "sqrt of run length")
    assert costs.run_cost_descriptions()["sqrt-length"] == "sqrt of run length"
    a = chain_analysis(np.random.default_rng(10), 7)
    s = S.select(a, "exact", n=3, run_cost="sqrt-length")
    # concave in the length: one run of 3 (sqrt 3) beats 1 + sqrt 2 and 3 singles
    assert s.objective == pytest.approx(math.sqrt(3)) and len(s.runs) == 1


# ---------------------------------------------------------------------------------------------
# SLEB


def test_sleb_search_synthetic():
    # NLL = sum of per-block penalties (+ interaction) : greedy picks the cheapest first.
    pen = {0: 5.0, 1: 0.3, 2: 0.1, 3: 0.1, 4: 2.0, 5: 9.0}
    calls = []

    def nll(removed):
        calls.append(removed)
        return 1.0 + sum(pen[b] for b in removed) + (3.0 if {2, 3} <= set(removed) else 0.0)

    seen = []
    removed, traj, passes = S.sleb_search(6, 2, nll, progress=lambda stage, f, msg: seen.append((stage, f)))
    assert traj[0]["removed_block"] == 2  # tie 2/3 -> lowest index
    assert removed == (1, 2)  # 3 would add the interaction
    # progress: 0.0 at the start (for the shells' time-left estimate), then after every pass
    assert passes == len(calls) == 6 + 5 and seen[0] == ("sleb", 0.0) and seen[-1] == ("sleb", 1.0) \
        and len(seen) == 12
    removed, traj, passes = S.sleb_search(6, 2, nll, protect_ends=True)
    assert passes == 4 + 3 and 0 not in removed and 5 not in removed


def _nll_by_deletion(model, ids, drop: int) -> float:
    """Independent reference: a deep copy with the block deleted, HF's own loss."""
    pruned = copy.deepcopy(model)
    blocks = find_blocks(pruned)
    del blocks.blocks[drop]
    pruned.config.num_hidden_layers -= 1
    with torch.no_grad():
        return float(pruned(input_ids=ids, labels=ids, use_cache=False).loss)


def test_sleb_select_tiny_llama():
    from mi_prun.testing import tiny_model

    model, _ = tiny_model("llama", n_layers=5, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 16), generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    container = find_blocks(model).blocks

    sel = S.sleb_select(model, ids, 2, batch_size=2)

    brute = [_nll_by_deletion(model, ids, b) for b in range(5)]
    first = sel.trajectory[0]
    assert first["removed_block"] == int(np.argmin(brute))
    assert [c["nll"] for c in first["candidates"]] == pytest.approx(brute, rel=1e-4)
    assert sel.forward_passes == 5 + 4
    assert sel.method == "sleb" and len(sel.removed) == 2 and math.isnan(sel.objective)
    # the model is unchanged
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before
    assert find_blocks(model).blocks is container and len(container) == 5
    json.dumps(sel.to_dict(), allow_nan=False)
