"""Healing: closed-form bridges fit exactly what they should, fold exactly into the weights of every
family with an exact fold, export to a folder plain transformers reloads with the same logits,
leave the original model untouched, and are refused in one line where no exact fold exists."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mi_prun.capture import capture
from mi_prun.config import HealConfig
from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.heal import FOLDS, BridgeStats, HealRefused, heal, solve, sse
from mi_prun.models import find_blocks, pruned_view
from mi_prun.export import export
from mi_prun.testing import FAMILIES, tiny_model

CFG = HealConfig(n_samples=8, seq_len=48, batch_size=4)
NORM_FOLD = {"gemma2", "gemma3"}  # a norm after the MLP: per-channel bridge


def calib_for(tok, n: int = 8, seq_len: int = 48):
    return calibration_tokens(tok, load_text("builtin"), n, seq_len, seed=0)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- the maths

def test_bridge_solve_recovers_affine_map_and_streams():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(600, 6, generator=g, dtype=torch.float64) + 3.0
    T0 = torch.randn(6, 6, generator=g, dtype=torch.float64)
    c0 = torch.randn(6, generator=g, dtype=torch.float64)
    R = M @ T0 + c0
    one, parts = BridgeStats(6, diagonal=False), BridgeStats(6, diagonal=False)
    one.add(M, R, R)
    for k in range(0, 600, 70):  # streaming sums equal one-shot sums
        parts.add(M[k:k + 70], R[k:k + 70], R[k:k + 70])
    for a, b in ((one.mm, parts.mm), (one.mr, parts.mr), (one.sm, parts.sm)):
        torch.testing.assert_close(a, b)
    bridge = solve(parts, 0.0, intercept=True)
    torch.testing.assert_close(bridge.T, T0)
    torch.testing.assert_close(bridge.c, c0)
    assert sse(parts, bridge) < 1e-12 * float(one.rr)
    # sse from the sums equals the direct sum of squares, for any (T, c)
    noisy = solve(parts, 0.5, intercept=False)
    direct = float(((M @ noisy.T + noisy.c - R) ** 2).sum())
    assert sse(parts, noisy) == pytest.approx(direct, rel=1e-9)


def test_diagonal_bridge_is_per_channel_least_squares():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(400, 5, generator=g, dtype=torch.float64)
    t0 = torch.tensor([0.5, 2.0, -1.0, 1.0, 3.0], dtype=torch.float64)
    stats = BridgeStats(5, diagonal=True)
    stats.add(M, M * t0, M * t0)
    torch.testing.assert_close(solve(stats, 0.0, intercept=False).T, t0)


# ------------------------------------------------------------------------------------- families

def _silence_blocks(model, blocks) -> None:
    """Make `blocks` exact identities: zero the outputs of their attention and MLP branches."""
    pat = re.compile(r"(o_proj|attn\.c_proj|attention\.dense|self_attention\.dense|out_proj|mlp\.c_proj|"
                     r"down_proj|dense_4h_to_h|fc2)\.(weight|bias)$")
    path = find_blocks(model).path
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(name.startswith(f"{path}.{b}.") for b in blocks):
                continue
            if pat.search(name):
                p.zero_()
            elif re.search(r"post_(attention|feedforward)_layernorm\.weight$", name) and \
                    model.config.model_type in ("gemma2", "gemma3_text"):
                p.fill_(-1.0)  # Gemma norms scale by (1 + w)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_run_heals_to_near_zero_residual(family):
    model, tok = tiny_model(family, 6)
    _silence_blocks(model, [2, 3])
    ids = calib_for(tok).input_ids
    with torch.no_grad():
        dense = model(ids[:2]).logits
        assert torch.allclose(pruned_view(model, [2, 3])(ids[:2]).logits, dense, atol=1e-4)
    healed, rec = heal(model, [2, 3], calib_for(tok), config=CFG.replace(ridge=0.0))
    assert rec.runs[0].unexplained_healed < 1e-8
    assert rec.runs[0].kind == ("norm" if family in NORM_FOLD else "linear")
    with torch.no_grad():
        assert torch.allclose(healed(ids[:2]).logits, dense, atol=1e-3)


def _measured_unexplained(dense, healed, calib, fold_new: int, end: int) -> float:
    """||h_end(healed) - h_end(dense)||^2 / var(h_end(dense)) over the fit's own positions."""
    kw = dict(max_positions=10**9, drop_first=True, seed=0, batch_size=4)
    Hd = capture(dense, calib.input_ids, calib.attention_mask, **kw).hidden[end].double()
    Hh = capture(healed, calib.input_ids, calib.attention_mask, **kw).hidden[fold_new + 1].double()
    return float(((Hh - Hd) ** 2).sum() / ((Hd - Hd.mean(0)) ** 2).sum())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fold_is_exact_and_helps(family):
    """The residual the sums predict is the residual the healed model has: the fold is exact."""
    model, tok = tiny_model(family, 6)
    before = state(model)
    calib = calib_for(tok)
    healed, rec = heal(model, [2, 3], calib, config=CFG.replace(check=False))  # the fold itself, unchecked
    run = rec.runs[0]
    assert run.kept and rec.check == {"run": False}
    assert (run.start, run.end, run.fold_block) == (2, 4, 1)
    assert run.unexplained_healed <= run.unexplained_unhealed + 1e-9
    assert run.ridge_choice == "held-out" and run.ridge in CFG.ridge_grid
    measured = _measured_unexplained(model, healed, calib, fold_new=1, end=4)
    assert measured == pytest.approx(run.unexplained_healed, rel=1e-3, abs=1e-6)
    # the original model is unchanged, and shares every tensor but the folded ones
    after = state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    shared = {id(p) for p in model.parameters()}
    own = [n for n, p in healed.named_parameters() if id(p) not in shared]
    assert own and all(n.startswith(run.module) for n in own)


