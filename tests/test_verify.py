"""The verified search: candidates checked by forward passes (mi_prun.select.verify).

A tiny model built so that every one-pass criterion is wrong (a block that barely changes the
hidden state but whose removal ruins the logits); the pass budget; the prefix cache against full
passes; the NLL cache across n; determinism; the k-best dynamic programme against enumeration;
verification tokens disjoint from the capture's; the CLI; the benchmark's quick mode.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mi_prun.config import AnalysisConfig, SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.models import find_blocks
from mi_prun.runtime import load_model
from mi_prun.runtime.loading import LoadedModel
from mi_prun.pipeline import analyze
from mi_prun.select import NLLCache, Selection, guided_select, k_best_combinations, one_pass_estimate, select
from mi_prun.select.costs import set_cost
from mi_prun.select.search import best_combination
from mi_prun.select.scorer import PrefixScorer, resolve_tokens

CFG = SelectConfig(verify_seq_len=64)  # short verification samples: the tiny models' tests stay fast


def adversarial_model(weak: int = 2, channel: int = 0, shift: float = 1.0, amp: float = 50.0) -> LoadedModel:
    """A tiny Llama whose block `weak` is an almost exact identity (its attention and MLP weights
    scaled by 1e-3) plus a constant -`shift` on one channel, which the embeddings set to about
    `shift` and no other block writes; the LM head reads that channel `amp` times stronger.
    Every one-pass criterion calls `weak` the most redundant block (highest MI, lowest BI); removing
    it leaves `shift` on the channel, and the amplified logits ruin the NLL."""
    from mi_prun.testing import tiny_model

    model, tok = tiny_model("llama", n_layers=6, seed=0, mlp_bias=True, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, channel] = shift + 0.01 * torch.randn(emb.shape[0], generator=gen)
        for b, block in enumerate(find_blocks(model).blocks):
            block.mlp.down_proj.bias.zero_()
            block.self_attn.o_proj.weight[channel].zero_()
            block.mlp.down_proj.weight[channel].zero_()
            if b == weak:
                block.self_attn.o_proj.weight.mul_(1e-3)
                block.mlp.down_proj.weight.mul_(1e-3)
                block.mlp.down_proj.bias[channel] = -shift
        model.lm_head.weight[:, channel] *= amp
    return LoadedModel(model=model, tokenizer=tok, spec="adversarial", source="test", model_type="llama",
                       device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def adversarial():
    loaded = adversarial_model()
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", device="cpu")
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


def _nll(model, removed, ids):
    """Full-pass reference: the pruned view's mean NLL, no prefix cache."""
    from mi_prun.models.surgery import pruned_view
    from mi_prun.select import calibration_nll

    return calibration_nll(pruned_view(model, removed), ids)


def test_verified_search_fixes_a_one_pass_criterion_wrong_by_construction(adversarial):
    loaded, analysis = adversarial
    assert int(np.argmax(analysis.block_mi)) == 2 and int(np.argmin(analysis.baselines["cosine_bi"])) == 2
    cfg = CFG.replace(n=1)
    one = select(analysis, config=cfg)
    assert one.removed == (2,) and not one.verified and "unverified" in one.verification["note"]
    for method in ("shortgpt", "angular"):  # the baselines are fooled too
        assert select(analysis, config=cfg.replace(method=method, verify_passes=0)).removed == (2,)
    v = select(analysis, config=cfg, model=loaded)
    ids = resolve_tokens(None, loaded.tokenizer, analysis, cfg)[0]
    truth = {b: _nll(loaded.model, (b,), ids) for b in range(1, 5)}  # every removable block (ends protected)
    assert v.verified and v.removed == (min(truth, key=truth.get),) and v.removed != (2,)
    assert v.one_pass_removed == (2,) and v.nll == pytest.approx(truth[v.removed[0]])
    after = v.verification["one_pass_dropped_after"]
    if after is None:  # scored in full
        assert v.one_pass_nll == pytest.approx(truth[2])
    else:  # the race dropped it early: its NLL is the paired estimate, and says so
        assert 0 < after < CFG.verify_samples and "estimated on" in one_pass_estimate(v.verification)
        assert select(analysis, config=cfg.replace(verify_race="off"), model=loaded).one_pass_nll == \
            pytest.approx(truth[2])
    assert v.one_pass_nll > v.nll + 1.0
    assert v.verification["one_pass_gap_nats"] == pytest.approx(v.one_pass_nll - v.nll)
    assert v.winner_source and v.winner_source != "fbs"
    assert {c.removed for c in v.candidates} == {(b,) for b in range(1, 5)}


