"""Confirmation of the verified search's finalists on a fresh draw of tokens
(`SelectConfig.verify_confirm`, `mi_prun.select.confirm`)."""

from __future__ import annotations

import math

import pytest

from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.errors import NotEnoughText
from mi_prun.runtime import load_model
from mi_prun.pipeline import analyze
from mi_prun.select import select
from mi_prun.select.confirm import FreshDrawError, confirm, fresh_tokens, paired_gap, within_noise
from mi_prun.select.scorer import NLLCache, resolve_tokens
from mi_prun.select.selection import ScoredSet


def row(removed, nll, who="x"):
    return ScoredSet(tuple(removed), (who,), math.nan, nll, False, "candidate")


def test_confirm_takes_the_lowest_mean_over_both_draws():
    scored = [row((1, 2), 3.00), row((1,), 2.0), row((2, 3), 3.01), row((3, 4), 3.02), row((4, 5), float("nan")),
              row((1, 5), 3.50)]
    b = {(1, 2): 3.10, (2, 3): 2.98, (3, 4): 2.90, (1, 5): 1.0}
    calls = []

    def score_b(removed):
        calls.append(removed)
        return b[removed], False

    best, rec = confirm(2, scored, score_b, k=3)
    # finalists: the 3 best sets of size 2 on A (the smaller set and the NaN one never), in A's order
    assert calls == [(1, 2), (2, 3), (3, 4)] and rec["passes"] == 3
    assert best.removed == (3, 4) and rec["changed"]  # (3.02 + 2.90) / 2 is the lowest
    assert [f["nll_ab"] for f in rec["finalists"]] == pytest.approx([3.05, 2.995, 2.96])
    # a fresh draw that agrees keeps the search's answer; ties go to the set better on A
    best, rec = confirm(2, scored, lambda r: ({(1, 2): 3.0, (2, 3): 2.99}[r], True), k=2)
    assert best.removed == (1, 2) and not rec["changed"] and rec["passes"] == 0


def test_only_runners_up_within_noise_are_rescored():
    scored = [row((1, 2), 3.00), row((2, 3), 3.01), row((3, 4), 3.50)]
    # per-sample NLLs on A: (2, 3) trails (1, 2) by 0.01 +- 0.02 (noise), (3, 4) by 0.5 +- 0.005 (clear)
    a = {(1, 2): [3.0, 2.9, 3.1, 3.0], (2, 3): [3.05, 2.88, 3.13, 2.98], (3, 4): [3.5, 3.4, 3.6, 3.5]}
    a[(3, 4)] = [x + 0.5 + e for x, e in zip(a[(1, 2)], (0.004, -0.004, 0.003, -0.003))]
    calls = []

    def score_b(removed):
        calls.append(removed)
        return {(1, 2): 3.2, (2, 3): 3.1, (3, 4): 0.0}[removed], False

    best, rec = confirm(2, scored, score_b, k=3, samples_a=lambda r: a[r], z=2.0)
    assert calls == [(1, 2), (2, 3)] and rec["passes"] == 2 and rec["rescored"] == 2
    assert best.removed == (2, 3) and rec["changed"]  # (3.01 + 3.1) / 2 < (3.0 + 3.2) / 2
    clear = next(f for f in rec["finalists"] if f["removed"] == [3, 4])
    assert not clear["within_noise"] and clear["nll_b"] is None and clear["gap_a"] / clear["se_a"] > 2
    # every runner-up clear: draw B is never scored, draw A decides
    calls.clear()
    best, rec = confirm(2, [scored[0], scored[2]], score_b, k=3, samples_a=lambda r: a[r])
    assert calls == [] and rec["passes"] == 0 and best.removed == (1, 2) and not rec["changed"]
    assert "decided by draw A" in rec["rule"]


def test_paired_gap_uses_the_per_sample_differences():
    gap, se = paired_gap([1.0, 2.0, 3.0], [1.1, 2.1, 3.4])
    assert gap == pytest.approx(0.2) and se == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 * 2 + 0.2 ** 2) / 2 / 3))
    assert paired_gap([1.0], [2.0]) is None and paired_gap(None, [1.0, 2.0]) is None
    assert within_noise(None, 2.0) and within_noise((0.01, 0.01), 2.0) and not within_noise((0.03, 0.01), 2.0)
    assert not within_noise((0.1, 0.0), 2.0) and within_noise((0.0, 0.0), 2.0)


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


