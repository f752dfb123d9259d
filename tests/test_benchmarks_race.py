"""The race benchmark's quick mode runs end to end on a tiny model, so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_race_bench_quick_mode_writes_the_side_by_side_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "race_bench.py"), "--quick",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "race-tiny-llama-quick.json").read_text())
    rows = result["rows"]
    assert {(r["n"], r["variant"]) for r in rows} == {(n, v) for n in (1, 2) for v in ("off", "sets", "units")}
    for r in rows:
        assert len(r["removed"]) == r["n"] and r["test_ppl"] > 1.0 and r["seconds"] > 0
        assert r["sets_scored"] >= 1 and r["prune_over_analysis"] > 0
    assert result["analysis_seconds"] > 0 and result["eval"]["dense_ppl"] > 1.0
    md = (tmp_path / "race-tiny-llama-quick.md").read_text()
    lines = [line.split(" | ")[:2] for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert sorted(lines) == sorted([f"| {n}", v] for n in (1, 2) for v in ("off", "sets", "units"))
