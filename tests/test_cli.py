"""The CLI end to end on a tiny random model, and its one-line errors (exit status 2)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mi_prun.cli import main
from mi_prun.results import Analysis

TINY = ["--model", "tiny-llama", "--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["--quiet", "analyze", *TINY, "--out", str(out)]) == 0
    return out


def test_analyze_prints_ranking_and_saves(analysis_dir, capsys):
    a = Analysis.load(analysis_dir)
    assert a.n_blocks == 6 and a.span.shape == (7, 7)
    assert main(["show", str(analysis_dir)]) == 0
    out = capsys.readouterr().out
    assert "numbered from 0" in out and "cosine BI" in out
    top = a.ranking()[0]
    first_row = [line for line in out.splitlines() if line.strip().startswith("0 ")][0].split()
    assert int(first_row[1]) == top  # rank 0 is the block with the highest MI


def test_select_and_compare(analysis_dir, capsys):
    from mi_prun.config import SelectConfig
    from mi_prun.select import compare, select

    a = Analysis.load(analysis_dir)
    assert main(["select", str(analysis_dir), "--n", "2", "--method", "exact"]) == 0
    out = capsys.readouterr().out
    assert f"remove 2 of 6 blocks: {list(select(a, 'exact', n=2).removed)}" in out
    assert main(["select", str(analysis_dir), "--ratio", "0.34", "--compare"]) == 0
    out = capsys.readouterr().out
    rows = {r["method"]: r for r in compare(a, config=SelectConfig(ratio=0.34))}
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    for method in ("fbs", "local", "exact", "exhaustive"):
        r = rows[method]
        assert str(r["removed"]) in lines[method]  # the library's set, on the method's own row
        assert f"{r['objective']:.6g}" in lines[method]
    assert rows["exact"]["gap"] == 0 and rows["exhaustive"]["gap"] == pytest.approx(0, abs=1e-12)


def test_prune_exports_loadable_model(analysis_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--analysis", str(analysis_dir), "--n", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "mi_prun.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert len(report["removed"] if "removed" in report else report["selection"]["removed"]) == 2
    # refusing to overwrite without --overwrite, and keeping the existing export
    assert main(["--quiet", "prune", "--model", "tiny-llama", "--analysis", str(analysis_dir), "--n", "1",
                 "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert main(["--quiet", "eval", "--model", str(out), "--data", "builtin", "--seq-len", "32",
                 "--max-windows", "2"]) == 0
    assert "seq_len 32, 2 windows" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["analyze", *TINY, "--estimator", "nope"], "nope"),
    (["analyze", "--model", "./missing-model", "--samples", "2"], "not found"),
    (["analyze", *TINY, "--calib", "text:too short"], "not enough calibration text"),
    (["analyze", "--model", "tiny-llama", "--tokens", "100000"], "exceed the context"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mi-prun: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_select_bad_ratio(analysis_dir, capsys):
    assert main(["select", str(analysis_dir), "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err


def test_debug_shows_traceback(capsys):
    from mi_prun.errors import MiPrunError

    with pytest.raises(MiPrunError):
        main(["--debug", "--quiet", "analyze", *TINY, "--estimator", "nope"])


@pytest.mark.real_model
def test_analyze_smollm2_small(tmp_path, capsys):
    out = tmp_path / "smol"
    assert main(["--quiet", "analyze", "--model", "smollm2-135m", "--samples", "4", "--tokens", "64",
                 "--positions", "256", "--out", str(out)]) == 0
    a = Analysis.load(out)
    assert a.n_blocks == 30 and torch.isfinite(torch.from_numpy(a.block_mi)).all()
    assert "smollm2-135m" in capsys.readouterr().out


def test_progress_bars_say_the_time_left_from_the_stage_s_own_rate():
    """The CLI's bar text: the library's message and the time left, estimated from the progress
    since the stage's first report (0.0 when it starts); a stage run again starts over."""
    from mi_prun.cli.output import TqdmProgress
    from mi_prun.progress import TimeLeft, time_left_text

    now = [0.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left.update("verify", 0.0) is None
    now[0] = 10.0
    assert left.update("verify", 0.25) == pytest.approx(30.0)  # 10 s for a quarter: 30 s for the rest
    now[0] = 20.0
    assert left.update("verify", 0.5) == pytest.approx(20.0)
    assert left.update("verify", 0.1) is None  # went back: the stage started over
    assert left.update("verify", 1.0) == 0.0
    assert time_left_text(None) == "estimating the time left" and time_left_text(30) == "about 30 s left"
    assert time_left_text(600) == "about 10 min left"
    bars = TqdmProgress(enabled=True, clock=lambda: now[0])
    bars("verify", 0.0, "0 of at most 22 sets scored")
    now[0] = 30.0
    bars("verify", 0.5, "set 11 of at most 22 (11 left in the budget)")
    text = bars.bars["verify"].postfix
    assert "11 left in the budget" in text and "about 10 s left" in text
    bars("verify", 1.0, "done")
    assert "verify" not in bars.bars
    bars.close()


def test_prune_reports_verification_progress_with_passes_left_and_time_left(tmp_path, capsys):
    """A verified prune shows, on stderr, how many sets of the budget are left and the time left."""
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--n", "2", "--verify-tokens", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "left in the budget" in err and ("s left" in err or "almost done" in err)


def test_prune_runs_every_registered_method(analysis_dir, tmp_path, capsys):
    """Every method `--method` offers exports a loadable model through `prune` (sleb used to fail
    always: the CLI passed the attention mask as sleb_select's `n`)."""
    from mi_prun.select import SELECTORS

    for method in sorted(SELECTORS):
        out = tmp_path / method
        rc = main(["--quiet", "prune", "--model", "tiny-llama", "--analysis", str(analysis_dir),
                   "--method", method, "--n", "2", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 0, (method, err)
        meta = json.loads((out / "mi_prun.json").read_text())
        assert meta["method"] == method and len(meta["removed"]) == 2, (method, meta)
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
