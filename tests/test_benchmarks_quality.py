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


def test_rerender_marks_the_shipped_defaults(tmp_path):
    """Re-marking defaults in a results file needs no measurement and keeps every number."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    from mi_prun import defaults

    opts = {"estimator": defaults.ESTIMATOR, "estimator_options": dict(defaults.ESTIMATOR_OPTIONS),
            "drop_first": defaults.DROP_FIRST, "selector": defaults.SELECTOR, "run_cost": defaults.RUN_COST,
            "protect_ends": defaults.PROTECT_ENDS}
    other = {**opts, "selector": "topk-other"}
    rows = [{"method": name, "family": "mi-prun", "n": 4, "removed": [1, 2, 3, 4], "ppl": ppl, "options": o,
             "analysis_seconds": 1.0, "select_seconds": 0.0, "forward_passes": 0, "objective": None,
             "default": False} for name, ppl, o in (("a", 50.0, opts), ("b", 60.0, other))]
    result = {"name": "x", "command": "cmd", "model": {"spec": "m", "n_blocks": 30}, "dense_ppl": 40.0,
              "protocol": {"calibration": {"n_samples": 1, "seq_len": 2, "source": "s"}, "eval_source": "e",
                           "eval_seq_len": 256, "eval_windows": 40, "eval_tokens": 10200, "bos": False},
              "rows": rows}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(result))
    quality.rerender(path, [4], plot_it=False)
    again = json.loads(path.read_text())
    assert [r["default"] for r in again["rows"]] == [True, False]
    assert [r["ppl"] for r in again["rows"]] == [50.0, 60.0]
    assert "**a (default)**" in path.with_suffix(".md").read_text()
