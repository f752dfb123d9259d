"""One source of truth: the library's defaults are the configs' fields, and the CLI gives the same
answer as a library call with default arguments; the CLI's help, version and flag checks; the
capture against a reference forward pass; export provenance filled by the library."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from mi_prun.cli import main
from mi_prun.config import AnalysisConfig, EvalConfig, SelectConfig
from mi_prun.data import builtin_text
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import perplexity
from mi_prun.models import prune
from mi_prun.runtime import load_model
from mi_prun.pipeline import analyze
from mi_prun.export import export
from mi_prun.results import Analysis
from mi_prun.select import Selection, cost_matrix, select

TINY = ["--model", "tiny-llama", "--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    analysis = analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))
    return analysis, analysis.save(tmp_path_factory.mktemp("defaults") / "analysis")


def test_library_defaults_are_the_shipped_ones(saved, loaded):
    """A call with default arguments does what README and RESULTS.md say the shipped defaults are
    (the literals below), as the Selection / result itself reports it."""
    analysis, _ = saved
    sel = select(analysis)
    L = analysis.n_blocks
    assert (sel.method, sel.run_cost, sel.options["protect_ends"]) == ("fbs", "neg-log-nmi", 0.1)
    assert sel.n == max(1, int(0.25 * L + 0.5)) and sel.verification["budget_rule"] == "auto"
    assert 0 not in sel.removed and L - 1 not in sel.removed  # the ends protected
    span, norm = analysis.span, analysis.span_norm
    assert np.array_equal(cost_matrix(span, norm), cost_matrix(span, norm, "neg-log-nmi"))
    assert not np.array_equal(cost_matrix(span, norm), cost_matrix(span, norm, "neg-mi"))
    res = perplexity(loaded.model, loaded.tokenizer, builtin_text()[:20_000], max_windows=1)
    assert res.seq_len == EvalConfig().seq_len == 256


def test_estimator_defaults_are_the_estimators_own():
    from mi_prun.estimators import get_estimator

    for name in ("gaussian-channel", "gaussian-joint", "renyi-kernel"):
        cfg = AnalysisConfig(estimator=name)
        assert cfg.estimator_options == {}
        assert get_estimator(cfg.estimator, **cfg.estimator_options).options == get_estimator(name).options
    # gaussian-channel: a correlation ignores per-channel scale, so its default needs no preprocessing
    assert get_estimator("gaussian-channel").options["preprocess"] == "none"


def test_library_cli_agree_on_the_removed_blocks(saved, tmp_path, capsys):
    analysis, folder = saved
    lib = select(Analysis.load(folder))  # every default: method, run cost, protection, ratio
    assert lib.method == "fbs" and lib.run_cost == "neg-log-nmi"
    assert lib.n == round(0.25 * analysis.n_blocks + 1e-9) or lib.n == int(0.25 * analysis.n_blocks + 0.5)
    assert 0 not in lib.removed and analysis.n_blocks - 1 not in lib.removed  # ends protected
    out = tmp_path / "sel.json"
    assert main(["select", str(folder), "--out", str(out)]) == 0
    assert Selection.load(out).removed == lib.removed
    printed = capsys.readouterr().out
    assert str(list(lib.removed)) in printed
    # the same through an explicit SelectConfig and through the CLI's explicit flags
    assert select(analysis, SelectConfig()).removed == lib.removed
    assert main(["select", str(folder), "--method", "fbs", "--run-cost", "neg-log-nmi", "--protect-ends", "0.1",
                 "--ratio", "0.25", "--out", str(tmp_path / "sel2.json")]) == 0
    assert Selection.load(tmp_path / "sel2.json").removed == lib.removed


def test_cli_analysis_equals_library_analysis(loaded, tmp_path):
    out = tmp_path / "cli"
    assert main(["--quiet", "analyze", *TINY, "--out", str(out)]) == 0
    lib = analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))
    cli = Analysis.load(out)
    assert cli.estimator_options == lib.estimator_options
    np.testing.assert_allclose(cli.span, lib.span, rtol=1e-6, atol=1e-9)


def test_select_file_feeds_prune_and_refuses_mixed_flags(saved, tmp_path, capsys):
    _, folder = saved
    sel_file = tmp_path / "s.json"
    assert main(["select", str(folder), "--n", "2", "--method", "exact", "--out", str(sel_file)]) == 0
    removed = Selection.load(sel_file).removed
    export_dir = tmp_path / "pruned"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--selection", str(sel_file), "--out",
                 str(export_dir)]) == 0
    record = json.loads((export_dir / "mi_prun.json").read_text())
    assert tuple(record["removed"]) == removed and record["method"] == "exact"
    assert record["estimator"] == "gaussian-channel" and record["calibration"]["source"]
    capsys.readouterr()
    # a selection file says which blocks: selection flags would be ignored, so they are refused
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--selection", str(sel_file), "--n", "3",
                 "--out", str(tmp_path / "p2")]) == 2
    assert "--n would be ignored" in capsys.readouterr().err
    # a saved analysis is not re-run: analysis flags would be ignored, so they are refused
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--analysis", str(folder), "--samples", "4",
                 "--out", str(tmp_path / "p3")]) == 2
    assert "--samples would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["select", "X", "--protect-ends", "2", "--no-protect-ends"], "not allowed with argument"),
    (["select", "X", "--ratio", "0.2", "--n", "2"], "not allowed with argument"),
    (["select", "X", "--method", "nope"], "invalid choice: 'nope'"),
    (["select", "X", "--run-cost", "nope"], "invalid choice: 'nope'"),
])
def test_contradictory_or_unknown_flags_refused(argv, fragment, saved, capsys):
    _, folder = saved
    argv = [str(folder) if a == "X" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_help_shows_every_default_and_the_choices(capsys):
    from mi_prun.select import SELECTORS, run_cost_descriptions

    def squash(text: str) -> str:  # argparse wraps lines, also at hyphens: compare without whitespace
        return "".join(text.split())

    assert main(["select", "--help"]) == 0
    text = squash(capsys.readouterr().out)
    for value in ("fbs", "neg-log-nmi", "0.25", "0.1", SelectConfig().verify_passes):
        assert squash(f"(default: {value})") in text, value
    for name, sel in SELECTORS.items():
        assert squash(f"{name}: {sel.description}") in text
    for name, desc in run_cost_descriptions().items():
        assert squash(f"{name}: {desc}") in text
    d = AnalysisConfig()
    assert main(["analyze", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for value in (d.calib, d.n_samples, d.seq_len, d.max_positions, d.estimator, d.batch_size):
        assert f"(default: {value})" in text
    assert main(["eval", "--help"]) == 0
    assert f"(default: {EvalConfig().seq_len})" in " ".join(capsys.readouterr().out.split())


def test_version_and_estimator_listing(capsys):
    import mi_prun

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mi-prun {mi_prun.__version__}"
    assert main(["estimators"]) == 0
    out = capsys.readouterr().out
    for name in ("gaussian-channel", "gaussian-joint", "renyi-kernel", "binning", "ksg"):
        assert f"\n{name}: " in "\n" + out
    assert "preprocess (default: 'none')" in out  # gaussian-channel's own default, with a help line


def test_export_fills_provenance_itself(loaded, saved, tmp_path):
    analysis, _ = saved
    sel = select(analysis, n=2)
    out = export(prune(loaded.model, sel.removed), loaded.tokenizer, sel, tmp_path / "e",
                 analysis=analysis, loaded=loaded)
    record = json.loads((out / "mi_prun.json").read_text())
    assert record["estimator"] == analysis.estimator and record["calibration"] == json.loads(
        json.dumps(analysis.calibration))
    assert record["model"]["spec"] == "tiny-llama"
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    # a random tiny model has no hub id and no folder: its name, with a note, never a placeholder
    assert {s["sources"][0]["model"] for s in recipe["slices"]} == {"tiny-llama"} == {record["source_model"]}
    assert "a built-in random model, which mergekit cannot read" in (out / "mergekit.yaml").read_text()


def test_builtin_model_mergekit_source_is_its_hub_id():
    from mi_prun.models.zoo import hub_id

    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_select_refuses_settings_in_both_places(saved):
    analysis, _ = saved
    with pytest.raises(MiPrunError, match="either in config or as arguments"):
        select(analysis, config=SelectConfig(), run_cost="neg-mi")
    assert select(analysis, config=SelectConfig(), n=1).n == 1  # n / ratio may override the count


def test_capture_equals_a_reference_forward(loaded):
    """The captured h_b are the inputs of block b (hidden_states[b]) and h_L the input of the final
    norm, at the sampled positions, measured by a forward pass with no block hooks."""
    from mi_prun.capture import capture

    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (3, 20), generator=gen)
    cap = capture(model, ids, torch.ones_like(ids), max_positions=30, drop_first=True, seed=1)
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h_L", args[0].detach()))
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    rows, cols = cap.sample_index, cap.position
    L = cap.n_blocks
    for b in range(L):
        torch.testing.assert_close(cap.hidden[b], ref[b][rows, cols].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.hidden[L], seen["h_L"][rows, cols].float(), rtol=1e-5, atol=1e-5)
    assert (cols > 0).all()  # the attention-sink position was dropped


def test_model_identity_samples_large_tensors_inside_their_bounds():
    """A tensor of more than 2^24 elements (an LLM's embedding) must not index past its end."""
    from mi_prun.runtime.identity import model_identity
    from mi_prun.testing import tiny_model

    model, _ = tiny_model("llama", n_layers=2)
    big = torch.nn.Embedding(2**24 + 3, 1)
    with torch.no_grad():
        big.weight.zero_()
        big.weight[-1] = 7.0
    model.model.embed_tokens = big
    ident = model_identity(model)
    assert 7.0 in ident["weight_sample"]  # the last element is sampled, not one past it


def test_public_api_is_reexported():
    import mi_prun

    for name in mi_prun.__all__:
        assert getattr(mi_prun, name) is not None, name
    assert mi_prun.SelectConfig is SelectConfig and mi_prun.analyze is analyze
    import mi_prun.select as select_module  # a submodule name is never shadowed by a function

    assert select_module.select is select and "select" not in mi_prun.__all__


def test_export_refuses_an_analysis_of_another_model_unless_forced(saved, tmp_path):
    from mi_prun.config import ExportConfig

    analysis, _ = saved  # of tiny-llama; tiny-qwen2 has the same 6 blocks
    other = load_model("tiny-qwen2", device="cpu")
    sel = select(analysis, n=1)
    with pytest.raises(MiPrunError, match="another model"):
        export(prune(other.model, sel.removed), other.tokenizer, sel, tmp_path / "x", analysis=analysis,
               loaded=other)
    assert not (tmp_path / "x").exists()
    out = export(prune(other.model, sel.removed), other.tokenizer, sel, tmp_path / "x", analysis=analysis,
                 loaded=other, config=ExportConfig(force=True))
    assert json.loads((out / "mi_prun.json").read_text())["removed"] == list(sel.removed)
