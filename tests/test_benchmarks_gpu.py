"""benchmarks/gpu.sh and the Python it runs: the tiny shape goes through exactly the code the 8B and
70B shapes run (random weights, analysis, verified selection, healing, perplexity; whole on the
device and streamed), so the GPU script cannot rot on a machine without a GPU. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = ["forward", "analysis", "verified_selection", "heal", "perplexity"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result: dict, device: str) -> None:
    assert list(result["stages"]) == STAGES
    for name, row in result["stages"].items():
        assert row["seconds"] > 0 and math.isfinite(row["tokens_per_s"]) and row["peak_rss_bytes"] > 0, name
        assert (row["peak_device_bytes"] is not None) == (device == "cuda"), name
        if name != "forward":
            assert math.isfinite(row["ratio_to_forward"]) and row["ratio_to_forward"] > 0
    assert result["stages"]["verified_selection"]["passes"] >= 1
    assert result["stages"]["heal"]["runs"] >= 1


def test_tiny_shape_runs_both_modes_on_cpu(tmp_path):
    bench = _bench()
    out = tmp_path / "gpu.json"
    assert bench.main(["--shapes", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["results"]] == ["memory", "stream"]
    for result in data["results"]:
        _check(result, "cpu")
    memory, stream = data["results"]
    # the same random weights either way: the dense model's NLL on the same tokens agrees
    assert stream["stages"]["forward"]["nll"] == pytest.approx(memory["stages"]["forward"]["nll"], rel=1e-4)
    assert stream["stages"]["verified_selection"]["removed"] == memory["stages"]["verified_selection"]["removed"]


def test_shapes_are_llama3_8b_and_70b():
    bench = _bench()
    c8, c70 = bench.llama_config("8b"), bench.llama_config("70b")
    assert (c8.hidden_size, c8.num_hidden_layers, c8.num_attention_heads, c8.num_key_value_heads,
            c8.intermediate_size, c8.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert (c70.hidden_size, c70.num_hidden_layers, c70.num_attention_heads, c70.num_key_value_heads,
            c70.intermediate_size, c70.vocab_size) == (8192, 80, 64, 8, 28672, 128256)
    assert bench.SHAPES["70b"]["mode"] == "stream"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_sh_fails_fast_without_cuda():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and proc.stderr.count("\n") <= 2
    assert not (BENCH / "results" / "gpu.json").exists() or "gpu.json" not in proc.stdout
    assert _bench().main(["--shapes", "tiny", "--device", "cuda"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_shape_runs_on_cuda_in_bfloat16(tmp_path):
    out = tmp_path / "gpu.json"
    assert _bench().main(["--shapes", "tiny", "--device", "cuda", "--out", str(out)]) == 0
    for result in json.loads(out.read_text())["results"]:
        assert result["dtype"] == "bfloat16"
        _check(result, "cuda")
