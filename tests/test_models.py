"""Loading and block discovery for every supported family, without downloads."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models import BLOCK_PATHS, ZOO, context_length, find_blocks, hub_id, num_layers_of, weights_bytes
from mi_prun.runtime import load_model, resolve_device, resolve_dtype
from mi_prun.testing import FAMILIES, VOCAB, tiny_model


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


# ----------------------------------------------------------------------------------------------
# paths, damaged folders, GGUF files, hub ids, context length


def save_tiny(folder, family="llama", n_layers=4, **overrides):
    model, tok = tiny_model(family, n_layers=n_layers, **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def write_tiny_gguf(path, n_layers=2, source_url=None):
    """A tiny Llama as an f32 GGUF file (embeddings tied to the LM head, as in SmolLM2)."""
    gguf = pytest.importorskip("gguf")
    model, _ = tiny_model("llama", n_layers=n_layers)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for b in range(n_layers):
        names.update({f"model.layers.{b}.{ours}.weight": f"blk.{b}.{theirs}.weight"
                      for ours, theirs in parts.items()})
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_block_count(n_layers)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if source_url:
        writer.add_string("general.source.repo_url", source_url)
    for key, tensor in model.state_dict().items():
        if key in names:
            writer.add_tensor(names[key], tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_model_spec_may_be_a_path(tmp_path):
    save_tiny(tmp_path / "m", n_layers=3)
    assert load_model(tmp_path / "m", device="cpu").n_blocks == 3
    assert weights_bytes(tmp_path / "m", None, torch.float32) == weights_bytes(str(tmp_path / "m"), None,
                                                                               torch.float32)
    # A Path is always a local path, never a zoo name or a hub id.
    with pytest.raises(MiPrunError, match="not found"):
        load_model(Path("tiny-llama"), device="cpu")
    with pytest.raises(MiPrunError, match="not found"):
        load_model(Path("owner/name"), device="cpu")


def test_config_with_more_blocks_than_weights_is_refused(tmp_path):
    # An export whose num_hidden_layers was raised by hand would run block 4 with random weights.
    save_tiny(tmp_path)
    edit_config(tmp_path, num_hidden_layers=5)
    with pytest.raises(MiPrunError, match=r"says 5 blocks but its weights hold 4: the weights of block\(s\) 4 are "
                                          r"not in the files.*export or download it again") as info:
        load_model(tmp_path, device="cpu")
    assert len(str(info.value).splitlines()) == 1


def test_config_with_fewer_blocks_than_weights_is_refused(tmp_path):
    save_tiny(tmp_path)
    edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(MiPrunError, match=r"says 3 blocks but its weights hold 4: the files hold block\(s\) 3 "
                                          r"that fit nowhere in the model"):
        load_model(str(tmp_path), device="cpu")


def test_weight_missing_from_the_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(MiPrunError, match=r"do not match its config: 1 weight the model needs is not in the "
                                          r"files \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        load_model(str(tmp_path), device="cpu")


def test_untouched_saves_load_including_tied_weights(tmp_path):
    model = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    loaded = load_model(tmp_path / "tied", device="cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    save_tiny(tmp_path / "untied")
    assert load_model(tmp_path / "untied", device="cpu").n_blocks == 4


def test_gguf_file_loads_and_its_size_is_read_from_its_header(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", source_url="https://huggingface.co/Org/Tiny-Model")
    n_stored = sum(p.numel() for name, p in model.named_parameters() if name != "lm_head.weight")
    assert weights_bytes(tmp_path, Path("tiny.gguf"), torch.float32) == 4 * n_stored
    assert weights_bytes(tmp_path, "tiny.gguf", torch.bfloat16) == 2 * n_stored
    loaded = load_model(tmp_path / "tiny.gguf", device="cpu")
    assert loaded.n_blocks == 2 and loaded.hub_id == "Org/Tiny-Model"
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert hub_id(tmp_path / "tiny.gguf") == "Org/Tiny-Model"
    write_tiny_gguf(tmp_path / "anon.gguf")
    assert hub_id(str(tmp_path / "anon.gguf")) is None


def test_hub_id_is_the_real_id_never_a_local_path(tmp_path):
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct" == ZOO["smollm2-135m"].hf_id
    assert hub_id("tiny-llama") is None and load_model("tiny-llama", device="cpu").hub_id is None
    assert hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hub_id("https://huggingface.co/Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hub_id("./no/such/folder") is None and hub_id(Path("owner/name")) is None

    plain = tmp_path / "plain"
    save_tiny(plain, n_layers=2)
    assert hub_id(plain) is None and load_model(plain, device="cpu").hub_id is None
    edit_config(plain, _name_or_path="/fsx/checkpoints/run-7")  # a training path: no hub id
    assert hub_id(plain) is None
    edit_config(plain, _name_or_path="meta-llama/Llama-3.2-1B")
    assert hub_id(plain) == hub_id(str(plain)) == "meta-llama/Llama-3.2-1B"
    assert load_model(plain, device="cpu").hub_id == "meta-llama/Llama-3.2-1B"

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "0123abc"
    save_tiny(snapshot, n_layers=2)
    assert hub_id(snapshot) == "HuggingFaceTB/SmolLM2-360M"

    converted = tmp_path / "zoo"
    save_tiny(converted, n_layers=2)
    (converted / "mi_prun_source.json").write_text(json.dumps({"zoo": "smollm2-135m"}))
    assert hub_id(converted) == "HuggingFaceTB/SmolLM2-135M-Instruct"

    export = tmp_path / "export"  # a pruned model is not the model its record names as source
    save_tiny(export, n_layers=2)
    edit_config(export, _name_or_path="meta-llama/Llama-3.2-1B")
    (export / "mi_prun.json").write_text(json.dumps({"source_model": "meta-llama/Llama-3.2-1B"}))
    assert hub_id(export) is None


def test_one_context_length_for_evaluation_and_calibration():
    from types import SimpleNamespace

    from mi_prun.evaluate import model_context
    from mi_prun.pipeline import check_context

    assert context_length(tiny_model("gpt2")[0].config) == 256  # n_positions
    assert context_length(SimpleNamespace(seq_length=2048)) == 2048
    assert context_length(SimpleNamespace(max_position_embeddings=0, n_ctx=512)) == 512
    assert context_length(SimpleNamespace(hidden_size=8)) is None and context_length(None) is None
    composite = SimpleNamespace(vision_config=SimpleNamespace(max_position_embeddings=50),
                                text_config=SimpleNamespace(max_position_embeddings=4096),
                                max_position_embeddings=50)
    assert context_length(composite) == 4096
    for config in (SimpleNamespace(seq_length=64), composite):
        loaded = SimpleNamespace(model=SimpleNamespace(config=config), spec="m")
        limit = model_context(loaded.model)
        check_context(loaded, limit)
        with pytest.raises(MiPrunError, match=f"exceed the context of m \\({limit} tokens\\)"):
            check_context(loaded, limit + 1)
