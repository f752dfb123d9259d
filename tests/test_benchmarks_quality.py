"""The quality benchmark's quick mode runs end to end, so the script cannot rot (not a timed test)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_quick_mode_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality-tiny-llama-quick.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert {"shortgpt", "angular", "sleb"} <= methods
    assert any(r["default"] for r in result["rows"])
    for r in result["rows"]:
        assert r["n"] in (1, 2) and len(r["removed"]) == r["n"]
        assert r["ppl"] > 1.0
    sleb = [r for r in result["rows"] if r["method"] == "sleb"]
    assert sleb and all(r["forward_passes"] > 0 for r in sleb)
    assert (tmp_path / "quality-tiny-llama-quick.md").read_text().count("| sleb |") == 1
    assert (tmp_path / "quality-tiny-llama-quick.png").stat().st_size > 1000