@pytest.mark.parametrize("race", ["off", "sets"])  # the budget in sets, unraced and raced
@pytest.mark.parametrize("budget", [1, 3, 100])
def test_passes_equal_sets_scored_and_never_exceed_the_budget(tiny, budget, race):
    loaded, analysis = tiny
    v = select(analysis, config=CFG.replace(n=2, verify_passes=budget, verify_race=race), model=loaded)
    extra = v.verification["confirm"]["passes"]  # the confirmation's, beyond the search's budget
    assert v.forward_passes == v.verification["passes"] == len(v.candidates) + extra
    assert len(v.candidates) <= budget and extra <= CFG.verify_confirm
    assert not any(c.cached for c in v.candidates)
    assert len({c.removed for c in v.candidates}) == len(v.candidates)
    assert v.candidates[0].removed == v.one_pass_removed  # the one-pass answer comes first
    best = min((c for c in v.candidates if c.complete), key=lambda c: c.nll)
    assert v.removed == best.removed and v.nll == best.nll
    assert all(0 < b < 5 for b in v.removed)  # protect_ends holds for the verified answer too
    if budget == 100:
        assert v.forward_passes < 100  # candidates and refinement ran out before the budget


@pytest.mark.parametrize("family", sorted(__import__("mi_prun.testing").testing.FAMILIES))
def test_prefix_cache_gives_the_full_pass_nll(family):
    from mi_prun.testing import tiny_model

    model, _ = tiny_model(family, n_layers=5)
    ids = torch.randint(0, 250, (5, 24), generator=torch.Generator().manual_seed(0))
    scorer = PrefixScorer(model, ids, None, batch_size=2, starts=range(5), cache=NLLCache())
    for removed in [(1,), (2, 3), (3, 4), (0, 2), (4,)]:
        full = _nll(model, removed, ids)
        assert scorer.nll(removed) == pytest.approx(full, rel=1e-5, abs=1e-6), removed
    assert scorer.dense_passes == 1
    assert scorer.dense() == pytest.approx(_nll(model, (), ids), rel=1e-5)


def test_deterministic_and_nll_cache_reused_across_n(tiny):
    loaded, analysis = tiny
    a = select(analysis, config=CFG.replace(n=2), model=loaded)
    b = select(analysis, config=CFG.replace(n=2), model=loaded)
    assert a.removed == b.removed and [c.nll for c in a.candidates] == [c.nll for c in b.candidates]
    cache = NLLCache()
    first = select(analysis, config=CFG.replace(n=2), model=loaded, cache=cache)
    select(analysis, config=CFG.replace(n=3), model=loaded, cache=cache)
    again = select(analysis, config=CFG.replace(n=2), model=loaded, cache=cache)  # the slider comes back
    assert again.forward_passes == 0 and again.removed == first.removed and again.verification["dense_passes"] == 0
    assert all(c.cached for c in again.candidates)
    assert select(analysis, config=CFG.replace(n=2, verify_passes=0), model=loaded).removed == a.one_pass_removed


def test_k_best_dynamic_programme_matches_enumeration():
    rng = np.random.default_rng(3)
    L, n = 8, 3
    C = np.full((L + 1, L + 1), np.inf)
    iu = np.triu_indices(L + 1, 1)
    C[iu] = rng.normal(size=len(iu[0]))
    windows = {i: [(j, float(C[i, j])) for j in range(i + 1, min(i + n, L) + 1)] for i in range(L)}
    best = k_best_combinations(L, n, windows, 6)
    assert best[0][0] == pytest.approx(best_combination(L, n, windows)[0])
    brute = sorted(set_cost(s, C) for s in itertools.combinations(range(L), n))
    assert [c for c, _ in best] == pytest.approx(brute[:6])
    sets = [tuple(b for s, e in runs for b in range(s, e)) for _, runs in best]
    assert len(set(sets)) == 6 and all(len(s) == n for s in sets)


