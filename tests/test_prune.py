"""Pruning: a pruned model equals the original run without those blocks, exports to a folder that
plain transformers reloads, generates the same with and without a KV cache, and never changes the
shared model it came from."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import yaml

import mi_prun.export as prune_mod
from mi_prun.errors import MiPrunError
from mi_prun.models import find_blocks
from mi_prun.export import export, mergekit_yaml
from mi_prun.models import prune, pruned_view, remove_blocks_config
from mi_prun.testing import FAMILIES, tiny_model

REMOVE = [1, 3]
KEPT = [0, 2, 4, 5]
# 20 bytes + BOS: longer than the tiny Gemma2/3 sliding window (16), so layer types matter.
PROMPT = "The cat sat on a mat"


def snapshot(model: torch.nn.Module) -> dict:
    """Everything pruning or evaluation must leave alone, by value."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "n_blocks": len(find_blocks(model)),
        "blocks_id": id(find_blocks(model).blocks),
        "layer_idx": [(n, m.layer_idx) for n, m in model.named_modules()
                      if isinstance(getattr(m, "layer_idx", None), int)],
        "training": model.training,
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["config"] == before["config"]
    assert after["n_blocks"] == before["n_blocks"]
    assert after["blocks_id"] == before["blocks_id"]
    assert after["layer_idx"] == before["layer_idx"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["ptrs"] == before["ptrs"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def reference_model(model: torch.nn.Module, kept: list[int]) -> torch.nn.Module:
    """The original without the other blocks, built independently of mi_prun.models.surgery: a fresh model
    from a hand-edited config, loaded with the kept blocks' weights renumbered."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(kept)  # attribute_map turns this into n_layer for GPT-2
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = find_blocks(model).path + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(path):
            old, rest = key[len(path):].split(".", 1)
            if int(old) not in kept:
                continue
            key = f"{path}{kept.index(int(old))}.{rest}"
        state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def greedy(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False, use_cache=use_cache,
                              pad_token_id=258)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_equals_skipping_blocks_and_exports(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model(family)
    before = snapshot(model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected = logits(reference_model(model, KEPT), ids)
    assert not torch.allclose(expected, logits(model, ids), atol=1e-3)  # pruning matters

    view = pruned_view(model, REMOVE)
    own = prune(model, REMOVE)
    for pruned in (view, own):
        assert len(find_blocks(pruned)) == 4
        assert pruned.config.to_dict()["n_layer" if family == "gpt2" else "num_hidden_layers"] == 4
        torch.testing.assert_close(logits(pruned, ids), expected, rtol=0, atol=1e-5)
        idx = [m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert sorted(set(idx)) == [0, 1, 2, 3]
    if getattr(model.config, "layer_types", None) is not None:
        assert view.config.layer_types == [model.config.layer_types[i] for i in KEPT]
    # A view shares tensors; a pruned copy owns them.
    assert view.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert own.get_input_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()

    # KV cache indexes the renumbered layers: cached greedy == uncached greedy.
    assert torch.equal(greedy(view, ids, True), greedy(view, ids, False))

    out = export(view, tok, {"method": "test", "removed": REMOVE, "n_blocks": 6}, tmp_path / "out",
                 source_model=f"tiny/{family}")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert torch.equal(tok2(PROMPT, return_tensors="pt").input_ids, ids)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (reloaded.get_output_embeddings().weight.data_ptr()
            == reloaded.get_input_embeddings().weight.data_ptr()) == tied
    assert_unchanged(model, before)


def test_export_reloads_without_mi_prun(tmp_path):
    model, tok = tiny_model("llama", seed=3)
    out = export(prune(model, [0, 4]), tok, None, tmp_path / "pruned", source_model="tiny/llama")
    script = (
        "import sys\n"
        "sys.modules['mi_prun'] = None  # as if mi-prun were not installed\n"
        "try:\n    import mi_prun\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('importable')\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t(sys.argv[2], return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n    torch.save({'ids': ids, 'logits': m(ids).logits}, sys.argv[3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(out), PROMPT, str(result)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(result)
    torch.testing.assert_close(got["logits"], logits(reference_model(model, [1, 2, 3, 5]), got["ids"]),
                               rtol=0, atol=1e-5)


def test_export_contents(tmp_path):
    model, tok = tiny_model("qwen3")
    selection = {"method": "fbs", "n": 2, "n_blocks": 6, "removed": [2, 3], "kept": [0, 1, 4, 5],
                 "objective": 0.25, "run_cost": "span_mi", "trajectory": [{"P": [2, 3]}],
                 "provenance": {"estimator": "gaussian",
                                "calibration": {"source": "wikitext2-valid", "tokens": 4096}}}
    out = export(prune(model, [2, 3]), tok, selection, tmp_path / "x", source_model="org/model")
    record = json.loads((out / "mi_prun.json").read_text())
    assert record["removed"] == [2, 3] and record["kept"] == [0, 1, 4, 5]
    assert "0-based" in record["block_numbering"]
    assert record["method"] == "fbs" and record["estimator"] == "gaussian"
    assert record["run_cost"] == "span_mi" and record["objective"] == 0.25
    assert record["calibration"]["source"] == "wikitext2-valid"
    assert {"torch", "transformers", "python"} <= record["versions"].keys()
    merge = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert merge["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in merge["slices"]] == [[0, 2], [4, 6]]
    assert {s["sources"][0]["model"] for s in merge["slices"]} == {"org/model"}
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".x.*"))  # no temporary folder left


def test_mergekit_yaml_slices_are_maximal_kept_ranges():
    # half-open, 0-based, one slice per maximal run of kept blocks, in order whatever the input order
    merge = yaml.safe_load(mergekit_yaml("org/model", [9, 5, 0, 1, 2, 6]))
    assert [s["sources"][0]["layer_range"] for s in merge["slices"]] == [[0, 3], [5, 7], [9, 10]]


def test_export_refuses_nonempty_and_overwrites(tmp_path):
    model, tok = tiny_model("llama")
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(MiPrunError, match="not empty"):
        export(pruned_view(model, [1]), tok, None, target)
    # --overwrite replaces only an earlier mi-prun export: a user's folder is refused, kept whole
    with pytest.raises(MiPrunError, match="not an earlier mi-prun pruned model"):
        export(pruned_view(model, [1]), tok, None, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    (target / "keep.txt").unlink()
    export(pruned_view(model, [1]), tok, None, target)
    export(pruned_view(model, [3]), tok, None, target, overwrite=True)  # an earlier export is replaced
    assert json.loads((target / "mi_prun.json").read_text())["removed"] == [3]
    (target / "notes.md").write_text("mine")  # a file the export did not write is never deleted
    with pytest.raises(MiPrunError, match="notes.md"):
        export(pruned_view(model, [1]), tok, None, target, overwrite=True)
    assert (target / "notes.md").read_text() == "mine"
    assert json.loads((target / "mi_prun.json").read_text())["removed"] == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export(pruned_view(model, [2]), tok, None, empty)  # an empty folder is fine
    assert (empty / "config.json").exists()


@pytest.mark.parametrize("where", ["tokenizer", "yaml"])
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, where):
    model, tok = tiny_model("llama")
    if where == "tokenizer":
        monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(
            KeyboardInterrupt()))
        exc: type[BaseException] = KeyboardInterrupt
    else:
        def boom(*a, **k):
            raise RuntimeError("simulated crash while writing mergekit.yaml")
        monkeypatch.setattr(prune_mod, "mergekit_yaml", boom)
        exc = RuntimeError
    with pytest.raises(exc):
        export(pruned_view(model, [1]), tok, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # An interrupted overwrite keeps the previous export intact.
    monkeypatch.undo()
    export(pruned_view(model, [1]), tok, None, tmp_path / "out")
    monkeypatch.setattr(prune_mod, "mergekit_yaml", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(pruned_view(model, [2]), tok, None, tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "mi_prun.json").read_text())["removed"] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    model, tok = tiny_model("llama")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tok, "save_pretrained", full)
    with pytest.raises(MiPrunError, match=r"No space left.*free disk space") as info:
        export(pruned_view(model, [1]), tok, None, tmp_path / "out")
    assert str(tmp_path / "out") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_checks_selection_against_model(tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(MiPrunError, match="selection removes"):
        export(pruned_view(model, [1]), tok, {"removed": [2], "n_blocks": 6}, tmp_path / "o")
    with pytest.raises(MiPrunError, match="cannot tell which blocks"):
        export(model, tok, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("remove, message", [
    ([6], "out of range"), ([-1], "out of range"), ([1, 1], "more than once"),
    ([0, 1, 2, 3, 4, 5], "cannot remove all"), (["1"], "integers"), ([1.0], "integers"),
    ([True], "integers"), ("13", "list of block numbers"),
])
def test_invalid_remove_is_refused_and_model_unchanged(remove, message):
    model, _ = tiny_model("gemma2")
    before = snapshot(model)
    for fn in (pruned_view, prune):
        with pytest.raises(MiPrunError, match=message):
            fn(model, remove)
    assert_unchanged(model, before)


def test_numpy_ints_and_unsorted_remove_are_accepted():
    np = pytest.importorskip("numpy")
    model, _ = tiny_model("llama")
    view = pruned_view(model, np.array([3, 1]))
    assert prune_mod.prune_info(view).removed == (1, 3)


def test_pruning_a_pruned_model_keeps_original_numbering(tmp_path):
    model, tok = tiny_model("qwen2")
    twice = pruned_view(pruned_view(model, [1]), [2])  # block 2 of the view is block 3
    info = prune_mod.prune_info(twice)
    assert (info.n_blocks, info.removed, info.kept) == (6, (1, 3), (0, 2, 4, 5))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    torch.testing.assert_close(logits(twice, ids), logits(reference_model(model, KEPT), ids),
                               rtol=0, atol=1e-5)
    out = export(twice, tok, {"removed": [1, 3], "n_blocks": 6}, tmp_path / "o")
    assert json.loads((out / "mi_prun.json").read_text())["kept_ranges"] == [[0, 1], [2, 3], [4, 6]]


def test_shared_model_unchanged_and_thread_safe():
    model, tok = tiny_model("gemma3")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    before = snapshot(model)
    expected = logits(model, ids)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run_original():
        try:
            while not stop.is_set():
                assert torch.equal(logits(model, ids), expected)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    worker = threading.Thread(target=run_original)
    worker.start()
    try:
        for remove in ([0], [1, 2], [5], [0, 5]):
            view = pruned_view(model, remove)
            own = prune(model, remove)
            with torch.no_grad():
                own.get_input_embeddings().weight.add_(1.0)  # a pruned copy is independent
            assert len(find_blocks(view)) == 6 - len(remove)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert_unchanged(model, before)


def test_hooks_of_the_shared_model_are_not_copied():
    model, _ = tiny_model("llama")
    calls = []
    handle = find_blocks(model).blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        view = pruned_view(model, [2])
        logits(view, torch.tensor([[1, 2, 3]]))
        assert calls == []
    finally:
        handle.remove()


def test_remove_blocks_config_lists_and_subconfigs():
    from transformers import AutoConfig

    from mi_prun.testing import tiny_config

    cfg = tiny_config("qwen2")
    cfg.my_pattern = [10, 11, 12, 13, 14, 15]
    cfg.eos_token_id = [1, 2, 3, 4, 5, 6]  # not per layer, although as long
    new = remove_blocks_config(cfg, [0, 5])
    assert new.num_hidden_layers == 4 and new.my_pattern == [11, 12, 13, 14]
    assert new.eos_token_id == [1, 2, 3, 4, 5, 6] and len(new.layer_types) == 4
    assert cfg.num_hidden_layers == 6 and len(cfg.my_pattern) == 6  # input untouched
    composite = AutoConfig.for_model("gemma3", text_config=tiny_config("gemma3").to_dict())
    new = remove_blocks_config(composite, [1])
    assert new.text_config.num_hidden_layers == 5 and len(new.text_config.layer_types) == 5
    assert new.vision_config.num_hidden_layers == composite.vision_config.num_hidden_layers


# ----------------------------------------------------------------------------------------------
# real model


@pytest.mark.real_model
def test_gguf_model_prunes_exports_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from mi_prun.models import cache_dir, ensure_builtin

    from mi_prun.runtime import load_model

    ensure_builtin("smollm2-135m")
    gguf = sorted((cache_dir() / "gguf" / "smollm2-135m").glob("*.gguf"))[0]
    loaded = load_model(str(gguf), device="cpu", dtype="float32")
    pruned = pruned_view(loaded.model, [12, 13])
    out = export(pruned, loaded.tokenizer, None, tmp_path / "smol-pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 28
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=1e-5)
    record = json.loads((out / "mi_prun.json").read_text())
    assert record["removed"] == [12, 13] and "source_note" in record  # GGUF: mergekit caveat
    assert len(find_blocks(loaded.model)) == 30
