"""No flag is given and then silently not used: the verification flags of `select` and `prune`
that no verification would read are refused in one line naming why, and what task-based
verification scored is printed as such. docs/RELIABILITY.md cites these tests as `Flags::test`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli

SMALL = ["--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("analyses") / "llama"
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(folder))
    assert rc == 0, err
    return folder


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    pytest.importorskip("lm_eval")
    from test_zeroshot import write_task

    return write_task(tmp_path_factory.mktemp("task"))


CASES = {
    "verify-items without verify-on": (["--verify-items", "3"], "--verify-items would be ignored",
                                       "no --verify-on is given"),
    "verify-items with a text": (["--verify-on", "builtin", "--verify-items", "3"], "--verify-items would be ignored",
                                 "builtin is a text, not a task"),
    "verify-on with verify-passes 0": (["--verify-on", "builtin", "--verify-passes", "0"],
                                       "--verify-on would be ignored", "--verify-passes 0 turns verification off"),
    "verify-on with an unverified method": (["--method", "shortgpt", "--verify-on", "builtin"],
                                            "--verify-on would be ignored", "method shortgpt is not verified"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_select_and_prune_refuse_verification_flags_nothing_reads(analysis, tmp_path, case):
    flags, *fragments = CASES[case]
    rc, _, err = run_cli("select", str(analysis), "--n", "2", "--model", "tiny-llama", *flags)
    assert_one_line_error(rc, err, *fragments, "Fix: drop it")
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(analysis), "--n", "2", *flags,
                         "--out", str(tmp_path / "p"))
    assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / "p").exists()


def test_verify_on_with_heal_names_the_healing_default(analysis, tmp_path):
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(analysis), "--n", "2", "--heal",
                         "--verify-on", "builtin", "--out", str(tmp_path / "p"))
    assert_one_line_error(rc, err, "--verify-on would be ignored", "the default with --heal",
                          "give --verify-passes N")
    rc, _, err = run_cli("select", str(analysis), "--n", "2", "--verify-on", "builtin")
    assert_one_line_error(rc, err, "--verify-on would be ignored", "no --model is given")


def test_task_verification_says_what_it_scored(analysis, task):
    rc, out, err = run_cli("select", str(analysis), "--n", "2", "--model", "tiny-llama", "--verify-on", str(task),
                           "--verify-items", "4", "--verify-passes", "3")
    assert rc == 0, err
    assert "on 4 items of tiny_mc" in out and "None" not in out
