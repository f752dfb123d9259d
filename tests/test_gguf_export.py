"""`--format gguf`: the pruned GGUF holds the source's kept blocks byte for byte, loads back through
transformers and through mi-prun with exactly the pruned view's logits (within a stated tolerance
where a healed weight was re-encoded), runs in llama.cpp, and every bad input is a one-line error
that leaves nothing behind. Also: a GGUF given by path is converted once and cached by its digest."""

from __future__ import annotations

import errno
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from cli_helpers import assert_one_line_error, run_cli  # noqa: E402
from mi_prun.config import ExportConfig, HealConfig  # noqa: E402
from mi_prun.data import Calibration  # noqa: E402
from mi_prun.errors import MiPrunError  # noqa: E402
from mi_prun.export import export  # noqa: E402
from mi_prun.gguf_export import GGUF_FILE, LAYOUTS, GGUFSource, check_kept, decode, read_source  # noqa: E402
from mi_prun.heal import heal  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.models.tiny import VOCAB, tiny_model  # noqa: E402

PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
Q8 = {"ffn_gate", "ffn_up", "ffn_down"}  # stored quantised, as in a real file: copied as bytes, never re-encoded


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of VOCAB tokens (GPT-2's byte alphabet, three control tokens,
    two-letter merges), so that any text tokenizes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    tokens = alphabet + ["<s>", "</s>", "<pad>"]
    types = [1] * 256 + [3, 3, 3]
    merges = []
    letters = "etaoinshrdlucmfw"
    for a in letters:
        for b in letters:
            if len(tokens) == VOCAB:
                break
            tokens.append(a + b)
            types.append(1)
            merges.append(f"{a} {b}")
    return tokens, types, merges


