"""Records in an export's `mi_prun.json` and elsewhere say what happened, and are never lost:
zero-shot records written by several processes at once, an export replaced while it is evaluated,
damaged earlier records, the source model and the method that chose the blocks.
docs/RELIABILITY.md cites these tests as `Rec::test`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mi_prun.errors import MiPrunError
from mi_prun.export import export
from mi_prun.models import prune
from mi_prun.runtime import load_model
from mi_prun.zeroshot import TaskScore, ZeroShotResult, export_stamp, record_zero_shot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _export(tiny, out: Path, removed=(2,), overwrite: bool = False) -> Path:
    return export(prune(tiny.model, list(removed)), tiny.tokenizer, None, out, overwrite=overwrite)


def _result(*names: str, acc: float = 0.5) -> ZeroShotResult:
    return ZeroShotResult(tasks=tuple(TaskScore(task=n, acc=acc, acc_stderr=0.1, samples=4) for n in names),
                          lm_eval_version="0.4.13", num_fewshot=0, limit=None, seconds=0.0)


WRITER = """
import sys
from mi_prun.zeroshot import TaskScore, ZeroShotResult, record_zero_shot
folder, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    res = ZeroShotResult(tasks=(TaskScore(task=f"{tag}-{i}", acc=0.5, acc_stderr=0.1, samples=4),),
                         lm_eval_version="x", num_fewshot=0, limit=None, seconds=0.0)
    record_zero_shot(folder, res)
