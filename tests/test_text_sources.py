"""Text sources are checked before the model loads, and text full of placeholders is named with
the fix. docs/RELIABILITY.md cites these tests as `Text::test`."""

from __future__ import annotations

import logging

import pytest

import mi_prun.cli.commands as commands
from cli_helpers import assert_one_line_error, run_cli
from mi_prun.data import calibration_tokens, load_text
from mi_prun.runtime import load_model

SMALL = ["--samples", "8", "--tokens", "48"]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the text sources were checked")

    monkeypatch.setattr(commands, "load_model", refuse)


@pytest.mark.parametrize("flags,fragment", [
    (["prune", "--model", "tiny-llama", "--n", "2", "--heal", "--heal-calib", "{missing}"], "--heal-calib text"),
    (["prune", "--model", "tiny-llama", "--n", "2", "--calib", "{missing}"], "--calib text"),
    (["analyze", "--model", "tiny-llama", "--calib", "{missing}"], "--calib text"),
    (["eval", "--model", "tiny-llama", "--data", "{missing}"], "--data text"),
    (["prune", "--model", "tiny-llama", "--n", "2", "--verify-on", "{missing}"], "--verify-on text"),
])
def test_missing_text_files_are_found_before_the_model_loads(tmp_path, no_model_load, flags, fragment):
    missing = str(tmp_path / "nope.txt")
    argv = [a.replace("{missing}", missing) for a in flags]
    if argv[0] == "prune":
        argv += ["--out", str(tmp_path / "p")]
    rc, _, err = run_cli(*argv)
    assert_one_line_error(rc, err, fragment, "nope.txt' not found", "Fix:")


def test_text_full_of_placeholders_is_named_with_the_fix(data_dir, tmp_path, caplog):
    tok = load_model("tiny-llama").tokenizer
    # WikiText-2's tokenised release given as a file (5 % of its words are <unk>)
    release = tmp_path / "valid.tokens"
    release.write_text((data_dir / "wikitext2-valid.tokens").read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mi_prun.data"):
        calibration_tokens(tok, load_text(str(release)), 4, 32)
    warned = [r.getMessage() for r in caplog.records if "placeholders" in r.getMessage()]
    assert len(warned) == 1 and "% of its words are placeholders such as <unk>" in warned[0]
    assert "Fix: use text without them" in warned[0] and str(release) in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mi_prun.data"):
        calibration_tokens(tok, load_text("wikitext2"), 4, 32)  # the same split without <unk>: no warning
        calibration_tokens(tok, load_text("builtin"), 4, 32)
    assert not [r for r in caplog.records if "placeholders" in r.getMessage()]