def test_verified_select_confirms_on_disjoint_tokens(tiny):
    loaded, analysis = tiny
    cfg = SelectConfig(n=2, verify_seq_len=48, verify_samples=4, verify_confirm=0)
    plain = select(analysis, cfg, model=loaded)
    assert "confirm" not in plain.verification
    assert SelectConfig().verify_confirm == 3  # on by default
    sel = select(analysis, cfg.replace(verify_confirm=2, n=2), model=loaded)
    rec = sel.verification["confirm"]
    assert len(rec["finalists"]) == 2 and sel.forward_passes == plain.forward_passes + rec["passes"]
    assert list(sel.removed) == rec["winner"]
    runner = rec["finalists"][1]
    assert runner["se_a"] is not None and runner["se_a"] > 0  # the scorer kept per-sample NLLs
    if runner["within_noise"]:
        assert rec["passes"] == 2 and min(f["nll_ab"] for f in rec["finalists"]) == next(
            f["nll_ab"] for f in rec["finalists"] if f["removed"] == list(sel.removed))
    else:
        assert rec["passes"] == 0 and list(sel.removed) == list(plain.removed)
    # the per-sample NLLs behind the paired gaps average to the set's NLL (equal-length samples)
    cache = NLLCache()
    again = select(analysis, cfg.replace(verify_confirm=2), model=loaded, cache=cache)
    per = cache.sample_nll(plain.removed)
    assert per is not None and len(per) == 4 and sum(per) / 4 == pytest.approx(plain.nll)
    assert again.removed == sel.removed  # a warm cache (A and B) gives the same answer
    a, _, _ = resolve_tokens(None, loaded.tokenizer, analysis, cfg)
    b = fresh_tokens(cfg, analysis, loaded.tokenizer, a)
    assert b.shape == a.shape and not {tuple(r.tolist()) for r in a} & {tuple(r.tolist()) for r in b}
    assert all(math.isfinite(f["nll_b"]) for f in rec["finalists"])


def test_cli_select_verify_confirm(tmp_path):
    import json

    from cli_helpers import run_cli

    rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--samples", "8", "--tokens", "48", "--out",
                         str(tmp_path / "a"))
    assert rc == 0, err
    rc, _, err = run_cli("select", str(tmp_path / "a"), "--n", "2", "--model", "tiny-llama", "--verify-samples", "4",
                         "--verify-tokens", "48", "--verify-confirm", "2", "--out", str(tmp_path / "s.json"))
    assert rc == 0, err
    rec = json.loads((tmp_path / "s.json").read_text())["verification"]["confirm"]
    assert len(rec["finalists"]) == 2 and rec["winner"] == json.loads((tmp_path / "s.json").read_text())["removed"]


def test_too_little_text_for_a_fresh_draw_leaves_the_answer_unconfirmed(tiny, tmp_path, monkeypatch):
    loaded, _ = tiny
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(600)))
    analysis = analyze(loaded, AnalysisConfig(calib=str(text), n_samples=4, seq_len=32))
    room = 1  # the most verification samples the text holds beside the capture's
    while True:
        try:
            resolve_tokens(None, loaded.tokenizer, analysis, SelectConfig(verify_samples=room + 1, verify_seq_len=32))
        except NotEnoughText:
            break
        room += 1
    # unraced: every set is scored in full, so runner-ups within noise exist (a set the race drops is
    # never a finalist, and with so few samples the race may leave the winner alone)
    cfg = SelectConfig(n=2, verify_samples=room, verify_seq_len=32, verify_race="off")
    with pytest.raises(FreshDrawError, match="Fix: more text"):
        fresh_tokens(cfg, analysis, loaded.tokenizer, resolve_tokens(None, loaded.tokenizer, analysis, cfg)[0])
    # every runner-up within noise (z = inf), so the search reaches for draw B and cannot have it
    monkeypatch.setattr(SelectConfig, "CONFIRM_Z", math.inf)
    sel = select(analysis, cfg, model=loaded)
    assert sel.verification["confirm"]["note"].startswith("not confirmed: the verification text holds")
    assert sel.removed == select(analysis, cfg.replace(verify_confirm=0), model=loaded).removed


def test_draw_b_runs_its_dense_blocks_only_as_deep_as_the_finalists_need(tiny, monkeypatch):
    from mi_prun.select.scorer import PrefixScorer, tokens_key

    loaded, analysis = tiny
    monkeypatch.setattr(SelectConfig, "CONFIRM_Z", math.inf)  # every runner-up within noise: all re-scored
    cfg = SelectConfig(n=2, verify_seq_len=48, verify_samples=4, verify_confirm=3, verify_race="off")
    cache = NLLCache()
    sel = select(analysis, cfg, model=loaded, cache=cache)
    rec = sel.verification["confirm"]
    again = [tuple(f["removed"]) for f in rec["finalists"] if f["nll_b"] is not None]
    assert len(again) == 3 and rec["passes"] == 3
    pre = cache.fresh.prefix
    assert pre["dense_nll"] is None  # no dense pass to the end, no head on the dense states
    firsts = [min(r) for r in again if min(r) in pre["prefix"].want]
    assert pre["prefix"].reached[0] == max(firsts, default=0)
    # each finalist's NLL on draw B is that of a pass from the embeddings, exactly
    a, _, _ = resolve_tokens(None, loaded.tokenizer, analysis, cfg)
    b = fresh_tokens(cfg, analysis, loaded.tokenizer, a)
    plain = NLLCache()
    plain.bind(loaded.model, tokens_key(b, None))
    scorer = PrefixScorer(loaded.model, b, None, 8, range(1, analysis.n_blocks), plain, use_prefix=False)
    for f in rec["finalists"]:
        assert f["nll_b"] == scorer.nll(tuple(f["removed"]), use_prefix=False)
