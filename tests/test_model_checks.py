"""What runs is what is reported: a config whose block count disagrees with the weight files is
refused on every load path (resident, device map, streamed), and the library refuses a model whose
config was changed after loading, an empty meta-device skeleton, and the wrong kind of argument.
docs/RELIABILITY.md cites these tests as `M::test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from mi_prun.config import AnalysisConfig
from mi_prun.errors import MiPrunError
from mi_prun.export import export
from mi_prun.runtime import load_model
from mi_prun.pipeline import analyze
from mi_prun.testing import tiny_model

SMALL = ["--samples", "4", "--tokens", "32"]
SMALL_CFG = AnalysisConfig(n_samples=4, seq_len=32)


def _saved(folder: Path, family: str, n_layers: int, config_says: int | None = None) -> Path:
    model, tok = tiny_model(family, n_layers=n_layers)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if config_says is not None:
        cfg = json.loads((folder / "config.json").read_text())
        key = next(k for k in ("num_hidden_layers", "n_layer") if k in cfg)
        cfg[key] = config_says
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


PATHS = {"resident": {}, "streamed": {"offload": True}, "device-map": {"device_map": "cpu"}}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("weights,says", [(6, 4), (3, 5)])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_block_count_of_config_and_weights_checked_on_every_load_path(tmp_path, family, weights, says, path):
    folder = _saved(tmp_path / "m", family, weights, config_says=says)
    with pytest.raises(MiPrunError, match=fr"says {says} blocks but its weights hold {weights}\b.*Fix: export or download"):
        load_model(folder, device="cpu", **PATHS[path])


def test_streamed_analyze_of_a_lowered_config_is_refused_in_one_line(tmp_path):
    folder = _saved(tmp_path / "m", "llama", 6, config_says=4)
    rc, _, err = run_cli("analyze", "--model", str(folder), "--stream", *SMALL, "--out", str(tmp_path / "a"))
    assert_one_line_error(rc, err, "says 4 blocks but its weights hold 6", "Fix:")
    assert not (tmp_path / "a").exists()
    folder_ok = _saved(tmp_path / "ok", "llama", 6)  # an unedited folder streams as before
    assert load_model(folder_ok, device="cpu", stream=True).n_blocks == 6


def test_analyze_refuses_a_config_changed_after_loading():
    loaded = load_model("tiny-llama")
    loaded.model.config.num_hidden_layers = 4  # the forward would now run layers[:4] of 6
    with pytest.raises(MiPrunError, match="holds 6 blocks but its config says 4.*run 4 of them.*Fix:"):
        analyze(loaded, SMALL_CFG)
    loaded.model.config.num_hidden_layers = 6
    assert len(analyze(loaded, SMALL_CFG).block_mi) == 6


def test_meta_device_models_are_refused(tmp_path):
    loaded = load_model("tiny-llama")
    skeleton = loaded.model.to("meta")  # an empty skeleton: nothing to run or save
    loaded.model = skeleton
    with pytest.raises(MiPrunError, match="weights on the meta device.*Fix: load it with mi_prun.load_model"):
        analyze(loaded, SMALL_CFG)
    with pytest.raises(MiPrunError, match="weights on the meta device"):
        export(skeleton, loaded.tokenizer, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    pytest.importorskip("lm_eval")
    from mi_prun.zeroshot import zero_shot
    from test_task_inputs import write_task

    with pytest.raises(MiPrunError, match="weights on the meta device"):
        zero_shot(skeleton, loaded.tokenizer, str(write_task(tmp_path / "task")))
    assert torch.device("meta") == next(skeleton.parameters()).device


def test_a_dict_where_a_config_is_expected_names_the_constructor(tmp_path):
    from mi_prun.config import SelectConfig
    from mi_prun.models import prune
    from mi_prun.select import select

    loaded = load_model("tiny-llama")
    analysis = analyze(loaded, SMALL_CFG)
    with pytest.raises(MiPrunError, match=r"the settings must be a SelectConfig, got a dict of settings\. "
                                          r"Fix: pass SelectConfig\(n=2\)"):
        select(analysis, {"n": 2})
    with pytest.raises(MiPrunError, match=r"config must be a SelectConfig, got a dict.*SelectConfig\(n=2\)"):
        select(analysis, config={"n": 2})
    with pytest.raises(MiPrunError, match=r"config must be an AnalysisConfig, got a dict.*AnalysisConfig\(n_samples=4\)"):
        analyze(loaded, {"n_samples": 4})
    with pytest.raises(MiPrunError, match=r"must be an ExportConfig, got a dict.*ExportConfig\(overwrite=True\)"):
        export(prune(loaded.model, [1]), loaded.tokenizer, None, tmp_path / "x", config={"overwrite": True})
    assert select(analysis, SelectConfig(n=2)).n == 2


def test_evaluation_and_healing_name_a_dict_config_as_its_constructor_call():
    from mi_prun.evaluate import evaluate
    from mi_prun.heal import heal

    with pytest.raises(MiPrunError, match=r"config must be an EvalConfig, got a dict.*EvalConfig\(max_windows=4\)"):
        evaluate(object(), None, config={"max_windows": 4})
    with pytest.raises(MiPrunError, match=r"config must be a HealConfig, got a dict.*HealConfig\(n_samples=4\)"):
        heal(object(), (1,), object(), config={"n_samples": 4})
