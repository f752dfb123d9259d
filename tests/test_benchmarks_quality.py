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


def _quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def _shipped_options() -> dict:
    from mi_prun.config import AnalysisConfig, SelectConfig

    a, s = AnalysisConfig(), SelectConfig()
    return {"estimator": a.estimator, "estimator_options": dict(a.estimator_options), "drop_first": a.drop_first,
            "selector": s.method, "run_cost": s.run_cost, "protect_ends": s.protect_ends}


def test_rerender_marks_the_shipped_defaults(tmp_path):
    """Re-marking defaults in a results file needs no measurement and keeps every number."""
    quality = _quality()
    opts = _shipped_options()
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
    assert again["defaults"]["selector"] == opts["selector"] and again["defaults"]["run_cost"] == opts["run_cost"]


def test_default_row_is_the_default_estimate_not_its_spelling():
    """gaussian-channel with no preprocessing, centring or standardising is one estimate: each is the
    shipped default; per-token RMS scaling, another first-position choice or selector is not."""
    quality = _quality()
    opts = _shipped_options()
    assert opts["estimator"] == "gaussian-channel"
    for est_opts in ({}, {"preprocess": "none"}, {"preprocess": "standardize"}, {"preprocess": "center"}):
        assert quality.is_default_row({**opts, "estimator_options": est_opts}), est_opts
    assert not quality.is_default_row({**opts, "estimator_options": {"preprocess": "rms"}})
    assert not quality.is_default_row({**opts, "drop_first": not opts["drop_first"]})
    assert not quality.is_default_row({**opts, "protect_ends": True})
    assert not quality.is_default_row({**opts, "protect_ends": False})
    assert not quality.is_default_row({**opts, "run_cost": "neg-mi"})
    assert not quality.is_default_row({**opts, "estimator": "gaussian-joint"})


def test_grid_has_one_row_per_estimate_and_former_labels_are_renamed(tmp_path):
    quality = _quality()
    keys = [quality.estimate_key(est, o) for _, est, o in quality.ESTIMATOR_GRID]
    assert len(keys) == len(set(keys)), "two grid rows compute the same estimate"
    labels = [label for label, _, _ in quality.ESTIMATOR_GRID]
    assert "gauss-ch" in labels and "gauss-ch/std" not in labels and "gauss-ch/none" not in labels
    assert quality.label_list("gauss-ch/std,gauss-ch/rms") == ["gauss-ch", "gauss-ch/rms"]

    opts = {**_shipped_options(), "estimator_options": {"preprocess": "standardize"}}
    rows = [{"method": m, "family": "mi-prun", "n": 2, "removed": [1, 2], "ppl": p, "options": opts,
             "analysis_seconds": 1.0, "select_seconds": 0.0, "forward_passes": 0, "objective": None,
             "default": False}
            for m, p in (("mi-prun gauss-ch/std fbs/neg-log-nmi protect-0.1", 63.55),
                         ("mi-prun gauss-ch/std +first topk", 59.2), ("mi-prun gauss-ch/rms topk", 299.0))]
    rows[1]["options"] = {**opts, "drop_first": False, "selector": "topk", "run_cost": "neg-mi", "protect_ends": False}
    rows[2]["options"] = {**opts, "estimator_options": {"preprocess": "rms"}, "selector": "topk", "run_cost": "neg-mi",
                          "protect_ends": False}
    result = {"name": "x", "command": "cmd --estimators gauss-ch/std", "model": {"spec": "m", "n_blocks": 30},
              "dense_ppl": 40.0, "rows": rows,
              "protocol": {"calibration": {"n_samples": 1, "seq_len": 2, "source": "s"}, "eval_source": "e",
                           "eval_seq_len": 256, "eval_windows": 40, "eval_tokens": 10200, "bos": False}}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(result))
    quality.rerender(path, [2], plot_it=False)
    again = json.loads(path.read_text())
    assert [r["method"] for r in again["rows"]] == ["mi-prun gauss-ch fbs/neg-log-nmi protect-0.1",
                                                    "mi-prun gauss-ch +first topk", "mi-prun gauss-ch/rms topk"]
    assert [r["ppl"] for r in again["rows"]] == [63.55, 59.2, 299.0]
    assert [r["options"] for r in again["rows"]] == [r["options"] for r in rows]  # as measured
    assert [r["default"] for r in again["rows"]] == [True, False, False]
    assert again["relabelled"] == {"gauss-ch/std": "gauss-ch"}
    md = path.with_suffix(".md").read_text()
    assert "gauss-ch/std fbs" not in md and "**mi-prun gauss-ch fbs/neg-log-nmi protect-0.1 (default)**" in md
    quality.rerender(path, [2], plot_it=False)  # idempotent
    assert json.loads(path.read_text()) == again
