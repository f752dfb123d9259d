"""Loading and block discovery for every supported family, without downloads."""

import pytest
import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models import BLOCK_PATHS, find_blocks, load_model, num_layers_of, resolve_device, resolve_dtype
from mi_prun.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_blocks_count_equals_config(family):
    model, _ = tiny_model(family, n_layers=5)
    blocks = find_blocks(model)
    assert len(blocks) == num_layers_of(model.config) == 5
    assert getattr(blocks.parent, blocks.attr) is blocks.blocks


def test_generic_fallback_finds_unknown_architecture():
    model, _ = tiny_model("llama", n_layers=4)
    model.config.model_type = "my-new-arch"  # not in the table: the fallback must find model.layers
    assert "my-new-arch" not in BLOCK_PATHS
    blocks = find_blocks(model)
    assert blocks.path == "model.layers" and len(blocks) == 4


def test_no_block_list_names_the_class():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird", "num_hidden_layers": 3})()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(MiPrunError, match="NoBlocks.*weird.*ModuleList of length 3"):
        find_blocks(NoBlocks())


def test_tiny_zoo_spec_loads():
    loaded = load_model("tiny-qwen3", device="cpu")
    assert loaded.n_blocks == 6 and loaded.model_type == "qwen3"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    d = loaded.describe()
    assert d["n_blocks"] == 6 and d["dtype"] == "float32"


def test_device_and_dtype_auto_on_cpu():
    dev = resolve_device("auto")
    assert dev.type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(MiPrunError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_unknown_model_and_non_model_folder(tmp_path):
    with pytest.raises(MiPrunError, match="not found"):
        load_model("./no/such/model")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MiPrunError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(MiPrunError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_saved_tiny_model_folder_loads(tmp_path):
    model, tok = tiny_model("gpt2", n_layers=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.n_blocks == 3
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.model(ids).logits, model(ids).logits)