def test_verification_tokens_are_disjoint_from_the_capture(tiny):
    from mi_prun.data import calibration_text, tokenize, verification_tokens

    loaded, analysis = tiny
    cal = analysis.calibration
    text = calibration_text(cal)
    stream = tokenize(loaded.tokenizer, text.text)
    body = cal["seq_len"] - 1  # the byte tokenizer adds BOS
    captured = torch.randperm(stream.numel() // body, generator=torch.Generator().manual_seed(cal["seed"]))
    used = set()
    for c in captured[: cal["n_samples"]].tolist():
        used |= set(range(c * body, (c + 1) * body))
    for seq_len in (cal["seq_len"], 64):
        tok = verification_tokens(loaded.tokenizer, text, cal, 8, seq_len)
        assert tuple(tok.input_ids.shape) == (8, seq_len)
        positions = {c * (seq_len - 1) + i for c in tok.provenance["chunks"] for i in range(seq_len - 1)}
        assert not positions & used
        assert tok.input_ids[:, 1:].reshape(-1).tolist() == [int(stream[p]) for p in sorted(positions)]
    with pytest.raises(MiPrunError, match="not enough calibration text"):
        verification_tokens(loaded.tokenizer, text, cal, 10**6, 64)
    with pytest.raises(MiPrunError, match="cannot be reloaded"):
        calibration_text({"source": "text:<string>"})


def test_selection_round_trip_and_old_files(tiny, tmp_path):
    loaded, analysis = tiny
    v = select(analysis, config=CFG.replace(n=2, verify_passes=3), model=loaded)
    back = Selection.load(v.save(tmp_path / "v.json"))
    assert back.verified and back.removed == v.removed and back.candidates == v.candidates
    assert [c.to_dict() for c in back.candidates] == v.to_dict()["candidates"]
    # a file written before the rows were typed and raced (plain dicts, no race fields) reads the same
    base = lambda c: (c.removed, c.proposers, c.objective, c.nll, c.cached, c.stage)  # noqa: E731
    rows = [{"removed": list(c.removed), "proposers": list(c.proposers), "objective": c.objective, "nll": c.nll,
             "cached": c.cached, "stage": c.stage} for c in v.candidates]
    old_rows = Selection.from_dict({**v.to_dict(), "candidates": rows}).candidates
    assert [base(c) for c in old_rows] == [base(c) for c in v.candidates]
    assert all(c.complete and c.samples is None and c.units is None for c in old_rows)
    assert back.one_pass_removed == v.one_pass_removed and back.nll == pytest.approx(v.nll)
    old = {k: val for k, val in v.to_dict().items()
           if k not in ("verified", "nll", "candidates", "winner_source", "one_pass_removed", "one_pass_nll",
                        "verification")}
    assert not Selection.from_dict(old).verified


def test_mi_guided_greedy_tries_c_blocks_a_step(tiny):
    loaded, analysis = tiny
    g = guided_select(loaded, analysis, CFG.replace(n=2), c=2)
    assert g.method == "mi-guided" and len(g.removed) == 2 and g.forward_passes <= 2 * 2
    assert all(len(step["candidates"]) <= 2 for step in g.trajectory)


def test_cli_says_unverified_without_a_model_and_verifies_with_one(tiny, tmp_path, capsys):
    from mi_prun.cli import main

    loaded, analysis = tiny
    folder = analysis.save(tmp_path / "a")
    assert main(["--quiet", "select", str(folder), "--n", "2"]) == 0
    assert "unverified (no --model): one-pass answer" in capsys.readouterr().out
    assert main(["--quiet", "select", str(folder), "--n", "2", "--model", "tiny-llama", "--verify-passes", "3",
                 "--verify-race", "sets", "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "verified: " in out and " of 3 sets scored" in out and "one-pass answer" in out
    sel = Selection.load(tmp_path / "s.json")
    assert sel.verified and len(sel.candidates) <= 3
    # the CLI's raced answer is the library's, set for set
    lib = select(analysis, config=SelectConfig(n=2, verify_passes=3, verify_race="sets"), model=loaded)
    assert (sel.removed, sel.nll) == (lib.removed, pytest.approx(lib.nll))
    assert [(c.removed, c.complete, c.samples) for c in sel.candidates] == \
        [(c.removed, c.complete, c.samples) for c in lib.candidates]
    assert sel.forward_passes == len(sel.candidates) + sel.verification["confirm"]["passes"]
    assert "Confirmation: " in out
    # a race in units spends a budget in token-block units, and says so
    assert main(["--quiet", "select", str(folder), "--n", "2", "--model", "tiny-llama", "--verify-passes", "3",
                 "--verify-race", "units"]) == 0
    out = capsys.readouterr().out
    assert "token-block units of a budget of" in out and "(3 passes x a full pass)" in out
    assert main(["--quiet", "select", str(folder), "--n", "2", "--verify-passes", "0"]) == 0
    assert "unverified" not in capsys.readouterr().out
    assert main(["select", str(folder), "--verify-passes", "-1"]) == 2


def test_benchmark_quick_mode_runs_every_method():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_bench.py"
    spec = importlib.util.spec_from_file_location("verify_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench._quick()
    methods = {r["method"] for r in rows}
    assert methods == {"verified", "mi-guided", "fbs (one pass)", "shortgpt", "angular", "random", "sleb"}
    for r in rows:
        assert len(r["removed"]) == r["n"] and math.isfinite(r["forward_passes"])
    from mi_prun.select.counts import allowed_blocks

    removable = len(allowed_blocks(6, SelectConfig().protect_ends))  # tiny-llama: 6 blocks
    for r in rows:
        if r["method"] == "verified" and r["unit_budget"] is None:  # the budget in sets
            assert r["forward_passes"] <= SelectConfig().verify_budget(r["n"], removable)
        elif r["method"] == "verified":  # in units: a set once started is finished
            assert r["units"] <= r["unit_budget"] + r["largest_set_units"]


def test_prune_verifies_with_inline_calibration_text(tmp_path, capsys):
    """`prune --calib text:...` runs the analysis in the same command: the text is at hand for the
    verification tokens even though an analysis cannot reload inline text."""
    from mi_prun.cli import main

    words = " ".join(f"word{i % 97} and more text number {i}." for i in range(400))
    out = tmp_path / "p"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--calib", f"text:{words}", "--samples", "4",
                 "--tokens", "48", "--n", "1", "--verify-samples", "2", "--verify-tokens", "64",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and (out / "mi_prun.json").is_file()
    short = tmp_path / "q"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--calib", f"text:{words[:1500]}", "--samples", "4",
                 "--tokens", "48", "--n", "1", "--out", str(short)]) == 2
    err = capsys.readouterr().err
    assert "--verify-passes 0" in err and not short.exists()


def test_nll_cache_draws_the_verification_tokens_once(tiny, monkeypatch):
    """A cache kept across calls (the app's slider) reloads and tokenises the calibration text once."""
    import mi_prun.select.scorer as data_mod  # where the verification text is reloaded

    loaded, analysis = tiny
    calls = []
    real = data_mod.calibration_text
    monkeypatch.setattr(data_mod, "calibration_text", lambda c: calls.append(1) or real(c))
    cache = NLLCache()
    first = select(analysis, config=CFG.replace(n=2), model=loaded, cache=cache)
    again = select(analysis, config=CFG.replace(n=3), model=loaded, cache=cache)
    guided_select(loaded, analysis, CFG.replace(n=2), cache=cache)
    assert len(calls) == 1
    assert first.verification["tokens"] == again.verification["tokens"]
    select(analysis, config=CFG.replace(n=2), model=loaded)  # no cache: drawn again
    assert len(calls) == 2


def test_selection_file_unwritable_is_one_error_and_keeps_the_old_file(tiny, tmp_path, monkeypatch):
    import os as os_mod

    _, analysis = tiny
    sel = select(analysis, config=CFG.replace(n=2, verify_passes=0))
    path = sel.save(tmp_path / "s.json")
    before = path.read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os_mod, "replace", full_disk)
    with pytest.raises(MiPrunError, match="cannot write the selection .*No space left on device.*free disk space"):
        sel.save(path, overwrite=True)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_auto_budget_is_a_quarter_of_sleb_with_a_floor_and_the_cli_takes_it(tiny, tmp_path, capsys):
    from mi_prun.cli import main

    cfg = SelectConfig()
    assert cfg.verify_passes == "auto" and cfg.verifies and SelectConfig(verify_passes="AUTO").verify_passes == "auto"
    sleb = lambda n, r: n * r - n * (n - 1) // 2  # noqa: E731  SLEB-style greedy: one pass per remaining block per step
    # SmolLM2-135M with its ends protected: 24 removable blocks
    assert [cfg.verify_budget(n, 24) for n in (1, 2, 4, 6, 8, 10)] == [8, 11, 22, 32, 41, 48]
    for n, r in [(2, 24), (4, 24), (6, 24), (8, 24), (10, 24), (8, 56), (16, 56)]:
        assert cfg.verify_budget(n, r) <= sleb(n, r) / 4
    assert cfg.verify_budget(1, 4) == 4 and cfg.verify_budget(2, 4) == 7  # small: never above SLEB's own passes
    assert SelectConfig(verify_passes=5).verify_budget(10, 24) == 5 and not SelectConfig(verify_passes=0).verifies
    with pytest.raises(MiPrunError, match="auto"):
        SelectConfig(verify_passes="lots")
    _, analysis = tiny
    folder = analysis.save(tmp_path / "a")
    assert main(["--quiet", "select", str(folder), "--n", "2", "--model", "tiny-llama", "--verify-passes", "auto",
                 "--verify-tokens", "64", "--verify-race", "sets"]) == 0
    out = capsys.readouterr().out
    assert f"of {cfg.verify_budget(2, 4)} (auto) sets scored" in out
    assert main(["select", str(folder), "--verify-passes", "lots"]) == 2
    assert "must be auto or a whole number >= 0, got 'lots'" in capsys.readouterr().err


def _synthetic_problem(harm: np.ndarray, n: int):
    """A Problem over len(harm) blocks (ends protected) whose MI calls the most harmful blocks the
    most redundant; the run costs come from a random span matrix (no criterion knows `harm`)."""
    from mi_prun.select.costs import cost_matrix
    from mi_prun.select.registry import Problem

    L = len(harm)
    rng = np.random.default_rng(0)
    span = np.triu(rng.uniform(0.1, 1.0, (L + 1, L + 1)))
    span = np.maximum(span, span.T)
    np.fill_diagonal(span, 2.0)
    return Problem(n_blocks=L, n=n, block_mi=harm.astype(float), span=span, C=cost_matrix(span, None, "neg-mi"),
                   allowed=tuple(range(1, L - 1)), baselines={}, seed=0)


def test_local_search_finds_blocks_no_criterion_proposes():
    """Additive harm: the best set is the n least harmful blocks, which MI ranks last. The one-pass
    candidates miss it; the exchanges (put the worst block back, try every other) reach it."""
    from mi_prun.select.candidates import propose
    from mi_prun.select.verify import verified_search

    harm = np.array([9, 1.0, 7, 8, 0.5, 6, 9, 0.7, 5, 9.5, 4, 9])  # best 3 of blocks 1..10: 1, 4, 7
    problem = _synthetic_problem(harm, 3)
    calls = []

    def nll(removed):
        calls.append(tuple(removed))
        return float(harm[list(removed)].sum()), False

    one = tuple(sorted(np.argsort(-harm[1:-1])[:3] + 1))  # MI's top-3 = the most harmful
    cands = propose(problem, None, one, "fbs")
    assert (1, 4, 7) not in {c.removed for c in cands}
    out = verified_search(problem, cands, nll, budget=200)
    assert out.best.removed == (1, 4, 7) and out.best.stage in ("swap", "exchange")
    assert out.passes == len(out.scored) == len(set(calls)) == len(calls) < 200
    assert out.sets_by_stage["exchange"] > 0 and sum(out.sets_by_stage.values()) == len(out.scored)
    # every budget is respected and the answer only improves with more budget
    last = math.inf
    for budget in (1, 5, 10, 20, 40, 80):
        r = verified_search(problem, cands, nll, budget=budget)
        assert len(r.scored) <= budget and r.best.nll <= last
        last = r.best.nll
    # a warm cache changes the passes spent, never the answer
    cache = {}

    def cached(removed):
        hit = removed in cache
        cache[removed] = float(harm[list(removed)].sum())
        return cache[removed], hit

    a = verified_search(problem, cands, cached, budget=15)
    b = verified_search(problem, cands, cached, budget=15)
    assert a.best.removed == b.best.removed and b.passes == 0
    assert [r.removed for r in a.scored] == [r.removed for r in b.scored]


def test_the_search_says_whether_it_converged_or_its_budget_ran_out_and_the_cli_says_what_to_do():
    """A budget that stops the search while exchanges still improve is reported ("budget"), with the
    advice to search longer; a search that ran until no move improved says "converged", and no advice."""
    from mi_prun.cli.output import format_verification
    from mi_prun.select import stop_note
    from mi_prun.select.candidates import propose
    from mi_prun.select.verify import verified_search

    harm = np.array([9, 1.0, 7, 8, 0.5, 6, 9, 0.7, 5, 9.5, 4, 9])  # as above: exchanges reach 1, 4, 7
    problem = _synthetic_problem(harm, 3)
    one = tuple(sorted(np.argsort(-harm[1:-1])[:3] + 1))
    cands = propose(problem, None, one, "fbs")

    def nll(removed):
        return float(harm[list(removed)].sum()), False

    done = verified_search(problem, cands, nll, budget=200)
    assert done.stopped == "converged" and len(done.scored) < 200 and done.best.removed == (1, 4, 7)
    for budget in (len(cands), len(cands) + 4):  # spent by the candidates; cut inside the first exchanges
        cut = verified_search(problem, cands, nll, budget=budget)
        assert cut.stopped == "budget" and cut.best.nll > done.best.nll
    # the converged search given exactly what it spent also converged: the reason is not "no budget left"
    again = verified_search(problem, cands, nll, budget=len(done.scored))
    assert again.stopped == "converged" and again.best.removed == (1, 4, 7)

    assert stop_note({"stopped": "converged", "budget": 9}) is None
    assert "stopped at its budget (9 passes) before it converged" in stop_note({"stopped": "budget", "budget": 9})

    class Sel:  # what format_verification reads of a Selection
        verified, winner_source, nll, one_pass_nll, one_pass_removed, removed = True, "fbs", 1.0, None, None, (1,)

        def __init__(self, v):
            self.verification = v

    base = {"budget": 9, "budget_rule": "auto", "sets_scored": 9, "passes": 9, "tokens": {}}
    sets = "\n".join(format_verification(Sel({**base, "stopped": "budget", "race": {"mode": "sets", "units": 5}})))
    assert "before it converged" in sets and "--verify-race units" in sets and "--verify-passes" in sets
    units = "\n".join(format_verification(Sel({**base, "stopped": "budget",
                                                "race": {"mode": "units", "units": 5, "unit_budget": 6}})))
    assert "before it converged" in units and "--verify-race units" not in units and "--verify-passes" in units
    assert "converged" not in "\n".join(format_verification(Sel({**base, "stopped": "converged"})))


def test_exchange_order_trusts_measurements_over_mi():
    """Blocks whose addition an earlier exchange measured: the better half first (best first), then
    the blocks never measured in MI/BI order, then the worse half; the returned block last."""
    from mi_prun.select.candidates import exchange_order, guided_order

    harm = np.array([9, 1.0, 7, 8, 0.5, 6, 9, 0.7, 5, 9.5, 4, 9])
    problem = _synthetic_problem(harm, 3)
    base, returned = [2, 3], 9
    plain = exchange_order(base, returned, problem)
    kept = [b for b in problem.allowed if b not in (2, 3, 9)]
    assert plain == guided_order(kept, problem.block_mi, None, len(kept)) + [9]
    measured = {7: 0.2, 4: -0.1, 8: 3.0, 5: 1.0, 2: -5.0}  # 2 is in the base: never tried
    order = exchange_order(base, returned, problem, measured)
    assert order[:2] == [4, 7] and order[-3:] == [5, 8, 9]
    assert order[2:-3] == [b for b in plain if b not in (4, 7, 5, 8, 9)]
    assert sorted(order) == sorted(plain)


def test_later_exchanges_try_the_best_measured_block_first(monkeypatch):
    """The search learns from its own passes: an exchange after the first is given what adding each
    block cost in earlier ones (with additive harm: the block's harm) and starts with the cheapest."""
    from mi_prun.select import candidates, verify
    from mi_prun.select.candidates import propose
    from mi_prun.select.verify import verified_search

    harm = np.array([9, 1.0, 7, 8, 0.5, 6, 9, 0.7, 5, 9.5, 4, 9])
    problem = _synthetic_problem(harm, 3)
    calls = []

    def spy(base, returned, prob, measured=None):
        order = candidates.exchange_order(base, returned, prob, measured)
        calls.append((list(base), returned, dict(measured or {}), order))
        return order

    monkeypatch.setattr(verify, "exchange_order", spy)
    one = tuple(sorted(np.argsort(-harm[1:-1])[:3] + 1))
    out = verified_search(problem, propose(problem, None, one, "fbs"),
                          lambda removed: (float(harm[list(removed)].sum()), False), budget=200)
    assert out.best.removed == (1, 4, 7)
    assert len(calls) >= 2 and calls[0][2] == {}
    base, returned, measured, order = calls[1]
    assert measured and all(math.isclose(v, harm[b]) for b, v in measured.items())
    eligible = [b for b in measured if b not in base and b != returned]
    assert order[0] == min(eligible, key=lambda b: harm[b])


def test_stopping_when_only_put_back_sets_are_left_changes_no_answer():
    """Once the budget left is no more than an exchange's unscored put-back sets (n - 1 blocks, never
    the answer), the search stops: on synthetic NLL oracles (additive harm, and harm with pairwise
    interactions), every budget gives the same winner and the same sets of n blocks as the search that
    spends those passes, never more sets, and fewer on some budgets."""
    from mi_prun.select.candidates import propose
    from mi_prun.select.verify import verified_search

    saved = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        L, n = 14, 2 + seed % 4
        harm = rng.uniform(0.1, 10.0, L)
        pair = rng.normal(0.0, 1.0, (L, L)) if seed % 2 else np.zeros((L, L))
        problem = _synthetic_problem(harm, n)

        def nll(removed, harm=harm, pair=pair):
            r = list(removed)
            return float(harm[r].sum() + pair[np.ix_(r, r)].sum() / 2), False

        one = tuple(sorted(int(b) for b in np.argsort(-harm[1:-1])[:n] + 1))
        cands = propose(problem, None, one, "fbs")
        for budget in range(1, 80, 3):
            full = verified_search(problem, cands, nll, budget, stop_early=False)
            cut = verified_search(problem, cands, nll, budget)
            assert cut.best.removed == full.best.removed, (seed, budget)
            assert cut.best.nll == full.best.nll
            sized = lambda out, n=n: [r.removed for r in out.scored if len(r.removed) == n]  # noqa: E731
            assert sized(cut) == sized(full)  # every set of n blocks the full search scores, in order
            assert len(cut.scored) <= len(full.scored) <= budget
            saved += len(full.scored) - len(cut.scored)
    assert saved > 0


def test_progress_names_the_best_set_so_far_while_the_search_goes_on(tiny):
    """Every progress message after the first complete set of n names the best such set so far, so the
    app and the CLI show a verified answer long before the search ends; the last one names the
    search's winner (the lowest NLL among the complete sets of n)."""
    loaded, analysis = tiny
    said: list[str] = []
    v = select(analysis, config=CFG.replace(n=2, verify_confirm=0), model=loaded,
               progress=lambda stage, fraction, message="": said.append(message))
    named = [m.split("best so far removes ")[1] for m in said if "best so far removes" in m]
    assert named, said
    assert any("candidate: first look of set 1 of" in m for m in said)  # the field's first looks report too
    best = min((c for c in v.candidates if c.complete and len(c.removed) == 2), key=lambda c: c.nll)
    assert best.removed == v.removed
    assert named[-1].startswith(", ".join(map(str, v.removed)) + f" (NLL {v.nll:.4f})")


def test_a_cancel_during_the_first_looks_stops_the_search(tiny):
    """The field's first looks run several sets before any is scored to the end: the progress callback
    is called after each, so a cancel (the app's button raises from it) stops the search there."""
    loaded, analysis = tiny

    class Stop(Exception):
        pass

    def progress(stage, fraction, message=""):
        if "first look of set 2" in message:
            raise Stop

    with pytest.raises(Stop):
        select(analysis, config=CFG.replace(n=2), model=loaded, progress=progress)
