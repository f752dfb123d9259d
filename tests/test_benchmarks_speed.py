"""The speed and stability benchmarks' quick modes run end to end, so the scripts cannot rot.

Benchmarks are not timed tests: these check the JSON's structure and that every number is finite,
never a timing. The speed quick mode builds its model with the same function gpu.sh uses for the
random Llama-2-7B (`build_random_llama`), with tiny dimensions.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite_numbers(obj, path="") -> list[str]:
    """Paths of every non-finite float in a JSON tree (None is allowed only where noted by callers)."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    return bad


@pytest.fixture(scope="module")
def speed_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    _script("speed").main(["--quick", "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


def test_speed_quick_writes_every_section(speed_result):
    r = speed_result
    for key in ("command", "environment", "capture_vs_forward", "span_scaling", "memory", "select",
                "e2e_vs_sleb"):
        assert key in r, key
    assert r["command"].startswith("python benchmarks/speed.py --quick")
    assert {"device", "torch", "threads", "transformers"} <= set(r["environment"])
    assert r["model_info"]["random_weights"] is True  # the gpu.sh builder, tiny shape
    assert _finite_numbers(r) == []

    cap = r["capture_vs_forward"]
    assert cap["median_ratio_capture_over_forward"] > 0
    assert len(cap["seconds"]["capture"]) == len(cap["seconds"]["forward"]) == cap["repeats"]

    span = r["span_scaling"]
    assert set(span["growth_law"]) == {"m", "L", "d"}
    assert all(row["seconds"] > 0 for row in span["model_shapes"])

    mem = r["memory"]
    assert [row["n_samples"] for row in mem["rows"]] == mem["n_samples"]
    # m is fixed for every calibration size, so the stored capture is exactly flat.
    assert mem["capture_bytes_ratio_max_over_min"] == 1.0


def test_speed_quick_select_and_sleb_rows(speed_result):
    from mi_prun.config import SelectConfig

    sel = speed_result["select"]
    # The shipped run cost, every block removable (the search space is C(L, n)).
    assert sel["run_cost"] == SelectConfig().run_cost and sel["protect_ends"] is False
    assert all(row["combinations"] == math.comb(sel["L"], row["n"]) for row in sel["rows"])
    assert [row["n"] for row in sel["rows"]] == [2, 3]
    for row in sel["rows"]:
        assert row["fbs"]["gap"] >= -1e-9  # never better than the optimum
        assert "refused" in row["exhaustive"] or abs(row["exhaustive"]["gap"]) < 1e-9
    assert any("refused" in row["exhaustive"] for row in sel["rows"])  # the refusal path runs
    e2e = speed_result["e2e_vs_sleb"]
    assert [row["n"] for row in e2e["rows"]] == [1, 2]
    L = speed_result["model_info"]["n_blocks"]
    assert e2e["rows"][-1]["sleb_forward_passes"] == L + (L - 1)


def test_random_llama2_7b_shape_is_llama2_7b():
    shape = _script("speed").RANDOM_SHAPES["random-llama2-7b"]
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
            shape["intermediate_size"], shape["vocab_size"]) == (4096, 32, 32, 11008, 32000)


def test_stability_quick(tmp_path):
    out = tmp_path / "stability.json"
    _script("stability").main(["--quick", "--device", "cpu", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python benchmarks/stability.py --quick")
    assert len(r["subsets"]) == 3
    assert len(r["methods"]) == 2 and "cosine_bi" in r["methods"]
    from mi_prun.config import AnalysisConfig, SelectConfig

    assert r["estimator"] == AnalysisConfig().estimator
    mi = r["methods"][f"mi:{r['estimator']}"]
    assert mi["removed_by"].startswith(f"{SelectConfig().method} (run cost {SelectConfig().run_cost}")
    for m in r["methods"].values():
        assert len(m["kendall_tau"]["pairs"]) == 3
        assert -1.0 <= m["kendall_tau"]["mean"] <= 1.0
        assert 0.0 <= m[f"top{r['top_k']}_overlap"]["mean"] <= 1.0
    assert _finite_numbers(r) == []
