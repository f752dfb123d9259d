"""Selection files and saved analyses that do not say what a prune needs: an empty, missing or
total `removed`, and arrays of another length than the recorded block count, are refused in one
line saying which. docs/RELIABILITY.md cites these tests as `Sel::test`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli

SMALL = ["--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(analysis folder, selection file) of tiny-llama (6 blocks), written by the CLI."""
    root = tmp_path_factory.mktemp("saved")
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(root / "a"))
    assert rc == 0, err
    rc, _, err = run_cli("select", str(root / "a"), "--n", "2", "--out", str(root / "s.json"))
    assert rc == 0, err
    return root / "a", root / "s.json"


def _edited(src: Path, dst: Path, **changes) -> Path:
    record = json.loads(src.read_text())
    record.update(changes)
    for derived in ("n", "kept", "runs"):  # as a hand edit of `removed` would leave them, or without them
        record.pop(derived, None)
    dst.write_text(json.dumps(record))
    return dst


CASES = {
    "empty": ([], "removes no block (removed: [])", "Fix: select at least one block"),
    "null": (None, "'removed' must be a list of block numbers (from 0), got null"),
    "a number": (3, "'removed' must be a list of block numbers (from 0), got int"),
    "every block": (list(range(6)), "removes all 6 blocks", "Fix: select fewer blocks"),
    "twice": ([1, 1], "names block(s) [1] more than once"),
    "out of range": ([2, 6], "block(s) [6] out of range for 6 blocks (numbered from 0 to 5)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_selection_removed_that_cannot_be_pruned_is_named(saved, tmp_path, case):
    removed, *fragments = CASES[case]
    sel = _edited(saved[1], tmp_path / "s.json", removed=removed)
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--selection", str(sel), "--out", str(tmp_path / "p"))
    line = assert_one_line_error(rc, err, *fragments, "Fix:")
    assert "inconsistent" not in line and "TypeError" not in line
    assert not (tmp_path / "p").exists()


def test_derived_fields_that_disagree_are_named(saved, tmp_path):
    record = json.loads(saved[1].read_text())
    (tmp_path / "s.json").write_text(json.dumps({**record, "kept": [0, 1, 2, 3, 4, 5]}))
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--selection", str(tmp_path / "s.json"),
                         "--out", str(tmp_path / "p"))
    assert_one_line_error(rc, err, "inconsistent: kept disagree(s) with removed")


def test_show_refuses_arrays_of_another_length_than_the_recorded_block_count(saved, tmp_path):
    folder = shutil.copytree(saved[0], tmp_path / "a")
    meta = json.loads((folder / "analysis.json").read_text())
    meta["model"]["n_blocks"] = 8
    (folder / "analysis.json").write_text(json.dumps(meta))
    for argv in (("show", str(folder)), ("select", str(folder), "--n", "2")):
        rc, _, err = run_cli(*argv)
        assert_one_line_error(rc, err, "array 'block_mi' holds 6 blocks but the analysis records a model of 8 blocks",
                              "Fix: run the analysis again")