"""


def test_concurrent_record_writers_lose_no_record(tiny, tmp_path):
    out = _export(tiny, tmp_path / "exp")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), f"p{k}", "25"], cwd=ROOT)
             for k in range(3)]
    threads = [threading.Thread(target=lambda k=k: [record_zero_shot(out, _result(f"t{k}-{i}")) for i in range(25)])
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(timeout=300) == 0 for p in procs)
    tasks = json.loads((out / "mi_prun.json").read_text())["zero_shot"]["tasks"]
    expected = {f"p{k}-{i}" for k in range(3) for i in range(25)} | {f"t{k}-{i}" for k in range(2) for i in range(25)}
    assert set(tasks) == expected  # 125 records, none lost
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_export_replaced_while_evaluated_gets_no_record(tiny, tmp_path):
    out = _export(tiny, tmp_path / "exp", removed=(2,))
    stamp = export_stamp(out)
    _export(tiny, out, removed=(1, 4), overwrite=True)  # another process: prune --overwrite
    with pytest.raises(MiPrunError, match="was replaced by another export while this one was evaluated.*Fix:"):
        record_zero_shot(out, _result("tiny_mc"), stamp=stamp)
    meta = json.loads((out / "mi_prun.json").read_text())
    assert "zero_shot" not in meta and meta["removed"] == [1, 4]
    record_zero_shot(out, _result("tiny_mc"), stamp=export_stamp(out))  # the export that is there: recorded
    assert "tiny_mc" in json.loads((out / "mi_prun.json").read_text())["zero_shot"]["tasks"]


def test_cli_eval_records_only_into_the_export_it_evaluated(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from cli_helpers import assert_one_line_error, run_cli
    from test_zeroshot import write_task

    import mi_prun.cli.commands as commands

    task = write_task(tmp_path / "task")
    out = _export(tiny, tmp_path / "exp", removed=(2,))
    real = commands.zero_shot

    def evaluate_then_replaced(*args, **kwargs):
        res = real(*args, **kwargs)
        _export(tiny, out, removed=(0, 5), overwrite=True)  # prune --overwrite finished meanwhile
        return res

    monkeypatch.setattr(commands, "zero_shot", evaluate_then_replaced)
    rc, _, err = run_cli("eval", "--model", str(out), "--data", "text:" + "hello world " * 40, "--seq-len", "32",
                         "--tasks", str(task), "--limit", "3")
    assert_one_line_error(rc, err, "was replaced by another export", "not recorded")
    meta = json.loads((out / "mi_prun.json").read_text())
    assert meta["removed"] == [0, 5] and "zero_shot" not in meta


@pytest.mark.parametrize("damage", [[1, 2], "text", {"tasks": ["a"]}, {"tasks": {"old": 3, "kept": {"acc": 0.25}}}])
def test_damaged_zero_shot_records_are_replaced_with_a_warning(tiny, tmp_path, caplog, damage):
    out = _export(tiny, tmp_path / "exp")
    meta = json.loads((out / "mi_prun.json").read_text())
    (out / "mi_prun.json").write_text(json.dumps({**meta, "zero_shot": damage}))
    with caplog.at_level(logging.WARNING, logger="mi_prun.zeroshot"):
        record_zero_shot(out, _result("new"))
    assert "mi_prun.json" in caplog.text and ("damaged" in caplog.text or "replaced" in caplog.text)
    tasks = json.loads((out / "mi_prun.json").read_text())["zero_shot"]["tasks"]
    assert "new" in tasks and "old" not in tasks
    assert ("kept" in tasks) == (isinstance(damage, dict) and isinstance(damage.get("tasks"), dict))


def test_source_model_is_the_real_path_or_name(tiny, tmp_path):
    import yaml

    from cli_helpers import run_cli

    folder = tmp_path / "orig"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    rc, _, err = run_cli("prune", "--model", str(folder), "--n", "1", "--samples", "8", "--tokens", "32",
                         "--out", str(tmp_path / "p"))
    assert rc == 0, err
    meta = json.loads((tmp_path / "p" / "mi_prun.json").read_text())
    assert meta["source_model"] == str(folder.resolve()) and "source_note" not in meta
    recipe = yaml.safe_load((tmp_path / "p" / "mergekit.yaml").read_text())
    assert {s["sources"][0]["model"] for s in recipe["slices"]} == {str(folder.resolve())}
    # the library, given only the pruned model loaded from that folder, finds it too
    loaded = load_model(folder)
    out = export(prune(loaded.model, [1]), loaded.tokenizer, None, tmp_path / "lib")
    assert json.loads((out / "mi_prun.json").read_text())["source_model"] == str(folder.resolve())
    # a built-in random model: its name and a note, never a placeholder
    out = export(prune(tiny.model, [1]), tiny.tokenizer, None, tmp_path / "t", loaded=tiny)
    meta = json.loads((out / "mi_prun.json").read_text())
    assert meta["source_model"] == "tiny-llama" and "built-in random model" in meta["source_note"]


def test_verified_export_says_what_chose_the_set(tiny, tmp_path):
    from mi_prun.config import AnalysisConfig, SelectConfig
    from mi_prun.pipeline import analyze
    from mi_prun.select import select

    analysis = analyze(tiny, AnalysisConfig(n_samples=8, seq_len=32))
    sel = select(analysis, SelectConfig(n=2, verify_passes=4), model=tiny)
    assert sel.verified and sel.winner_source
    out = export(prune(tiny.model, sel.removed), tiny.tokenizer, sel, tmp_path / "v", analysis=analysis, loaded=tiny)
    meta = json.loads((out / "mi_prun.json").read_text())
    assert meta["method"] == sel.method
    assert meta["chosen_by"].startswith("verified search") and \
        meta["chosen_by"].endswith(f"the winning set was proposed by {sel.winner_source}")
    one = select(analysis, SelectConfig(n=2, verify_passes=0))
    out = export(prune(tiny.model, one.removed), tiny.tokenizer, one, tmp_path / "o", analysis=analysis)
    assert json.loads((out / "mi_prun.json").read_text())["chosen_by"] == f"{one.method} (one pass, not verified)"


def test_progress_line_rounds_kendall_tau(tiny):
    import re

    from mi_prun.config import AnalysisConfig
    from mi_prun.pipeline import analyze

    lines: list[str] = []
    analyze(tiny, AnalysisConfig(n_samples=8, seq_len=32), progress=lambda stage, frac, msg="": lines.append(msg))
    tau = [m for m in lines if "Kendall tau" in m]
    assert tau and all(re.fullmatch(r"Kendall tau between halves: (-?\d\.\d{3}|n/a)", m) for m in tau), tau
