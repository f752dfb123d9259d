"""Device maps (`--device-map`, `load_model(device_map=...)`): every entry is used as written or
refused in one line naming the fix; nothing is silently ignored; an offload folder that fills up
leaves nothing behind. docs/RELIABILITY.md cites these tests as `D::test`."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import mi_prun.runtime.loading as loading
from cli_helpers import assert_one_line_error, run_cli
from mi_prun.errors import MiPrunError
from mi_prun.runtime import load_model
from mi_prun.testing import tiny_model

EVAL = ["--data", "text:" + "The quick brown fox jumps over the lazy dog. " * 20, "--seq-len", "32"]
WHOLE = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "llama3"
    model, tok = tiny_model("llama", n_layers=3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_complete_maps_load_inline_or_from_a_file(folder, tmp_path):
    assert load_model(folder, device="cpu", device_map=WHOLE).n_blocks == 3
    rc, out, err = run_cli("eval", "--model", str(folder), "--device-map", '{"": "cpu"}', *EVAL)
    assert rc == 0 and "perplexity" in out, err  # an inline JSON map (was "unknown device")
    (tmp_path / "map.json").write_text(json.dumps(WHOLE))
    rc, out, err = run_cli("eval", "--model", str(folder), "--device-map", str(tmp_path / "map.json"), *EVAL)
    assert rc == 0, err


@pytest.mark.parametrize("case", ["overlap", "whole and part", "unknown module", "partial with disk", "not json"])
def test_maps_that_would_not_mean_what_they_say_are_one_line(folder, case, tmp_path):
    maps = {
        "overlap": ({**WHOLE, "model.layers.0": "cpu"}, "places model.layers.0 twice", "inside model.layers"),
        "whole and part": ({"": "cpu", "lm_head": "cpu"}, "places lm_head twice", 'the whole model ("")'),
        "unknown module": ({**WHOLE, "model.embed_tokenz": "cpu"}, "does not have: 'model.embed_tokenz' (did you mean "
                           "'model.embed_tokens'?)"),
        "partial with disk": ({"model.embed_tokens": "cpu", "model.layers": "disk"},
                              "leaves 2 module(s)", "lm_head, model.norm", "--device-map auto"),
        "not json": ('{"": cpu}', "the inline device map is not valid JSON"),
    }
    value, *fragments = maps[case]
    arg = value if isinstance(value, str) else json.dumps(value)
    rc, _, err = run_cli("eval", "--model", str(folder), "--device-map", arg,
                         "--offload-folder", str(tmp_path / "off"), *EVAL)
    line = assert_one_line_error(rc, err, *fragments, "Fix:")
    assert len(line) < 400  # never accelerate's list of every parameter


def test_device_map_on_a_built_in_tiny_model_is_refused():
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--device-map", "auto", *EVAL)
    assert_one_line_error(rc, err, "device map would be ignored", "tiny-llama is built in memory", "Fix: drop --device-map")
    with pytest.raises(MiPrunError, match="device map would be ignored"):
        load_model("tiny-gpt2", device_map={"": "cpu"})


def test_offload_folder_that_fills_up_is_cleaned_and_named(folder, tmp_path, monkeypatch):
    off = tmp_path / "off"
    off.mkdir()
    (off / "mine.txt").write_text("the user's file")
    real = loading.AutoModelForCausalLM.from_pretrained

    def full_disk(*args, **kwargs):  # accelerate writes some offloaded weights, then the disk is full
        (off / "model.layers.0.mlp.down_proj.weight.safetensors").write_bytes(b"\0" * 100)
        (off / "index").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", full_disk)
    rc, _, err = run_cli("eval", "--model", str(folder), "--device-map", json.dumps(WHOLE),
                         "--offload-folder", str(off), *EVAL)
    assert_one_line_error(rc, err, f"the offload folder {off} filled up", "No space left on device",
                          "files written there were removed", "Fix: free disk space")
    assert sorted(p.name for p in off.iterdir()) == ["mine.txt"]  # the partial files are gone, the user's kept
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", real)
    assert load_model(folder, device="cpu", device_map=WHOLE, offload_folder=off).n_blocks == 3
