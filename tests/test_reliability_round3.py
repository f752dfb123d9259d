"""Reliability round 3 (issue 23): no wrong answer with exit 0, no internal error, bounded memory
on any text. Each class of the issue is shown fixed where the user meets it (CLI or library);
docs/RELIABILITY.md cites these tests as `R3::test`.

CLI contract: a problem the user can fix exits with status 2 and one stderr line
`mi-prun: error: ...`; status 1 (`internal error`) is a bug and must never happen here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.models import load_model
from mi_prun.results import Analysis
from mi_prun.select import Selection, select
from mi_prun.select.verify import verified_select

SMALL = ["--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def llama_analysis(tmp_path_factory) -> Path:
    """The analysis of the zoo model tiny-llama (6 blocks), saved by the CLI."""
    folder = tmp_path_factory.mktemp("analyses") / "llama"
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(folder))
    assert rc == 0, err
    return folder


def _without_identity(src: Path, dst: Path) -> Path:
    """A copy of a saved analysis as format 1 wrote it before identities existed."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "analysis.json").read_text())
    del meta["model"]["identity"]
    (dst / "analysis.json").write_text(json.dumps(meta))
    return dst


# ---------------------------------------------------------------------------------------------
# 1a/1b: an analysis or selection is never applied to another model


def test_analysis_without_identity_refuses_another_model(tmp_path, llama_analysis):
    old = _without_identity(llama_analysis, tmp_path / "old")
    for other in ("tiny-gpt2", "tiny-qwen2"):  # 6 blocks each, like tiny-llama
        rc, _, err = run_cli("prune", "--model", other, "--analysis", str(old), "--n", "1",
                             "--out", str(tmp_path / f"x-{other}"))
        assert_one_line_error(rc, err, "another model", "--force")
        assert not (tmp_path / f"x-{other}").exists()
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(old), "--n", "1",
                         "--out", str(tmp_path / "same"))
    assert rc == 0, err
    rc, _, err = run_cli("prune", "--model", "tiny-qwen2", "--analysis", str(old), "--n", "1",
                         "--out", str(tmp_path / "forced"), "--force")
    assert rc == 0, err
    # a selection written from such an analysis carries the same record
    sel = tmp_path / "sel.json"
    rc, _, err = run_cli("select", str(old), "--n", "1", "--out", str(sel))
    assert rc == 0, err
    rc, _, err = run_cli("prune", "--model", "tiny-gpt2", "--selection", str(sel), "--out", str(tmp_path / "y"))
    assert_one_line_error(rc, err, "another model")


def test_library_select_and_verified_select_refuse_another_model(llama_analysis, tmp_path):
    other = load_model("tiny-qwen2")
    analyses = [Analysis.load(llama_analysis),
                Analysis.load(_without_identity(llama_analysis, tmp_path / "old"))]
    cfg = SelectConfig(n=2, verify_passes=4)
    for analysis in analyses:
        with pytest.raises(MiPrunError, match="another model"):
            verified_select(other, analysis, cfg)
        with pytest.raises(MiPrunError, match="another model"):
            select(analysis, config=cfg, model=other)
        with pytest.raises(MiPrunError, match="another model"):  # a method that is not verified, too
            select(analysis, config=cfg.replace(method="random"), model=other)
        forced = select(analysis, config=cfg, model=other, force=True)
        assert forced.verified and len(forced.removed) == 2
    same = verified_select(load_model("tiny-llama"), analyses[0], cfg)
    assert same.verified


def test_selection_check_model_uses_the_same_rule(llama_analysis):
    sel = select(Analysis.load(llama_analysis), n=1)
    stripped = Selection.from_dict({**sel.to_dict(), "provenance": {"model": {
        k: v for k, v in sel.provenance["model"].items() if k != "identity"}}})
    for s in (sel, stripped):
        with pytest.raises(MiPrunError, match="another model"):
            s.check_model(load_model("tiny-gpt2"))
        s.check_model(load_model("tiny-llama"))
