"""benchmarks/scale.py on its tiny shape (the 8B run is the lead's, on a quiet machine): the random
model is written shard by shard and loads plainly, the analysis and the forward pass are measured in
fresh processes, and the JSON holds the ratios the benchmark reports. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_model_written_shard_by_shard_loads_plainly(tmp_path):
    from transformers import AutoModelForCausalLM

    from mi_prun.testing import random_model, write_random_model

    scale = _scale()
    config = scale.shape_config("tiny")
    folder = write_random_model(config, tmp_path / "m", dtype=torch.bfloat16, shard_bytes=2**20)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    direct = random_model(config, torch.bfloat16, "cpu")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name  # the same seeded values, written or built in memory


def test_tiny_headline_reports_rss_and_ratio(tmp_path):
    out = tmp_path / "scale.json"
    assert _scale().main(["--shape", "tiny", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    h = json.loads(out.read_text())["headline"]
    assert h["analysis"]["resources"]["offload"] is True and h["analysis"]["resources"]["weights_at"] == "disk"
    assert h["analysis_peak_rss_bytes"] > 0 and h["weights_bytes"] > 0
    assert h["ratio_analysis_over_forward"] == pytest.approx(h["analysis"]["seconds"] / h["forward"]["seconds"])
    assert len(h["analysis"]["block_mi"]) == 4 and h["forward"]["tokens_scored"] > 0


def test_workdir_inside_the_repository_is_refused(capsys):
    assert _scale().main(["--shape", "tiny", "--workdir", str(BENCH / "results" / "models")]) == 2
    assert "inside the repository" in capsys.readouterr().err