def write_tiny_gguf(path: Path, n_layers: int = 4, arch: str = "llama", block_prefix: str = "blk",
                    per_layer_key: bool = True) -> None:
    """A tiny random Llama as a GGUF: F32 tensors, its MLP weights in Q8_0, a byte-level tokenizer,
    and (per_layer_key) a per-layer bool array, which the pruned file must cut to the kept blocks."""
    model, _ = tiny_model("llama", n_layers=n_layers)
    cfg = model.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for b in range(n_layers):
        names.update({f"model.layers.{b}.{ours}.weight": f"{block_prefix}.{b}.{theirs}.weight"
                      for ours, theirs in PARTS.items()})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(n_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if per_layer_key:
        writer.add_array(f"{arch}.attention.sliding_window_pattern", [b % 2 == 0 for b in range(n_layers)])
    tokens, types, merges = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(258)
    writer.add_string("general.name", "tiny test model")
    for key, tensor in model.state_dict().items():
        if key not in names:
            continue
        data = tensor.numpy().astype(np.float32)
        if names[key].split(".")[-2] in Q8:
            writer.add_tensor(names[key], gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(names[key], data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Every test converts into its own mi-prun cache (the GGUF cache is keyed by digest)."""
    monkeypatch.setenv("MI_PRUN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path, own_cache) -> Path:
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hf_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def tensors_of(path: Path) -> dict[str, tuple[str, bytes]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in reader.tensors}


IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 300, 310]])


# ------------------------------------------------------------------------------ a pruned GGUF file

def test_pruned_gguf_copies_kept_blocks_byte_for_byte_and_gives_the_pruned_logits(tiny_gguf, tmp_path):
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    view = pruned_view(loaded.model, [1, 2])
    out = export(view, loaded.tokenizer, None, tmp_path / "out", loaded=loaded, config=ExportConfig(format="gguf"))
    assert sorted(p.name for p in out.iterdir()) == ["mi_prun.json", GGUF_FILE]
    path = out / GGUF_FILE

    # transformers' GGUF reader and mi-prun's loader: the pruned view's logits, exactly
    reference = logits(view, IDS)
    assert torch.equal(logits(hf_gguf(path), IDS), reference)
    again = load_model(path, device="cpu", dtype="float32")
    assert again.n_blocks == 2 and torch.equal(logits(again.model, IDS), reference)
    text = "hello world, the tokenizer is kept"
    assert again.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids

    # tensors: kept blocks renumbered with their bytes and types; everything else unchanged
    src, new = tensors_of(tiny_gguf), tensors_of(path)
    renumber = {0: 0, 3: 1}
    expected = {name: value for name, value in src.items() if not name.startswith("blk.")}
    for name, value in src.items():
        if name.startswith("blk.") and int(name.split(".")[1]) in renumber:
            expected[f"blk.{renumber[int(name.split('.')[1])]}.{name.split('.', 2)[2]}"] = value
    assert new == expected
    assert {t for t, _ in new.values()} == {"F32", "Q8_0"}
    src_block = sum(len(b) for n, (_, b) in src.items() if n.startswith("blk."))
    new_block = sum(len(b) for n, (_, b) in new.items() if n.startswith("blk."))
    assert new_block * 4 == src_block * 2  # kept / total of the source's block bytes

    # metadata: block count and the per-layer array cut, everything else as it was, provenance added
    old_r, new_r = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(path)
    assert new_r.get_field("llama.block_count").contents() == 2
    assert new_r.get_field("llama.attention.sliding_window_pattern").contents() == [True, False]
    assert new_r.get_field("mi_prun.removed_blocks").contents() == [1, 2]
    assert new_r.get_field("mi_prun.source_block_count").contents() == 4
    changed = {"llama.block_count", "llama.attention.sliding_window_pattern", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in old_r.fields.items():
        if key not in changed:
            assert new_r.get_field(key).contents() == field.contents(), key
    record = json.loads((out / "mi_prun.json").read_text())
    assert record["removed"] == [1, 2] and record["kept"] == [0, 3] and record["dtype"] == "as in the source GGUF"
    assert record["gguf"]["trimmed_keys"] == ["llama.attention.sliding_window_pattern"]
    assert record["gguf"]["copied_tensors"] == len(new) and record["files"] == [GGUF_FILE, "mi_prun.json"]


def test_healed_gguf_keeps_the_fold_in_each_precision(tiny_gguf, tmp_path):
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (8, 48), generator=gen)
    calib = Calibration(ids, torch.ones_like(ids), {"source": "random bytes"})
    healed, record = heal(loaded.model, [1, 2], calib, config=HealConfig(n_samples=8, seq_len=48, check=False))
    assert record.runs[0].kept
    reference = logits(healed, IDS)
    unhealed_gap = float((logits(pruned_view(loaded.model, [1, 2]), IDS) - reference).abs().max())
    errors = {}
    for fold_type in ("f32", "f16", "q8_0"):
        out = export(healed, loaded.tokenizer, None, tmp_path / fold_type, loaded=loaded,
                     config=ExportConfig(format="gguf", gguf_fold_type=fold_type))
        path = out / GGUF_FILE
        types = {name: t for name, (t, _) in tensors_of(path).items()}
        assert types["blk.0.ffn_down.weight"] == fold_type.upper()  # the fold, re-encoded
        assert types["blk.1.ffn_down.weight"] == "Q8_0"  # block 3's, copied
        errors[fold_type] = float((logits(hf_gguf(path), IDS) - reference).abs().max())
        meta = json.loads((out / "mi_prun.json").read_text())
        assert meta["gguf"]["folded"][0]["tensor"] == "blk.0.ffn_down.weight" and meta["healing"]["runs"]
        assert gguf.GGUFReader(path).get_field("mi_prun.healed_tensors").contents() == ["blk.0.ffn_down.weight"]
    assert errors["f32"] < 1e-4
    assert errors["f16"] < 1e-2 * unhealed_gap and errors["q8_0"] < 0.1 * unhealed_gap, (errors, unhealed_gap)


def test_healed_export_refuses_a_gguf_that_is_not_the_models_source(tiny_gguf, tmp_path):
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    healed, _ = heal(loaded.model, [1, 2], Calibration(ids, torch.ones_like(ids), {}),
                     config=HealConfig(n_samples=8, seq_len=48, check=False))
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other)
    raw = bytearray(other.read_bytes())
    source = read_source(other)
    t = source.tensor("blk.0.ffn_down.weight")
    raw[t.data_offset + 10] ^= 0xFF  # one byte of the fold site differs from the model's weights
    del source, t
    other.write_bytes(bytes(raw))
    loaded.info["gguf"] = str(other)
    with pytest.raises(MiPrunError, match=r"does not hold the model's model\.layers\.0\.mlp\.down_proj\.weight.*Fix:"):
        export(healed, loaded.tokenizer, None, tmp_path / "out", loaded=loaded, config=ExportConfig(format="gguf"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ bad input, one line

def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cli_prunes_a_gguf_to_a_gguf_and_refuses_an_existing_output(tiny_gguf, tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_gguf), "--samples", "8", "--tokens", "48", "--positions", "256",
            "--n", "1", "--format", "gguf", "--out", str(out)]
    rc, stdout, err = run_cli(*args)
    assert rc == 0, err
    assert f"exported to {out / GGUF_FILE}" in stdout and "llama-cli -m" in stdout
    assert gguf.GGUFReader(out / GGUF_FILE).get_field("llama.block_count").contents() == 3
    before = (out / GGUF_FILE).read_bytes()
    rc, _, err = run_cli(*args)
    assert_one_line_error(rc, err, "exists and is not empty", "Fix:", "--overwrite")
    assert (out / GGUF_FILE).read_bytes() == before
    rc, _, err = run_cli(*args, "--overwrite")
    assert rc == 0, err


def test_gguf_format_for_a_model_not_from_a_gguf_says_how_to_convert(tmp_path, own_cache):
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--n", "1", "--format", "gguf",
                         "--out", str(tmp_path / "x"))
    assert_one_line_error(rc, err, "is not a GGUF file", "Fix:", "convert_hf_to_gguf.py")
    loaded = load_model("tiny-llama", device="cpu")
    with pytest.raises(MiPrunError, match=r"did not come from one\. Fix: .*convert_hf_to_gguf\.py"):
        export(pruned_view(loaded.model, [1]), loaded.tokenizer, None, tmp_path / "y", loaded=loaded,
               config=ExportConfig(format="gguf"))
    assert not (tmp_path / "y").exists()


def test_unknown_architecture_and_unnamed_blocks_are_refused(tmp_path, own_cache):
    write_tiny_gguf(tmp_path / "arch.gguf", arch="mamba")
    with pytest.raises(MiPrunError, match=r"does not know the GGUF layout of architecture 'mamba'.*Fix: .*convert_hf"):
        read_source(tmp_path / "arch.gguf")
    write_tiny_gguf(tmp_path / "names.gguf", block_prefix="layers")
    with pytest.raises(MiPrunError, match=r"no tensors named blk\.N\.\* for blocks \[0, 1, 2, 3\].*Fix:") as info:
        read_source(tmp_path / "names.gguf")
    assert len(str(info.value).splitlines()) == 1
    rc, _, err = run_cli("prune", "--model", str(tmp_path / "names.gguf"), "--n", "1", "--format", "gguf",
                         "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "blk.N", "Fix:")
    assert not (tmp_path / "o").exists()


def test_truncated_gguf_is_refused_in_one_line(tiny_gguf, tmp_path):
    raw = tiny_gguf.read_bytes()
    for cut in (len(raw) - 100, len(raw) // 2, 40):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(raw[:cut])
        with pytest.raises(MiPrunError, match=r"truncated|cannot read the GGUF") as info:
            read_source(broken)
        assert len(str(info.value).splitlines()) == 1 and "Fix:" in str(info.value)


def test_disk_full_during_the_write_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    view = pruned_view(loaded.model, [1])
    written = []

    def full(self, *args, **kwargs):
        written.append(self.path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(MiPrunError, match=r"No space left on device\. Fix: free disk space") as info:
        export(view, loaded.tokenizer, None, tmp_path / "out", loaded=loaded, config=ExportConfig(format="gguf"))
    assert len(str(info.value).splitlines()) == 1
    assert written and not written[0].exists()  # the partial file went with its temporary folder
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing_and_keeps_an_earlier_export(tiny_gguf, tmp_path, monkeypatch):
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    out = export(pruned_view(loaded.model, [1]), loaded.tokenizer, None, tmp_path / "out", loaded=loaded,
                 config=ExportConfig(format="gguf"))
    before = (out / GGUF_FILE).read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM as the CLI raises it

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(pruned_view(loaded.model, [2]), loaded.tokenizer, None, out, loaded=loaded,
               config=ExportConfig(format="gguf", overwrite=True))
    assert (out / GGUF_FILE).read_bytes() == before and no_leftovers(tmp_path) == []


def test_gemma_removal_that_moves_a_global_block_is_refused():
    source = GGUFSource(path=Path("g.gguf"), reader=None, arch="gemma3", layout=LAYOUTS["gemma3"], n_blocks=18,
                        block_bytes=0, other_bytes=0)
    check_kept(source, [b for b in range(18) if b not in range(6, 12)])  # a whole period: positions kept
    with pytest.raises(MiPrunError, match=r"moves global block 17 to position 13.*Fix: remove whole runs of 6"):
        check_kept(source, [b for b in range(18) if b not in (12, 13, 14, 15)])


# ------------------------------------------------------------------------------ the GGUF cache

def test_a_gguf_is_converted_once_and_then_loaded_from_the_cache(tiny_gguf, tmp_path, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    first = load_model(tiny_gguf, device="cpu", dtype="float32")
    folders = list((tmp_path / "cache" / "gguf-models").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was dequantised again")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_conversion)
    second = load_model(tiny_gguf, device="cpu", dtype="float32")
    assert second.info["gguf_cache"] == str(folders[0]) and second.info["gguf"] == str(tiny_gguf.resolve())
    assert torch.equal(logits(second.model, IDS), logits(first.model, IDS))
    assert second.tokenizer("cached?").input_ids == first.tokenizer("cached?").input_ids
    assert second.describe()["identity"] == first.describe()["identity"]  # an analysis of one fits the other
    # the same bytes under another name use the same cache; other bytes do not
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    assert load_model(copy, device="cpu").info["gguf_cache"] == str(folders[0])


# ------------------------------------------------------------------------------ llama.cpp

def llama_cpp_or_skip():
    if importlib.util.find_spec("cyllama") is None:
        pytest.skip("no llama.cpp runtime: pip install cyllama (a wheel with llama.cpp built in; see README)")
    from cyllama import complete
    from cyllama.llama.llama_cpp import LlamaModel

    return complete, LlamaModel


def test_llama_cpp_loads_the_pruned_gguf_and_generates(tiny_gguf, tmp_path):
    complete, LlamaModel = llama_cpp_or_skip()
    loaded = load_model(tiny_gguf, device="cpu", dtype="float32")
    out = export(pruned_view(loaded.model, [1, 2]), loaded.tokenizer, None, tmp_path / "out", loaded=loaded,
                 config=ExportConfig(format="gguf"))
    model = LlamaModel(str(out / GGUF_FILE))
    assert model.n_layer == 2
    text = str(complete("hello", model_path=str(out / GGUF_FILE), max_tokens=4, temperature=0.0))
    assert isinstance(text, str)


# ------------------------------------------------------------------------------ the built-in model

@pytest.mark.real_model
def test_builtin_model_prunes_to_a_gguf_that_transformers_and_llama_cpp_run(smollm2, tmp_path):
    from mi_prun.models import cache_dir

    source = sorted((cache_dir() / "gguf" / "smollm2-135m").glob("*.gguf"))
    if not source:  # the fixture loaded the converted model from a cache made elsewhere
        pytest.skip("the built-in model's GGUF is not in this cache")
    view = pruned_view(smollm2.model, [12, 13])
    out = export(view, smollm2.tokenizer, None, tmp_path / "smol", loaded=smollm2, config=ExportConfig(format="gguf"))
    path = out / GGUF_FILE
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(hf_gguf(path), ids), logits(view, ids))
    src, new = read_source(source[0]), read_source(path)
    assert new.n_blocks == 28 and new.block_bytes * 30 == src.block_bytes * 28 and new.other_bytes == src.other_bytes
    assert {t.tensor_type.name for t in new.reader.tensors} == {t.tensor_type.name for t in src.reader.tensors}
    weight = new.tensor("blk.12.attn_q.weight")  # old block 14
    assert np.array_equal(weight.data, src.tensor("blk.14.attn_q.weight").data)
    assert decode(weight.data, weight.tensor_type).shape == (576, 576)
    if importlib.util.find_spec("cyllama") is not None:
        complete, _ = llama_cpp_or_skip()
        text = str(complete("The capital of France is", model_path=str(path), max_tokens=6, temperature=0.0))
        assert "Paris" in text, text


# ------------------------------------------------------------------------------ the app

def test_app_export_page_offers_gguf_for_a_model_read_from_a_gguf(tiny_gguf, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from mi_prun_app import state

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("MI_PRUN_TEST_MODEL", str(tiny_gguf))
    monkeypatch.setenv("MI_PRUN_EXPORT_DIR", str(tmp_path / "exports"))
    at = AppTest.from_file(str(root / "app.py"), default_timeout=180).run()
    at.button(key="run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.switch_page("pages/5_prune_export.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.radio(key="pr_format").set_value("gguf").run()
    name = [t for t in at.text_input if t.key and t.key.startswith("pr_export_name")][0]
    name.set_value("tiny-gguf").run()
    at.button(key="export").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = Path(state.export_root()) / "tiny-gguf"
    assert sorted(p.name for p in out.iterdir()) == ["mi_prun.json", GGUF_FILE]
    removed = json.loads((out / "mi_prun.json").read_text())["removed"]
    blocks = gguf.GGUFReader(out / GGUF_FILE).get_field("llama.block_count").contents()
    assert removed and blocks == 4 - len(removed)
    assert any(f"llama-cli -m {out / GGUF_FILE}" in c.value for c in at.code)


@pytest.mark.real_model
def test_builtin_model_healed_gguf_is_within_tolerance_and_only_the_fold_changes(smollm2, tmp_path):
    from mi_prun.heal import heal_calibration

    cfg = HealConfig(n_samples=8, seq_len=64, check=False)
    healed, _ = heal(smollm2.model, [13, 14], heal_calibration(smollm2, cfg), config=cfg)
    out = export(healed, smollm2.tokenizer, None, tmp_path / "healed", loaded=smollm2,
                 config=ExportConfig(format="gguf"))  # the default fold type: F16
    plain = export(pruned_view(smollm2.model, [13, 14]), smollm2.tokenizer, None, tmp_path / "plain",
                   loaded=smollm2, config=ExportConfig(format="gguf"))
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    reference = logits(healed, ids)
    gap = float((logits(hf_gguf(out / GGUF_FILE), ids) - reference).abs().max())
    moved = float((logits(pruned_view(smollm2.model, [13, 14]), ids) - reference).abs().max())
    assert gap < 0.01 < moved, (gap, moved)
    healed_t, plain_t = tensors_of(out / GGUF_FILE), tensors_of(plain / GGUF_FILE)
    assert healed_t["blk.12.ffn_down.weight"][0] == "F16" and plain_t["blk.12.ffn_down.weight"][0] == "Q4_1"
    assert {k: v for k, v in healed_t.items() if k != "blk.12.ffn_down.weight"} == \
        {k: v for k, v in plain_t.items() if k != "blk.12.ffn_down.weight"}
