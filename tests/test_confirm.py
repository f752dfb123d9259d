"""Confirmation of the verified search's finalists on a fresh draw of tokens
(`SelectConfig.verify_confirm`, `mi_prun.select.confirm`)."""

from __future__ import annotations

import math

import pytest

from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.models import load_model
from mi_prun.pipeline import analyze
from mi_prun.select import select
from mi_prun.select.confirm import confirm, fresh_tokens
from mi_prun.select.scorer import resolve_tokens


def row(removed, nll, who="x"):
    return {"removed": list(removed), "proposers": [who], "nll": nll}


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
    assert best["removed"] == [3, 4] and rec["changed"]  # (3.02 + 2.90) / 2 is the lowest
    assert [f["nll_ab"] for f in rec["finalists"]] == pytest.approx([3.05, 2.995, 2.96])
    # a fresh draw that agrees keeps the search's answer; ties go to the set better on A
    best, rec = confirm(2, scored, lambda r: ({(1, 2): 3.0, (2, 3): 2.99}[r], True), k=2)
    assert best["removed"] == [1, 2] and not rec["changed"] and rec["passes"] == 0


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


def test_verified_select_confirms_on_disjoint_tokens(tiny):
    loaded, analysis = tiny
    cfg = SelectConfig(n=2, verify_seq_len=48, verify_samples=4)
    plain = select(analysis, cfg, model=loaded)
    assert "confirm" not in plain.verification  # off by default: the shipped answer is unchanged
    sel = select(analysis, cfg.replace(verify_confirm=2), model=loaded)
    rec = sel.verification["confirm"]
    assert len(rec["finalists"]) == 2 and rec["dense_passes"] == 1
    assert sel.forward_passes == plain.forward_passes + rec["passes"]
    assert list(sel.removed) == rec["winner"]
    assert min(f["nll_ab"] for f in rec["finalists"]) == next(f["nll_ab"] for f in rec["finalists"]
                                                              if f["removed"] == list(sel.removed))
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
