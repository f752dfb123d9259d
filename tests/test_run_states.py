"""Kept runs' states (`mi_prun.runtime.runner.RunStates`): a set that removes the same blocks as an
earlier run up to block b starts at b. The NLLs must be exactly those of a fresh run; only the work
falls, and the memory stays within its bound."""

from __future__ import annotations

import pytest
import torch

from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.pipeline import analyze
from mi_prun.runtime import BlockRunner, load_model
from mi_prun.runtime.runner import RunStates
from mi_prun.select import NLLCache, select


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", device="cpu")
    ids = torch.randint(5, loaded.model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    return loaded, ids


# an exchange's shape (tiny-llama has 6 blocks): a base set, the base plus one block each, a put-back,
# a swap, and one set again
SETS = [(1, 2), (1, 2, 5), (1, 2, 4), (1, 2, 3), (2,), (1, 3), (0, 1, 2), (1, 2, 5)]


def rows_of(runner: BlockRunner, keep: bool, batches=None):
    pre = runner.prefix(range(1, runner.n_blocks), keep_runs=keep)
    if keep:
        pre.runs = RunStates(1 << 30)  # room for every run (the bound is the next test's)
    runner.work = 0
    out = [runner.rows_without(s, pre, batches) for s in SETS]
    return out, pre.runs, runner.work


@pytest.mark.parametrize("batches", [None, [1], [2, 0]])
def test_kept_states_give_the_fresh_runs_numbers_bit_for_bit_for_less_work(tiny, batches):
    loaded, ids = tiny
    runner = BlockRunner(loaded.model, ids, batch_size=2)
    fresh, none_kept, cold_work = rows_of(runner, keep=False, batches=batches)
    kept, runs, work = rows_of(runner, keep=True, batches=batches)
    assert len(none_kept) == 0 and none_kept.hits == 0
    for (s1, c1), (s2, c2) in zip(fresh, kept):
        assert torch.equal(s1, s2) and torch.equal(c1, c2)
    n_batches = 3 if batches is None else len(batches)
    assert runner.n_blocks == 6
    # (1, 2, 5) starts at block 5 (blocks 3, 4 saved) and (1, 2, 4) at 4 (block 3 saved) from (1, 2)'s run,
    # and (1, 2, 5) again at 5; the others share no kept state (a run keeps the inputs of the blocks it ran)
    assert runs.hits == 3 * n_batches
    assert runs.blocks_saved == (2 + 1 + 2) * n_batches
    assert work < cold_work


def test_the_kept_states_stay_within_their_bound_and_the_newest_are_kept(tiny):
    loaded, ids = tiny
    runner = BlockRunner(loaded.model, ids, batch_size=2)
    pre = runner.prefix(range(1, runner.n_blocks))
    one = pre.states[1][0]
    size = one.numel() * one.element_size()
    assert pre.runs.max_bytes == sum(h.numel() * h.element_size() for hs in pre.states.values() for h in hs)
    pre.runs = RunStates(3 * size)  # three states of one batch
    for s in SETS:
        runner.rows_without(s, pre)
        assert pre.runs.bytes <= 3 * size and len(pre.runs) <= 3
    # the last run's ((1, 2, 5), from block 1: pushed out before it came) deepest states are the ones kept
    assert pre.runs.find((1, 2, 5), 1, runner.n_blocks, 2) is not None
    assert pre.runs.find((0, 1, 2), 0, runner.n_blocks, 0) is None  # the run before it: pushed out
    assert RunStates(0).max_bytes == 0


def test_the_raced_search_is_unchanged_by_the_kept_states_and_runs_less(tiny, monkeypatch):
    loaded, _ = tiny
    analysis = analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))
    cfg = SelectConfig(verify_samples=12, verify_seq_len=32, verify_race="sets", n=3)
    with_runs = select(analysis, config=cfg, model=loaded, cache=NLLCache())

    real = BlockRunner.prefix
    monkeypatch.setattr(BlockRunner, "prefix", lambda self, starts, keep_runs=True, dense=True: real(self, starts, False, dense))
    without = select(analysis, config=cfg, model=loaded, cache=NLLCache())
    assert with_runs.removed == without.removed and with_runs.nll == without.nll
    assert [(c.removed, c.nll, c.complete, c.samples, c.units) for c in with_runs.candidates] == \
        [(c.removed, c.nll, c.complete, c.samples, c.units) for c in without.candidates]
    r1, r2 = with_runs.verification["race"], without.verification["race"]
    assert r1["units"] == r2["units"]  # the charge is the cold cache's either way
    assert r2["new_units"] == r2["units"] and r1["new_units"] < r1["units"]  # the work is not


def test_a_lazy_prefix_runs_the_dense_blocks_only_as_deep_as_the_sets_need_and_changes_no_number(tiny):
    # the confirmation's draw B: a few finalists, no dense NLL wanted
    loaded, ids = tiny
    runner = BlockRunner(loaded.model, ids, batch_size=2)
    full = runner.prefix(range(1, runner.n_blocks), keep_runs=False)
    lazy = runner.prefix(range(1, runner.n_blocks), keep_runs=False, dense=False)
    assert lazy.dense_rows is None and lazy.states == {} and lazy.reached[0] == 0
    calls = []
    real = runner._call
    runner._call = lambda b, *a, **k: (calls.append(b), real(b, *a, **k))[1]
    # (set, the dense blocks it makes the prefix run over all 3 batches, the deepest dense state after)
    for s, dense, deepest in [((2, 3), [0, 1], 2), ((1, 4), [], 2), ((3, 5), [2], 3), ((0, 2), [], 3)]:
        calls.clear()
        got = runner.rows_without(s, lazy, [1, 0])
        own = [b for b in range(min(s), runner.n_blocks) if b not in s]
        assert calls == [b for b in dense for _ in range(3)] + [b for b in own for _ in range(2)]
        want = runner.rows_without(s, full, [1, 0])
        h0 = runner.rows_without(s, None, [1, 0])
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(got, want, h0))
        assert lazy.reached[0] == deepest and set(lazy.states) == set(range(1, deepest + 1))
    assert runner.units((3, 5), lazy) == runner.units((3, 5), full)  # charged from the first removed block