def test_sequential_fit_heals_several_runs(tmp_path):
    from mi_prun.evaluate import token_nll

    model, tok = tiny_model("llama", 8)
    calib = calib_for(tok, n=12)
    removed = [2, 3, 5, 6]
    healed, rec = heal(model, removed, calib, config=CFG)
    assert [(r.start, r.end) for r in rec.runs] == [(2, 4), (5, 7)]
    assert rec.removed == tuple(removed) and rec.calibration["n_samples"] == 12
    json.dumps(rec.to_dict())
    held = calib_for(tok, n=16).input_ids[12:]  # not all of them seen by the fit
    nll = {name: token_nll(m, held)[0] for name, m in
           (("pruned", pruned_view(model, removed)), ("healed", healed))}
    assert nll["healed"] < nll["pruned"]


def test_check_leaves_out_a_bridge_that_raises_held_out_nll(monkeypatch, tmp_path):
    """A bridge that makes the held-out samples' NLL worse is never folded in: the run is removed
    unhealed, the record and the export say so; a bridge that helps is kept."""
    from mi_prun.evaluate import token_nll
    from mi_prun.heal import core
    from mi_prun.heal.fit import solve as real_solve

    model, tok = tiny_model("llama", 8)
    calib = calib_for(tok, n=12)
    removed = [2, 3, 5, 6]
    good, rec_good = heal(model, removed, calib, config=CFG)
    assert rec_good.check["run"] and rec_good.check["held_out_samples"] == 3 and rec_good.check["dropped"] == []
    assert all(r.kept and r.holdout_nll["with"] < r.holdout_nll["without"] for r in rec_good.runs)

    def harmful(stats, ridge, intercept):  # with a fixed ridge, 2 solves a run: run 5-6's point the wrong way
        bridge = real_solve(stats, ridge, intercept)
        if harmful.calls >= 2:
            bridge.T.mul_(-4.0)
        harmful.calls += 1
        return bridge
    harmful.calls = 0

    monkeypatch.setattr(core, "solve", harmful)
    healed, rec = heal(model, removed, calib, config=CFG.replace(ridge=1e-3))  # fixed ridge: 2 solves a run
    first, second = rec.runs
    assert first.kept and not second.kept and rec.check["dropped"] == [[5, 6]]
    assert second.holdout_nll["with"] > second.holdout_nll["without"]
    assert any("left unbridged" in n for n in rec.notes)
    # run 5-6 unbridged: the folded module of block 4 is the model's own; run 2-3's bridge is in
    shared = {id(p) for p in model.parameters()}
    own = {n.rsplit(".", 1)[0] for n, p in healed.named_parameters() if id(p) not in shared}
    assert own == {first.module}
    held = calib_for(tok, n=16).input_ids[12:]
    assert token_nll(healed, held)[0] < token_nll(pruned_view(model, removed), held)[0]
    report = json.loads((export(healed, tok, None, tmp_path / "h") / "mi_prun.json").read_text())
    assert [r["kept"] for r in report["healing"]["runs"]] == [True, False]
    assert report["healing"]["check"]["dropped"] == [[5, 6]]


def test_check_without_held_out_samples_says_so():
    model, tok = tiny_model("llama", 6)
    _, rec = heal(model, [2, 3], calib_for(tok), config=CFG.replace(holdout=0.0))
    assert rec.runs[0].kept and not rec.check["run"] and "no held-out samples" in rec.check["note"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_export_reloads_with_same_logits_and_generation(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(family, 6)
    before = state(model)
    healed, rec = heal(model, [2, 3], calib_for(tok), config=CFG)
    out = export(healed, tok, None, tmp_path / "healed")
    report = json.loads((out / "mi_prun.json").read_text())
    assert report["removed"] == [2, 3] and report["healing"]["runs"][0]["start"] == 2
    assert report["healing"]["calibration"]["n_samples"] == CFG.n_samples
    assert "unexplained_healed" in report["healing"]["runs"][0] and "ridge" in report["healing"]["runs"][0]
    mk = (out / "mergekit.yaml").read_text()
    assert "only the unhealed" in mk and yaml.safe_load(mk)["merge_method"] == "passthrough"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calib_for(tok).input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, healed(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = tok("The cat sat on a mat and", return_tensors="pt")
    gen = {c: reloaded.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=c, pad_token_id=258)
           for c in (True, False)}
    assert torch.equal(gen[True], gen[False])
    after = state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------- refusals

def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("cannot heal")
    return msg


def test_refusals_are_one_line(monkeypatch):
    model, tok = tiny_model("llama", 6)
    calib = calib_for(tok)
    with pytest.raises(HealRefused) as exc:
        heal(model, [0, 1], calib, config=CFG)
    assert "block 0" in _one_line(exc)
    opt, opt_tok = tiny_model("opt", 6, do_layer_norm_before=False)
    with pytest.raises(HealRefused) as exc:
        heal(opt, [2], calib_for(opt_tok), config=CFG)
    assert "do_layer_norm_before" in _one_line(exc)
    monkeypatch.delitem(FOLDS, "llama")
    with pytest.raises(HealRefused) as exc:
        heal(model, [2], calib, config=CFG)
    assert "mi_prun.models.families" in _one_line(exc)
    with pytest.raises(MiPrunError, match="not a pruned one"):
        heal(pruned_view(model, [1]), [2], calib, config=CFG)
    with pytest.raises(MiPrunError, match="ridge"):
        HealConfig(ridge=-1.0)


def test_export_refuses_a_healing_record_of_other_blocks(tmp_path):
    model, tok = tiny_model("llama", 6)
    healed, rec = heal(model, [2, 3], calib_for(tok), config=CFG)
    with pytest.raises(MiPrunError, match="healing record"):
        export(pruned_view(model, [2]), tok, None, tmp_path / "x", healing=rec)


# ------------------------------------------------------------------------------------- span cost

def test_span_unexplained_and_its_run_cost():
    from mi_prun.scores import span_unexplained
    from mi_prun.select import cost_matrix

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    A = torch.randn(8, 8, generator=g)
    H = torch.stack([x, x @ A, torch.randn(3000, 8, generator=g)])
    U = span_unexplained(H)
    assert U[0, 1] < 1e-2 and U[0, 2] > 0.95 and np.all(np.diag(U) == 0)
    span = np.ones((3, 3))
    C = cost_matrix(span, None, "linear-unexplained", stats={"span_unexplained": U})
    assert C[0, 1] == pytest.approx(U[0, 1])
    with pytest.raises(MiPrunError, match="span_unexplained"):
        cost_matrix(span, None, "linear-unexplained")


# ------------------------------------------------------------------------------------- CLI, bench

def test_cli_prune_heal(tmp_path, capsys):
    from mi_prun.cli import main

    out = tmp_path / "healed"
    argv = ["--quiet", "prune", "--model", "tiny-llama", "--samples", "8", "--tokens", "48", "--positions", "256",
            "--n", "2", "--heal", "--out", str(out)]
    assert main(argv) == 0
    assert "healed blocks" in capsys.readouterr().out
    report = json.loads((out / "mi_prun.json").read_text())
    assert report["healing"]["runs"] and report["healing"]["calibration"]["n_samples"] == 8
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--n", "2", "--heal-ridge", "0.1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--heal-ridge" in capsys.readouterr().err


def test_heal_bench_quick_rows():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "heal_bench.py"
    spec = importlib.util.spec_from_file_location("bench_heal", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mi_prun.runtime import load_model

    loaded = load_model("tiny-llama")
    rows = bench.heal_rows(loaded, calib_for(loaded.tokenizer), load_text("builtin").text, [[2, 3]],
                           config=CFG, seq_len=48, max_windows=4)
    assert [r["n"] for r in rows] == [0, 2]
    assert rows[1]["ppl_healed"] > 0 and rows[1]["heal_seconds"] > 0 and rows[1]["runs"][0]["blocks"] == [2, 3]
    assert bench.parse_set("12-14,25") == [12, 13, 14, 25]


def test_prune_heals_on_the_saved_analysis_own_text(tmp_path, capsys):
    """`prune --analysis A --heal` fits the bridges on A's calibration text (reloaded from its
    provenance), not on a default text of another domain."""
    import json

    from mi_prun.cli import main

    text = tmp_path / "domain.txt"
    text.write_text(" ".join(f"Sentence {i} of the user's own domain, with words." for i in range(600)))
    analysis = tmp_path / "a"
    assert main(["--quiet", "analyze", "--model", "tiny-llama", "--calib", str(text), "--samples", "8",
                 "--tokens", "48", "--out", str(analysis)]) == 0
    out = tmp_path / "healed"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--analysis", str(analysis), "--n", "2",
                 "--verify-passes", "0", "--heal", "--out", str(out)]) == 0
    record = json.loads((out / "mi_prun.json").read_text())
    assert str(text) in json.dumps(record["healing"]["calibration"])
    assert record["healing"]["calibration"]["n_samples"] == 8


def test_heal_selects_with_the_healing_default(tmp_path, capsys):
    """`prune --heal` selects with SelectConfig.for_healing() (the one-pass answer, measured best
    for healing) unless --verify-passes is given; the library and the CLI agree."""
    import json

    from mi_prun.cli import main
    from mi_prun.config import SelectConfig

    assert SelectConfig.for_healing().verify_passes == 0
    assert SelectConfig.for_healing(n=2).method == SelectConfig().method
    out = tmp_path / "h"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--samples", "8", "--tokens", "48", "--n", "2",
                 "--heal", "--out", str(out)]) == 0
    sel = json.loads((out / "mi_prun.json").read_text())["selection"]
    assert sel["forward_passes"] == 0 and not sel.get("verified")
    out2 = tmp_path / "h2"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--samples", "8", "--tokens", "48", "--n", "2",
                 "--heal", "--verify-passes", "3", "--verify-tokens", "64", "--verify-race", "sets",
                 "--out", str(out2)]) == 0
    sel2 = json.loads((out2 / "mi_prun.json").read_text())["selection"]
    confirm = sel2["verification"]["confirm"]["passes"]  # the confirmation's, beyond the budget of 3 sets
    assert 0 < sel2["forward_passes"] - confirm <= 3 and sel2["verified"]


def test_heal_config_follows_the_analysis_calibration():
    """HealConfig.for_analysis: the CLI's and the app's healing calibration is the analysis's own
    text and sizes where it can be reloaded, else the defaults; explicit changes win."""
    from mi_prun.config import AnalysisConfig, HealConfig

    prov = {"source": "wikitext2-valid-nounk", "n_samples": 16, "seq_len": 128, "seed": 3, "drop_first": False}
    cfg = HealConfig.for_analysis(prov)
    assert (cfg.calib, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.drop_first) == ("wikitext2-valid-nounk", 16, 128, 3, False)
    assert HealConfig.for_analysis({"source": "text:<string>", "n_samples": 4}) == HealConfig()
    assert HealConfig.for_analysis(None, ridge=0.1) == HealConfig(ridge=0.1)
    a = AnalysisConfig(calib="builtin", n_samples=8, seq_len=48, seed=2)
    assert (HealConfig.for_analysis(a).n_samples, HealConfig.for_analysis(a, n_samples=4).n_samples) == (8, 4)
