"""Reliability: every way a user's input, a file or the machine can go wrong, through the library
and the CLI. One test (at least) per row of docs/RELIABILITY.md; rows that other test files
already prove are cited there by file::test name instead of repeated here.

CLI contract under test: a documented problem exits with status 2 and one stderr line
`mi-prun: error: ...` (no traceback unless --debug); Ctrl-C exits with 130.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mi_prun.cli.commands as commands_mod
import mi_prun.models.blocks as blocks_mod
import mi_prun.models.memory as memory_mod
import mi_prun.results as report_mod
from mi_prun.models.hooks import count_hooks
from cli_helpers import assert_one_line_error, run_cli
from mi_prun.data import load_text
from mi_prun.errors import MiPrunError, NonFiniteError
from mi_prun.estimators import get_estimator, list_estimators
from mi_prun.models import weights_bytes
from mi_prun.runtime import load_model
from mi_prun.pipeline import AnalysisConfig, analyze
from mi_prun.export import export
from mi_prun.models import pruned_view
from mi_prun.results import Analysis
from mi_prun.scores import score_capture
from mi_prun.select import select
from mi_prun.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # ~1800 byte tokens
SMALL = ["--samples", "2", "--tokens", "24", "--positions", "32"]


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (3 blocks) with its byte tokenizer: a model folder like any other."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model, tok = tiny_model("llama", n_layers=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory, loaded) -> Path:
    a = analyze(loaded, AnalysisConfig(calib="text:" + TEXT, n_samples=4, seq_len=32, max_positions=64))
    return a.save(tmp_path_factory.mktemp("analysis") / "run")


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def gguf_bytes(tensors: list[tuple[str, tuple[int, ...]]], kv: dict[str, str] | None = None,
               data: bool = False) -> bytes:
    """A minimal GGUF v3 file: string metadata and tensor infos (f32), and zero tensor data (aligned
    to 32 bytes) when `data`, else none (a header only)."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = kv or {"general.architecture": "llama"}
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, value in kv.items():
        out += s(key) + struct.pack("<I", 8) + s(value)
    offset = 0
    for name, shape in tensors:
        out += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", 0, offset)
        offset += 4 * math.prod(shape)
    if data:
        out += bytes(-len(out) % 32) + bytes(offset)
    return out


# =============================================================================================
# model


def test_unknown_hub_id_offline_is_one_line(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # no network wait in the test
    with pytest.raises(MiPrunError, match=r"cannot load nosuchorg/nosuchmodel.*Fix: check the id"):
        load_model("nosuchorg/nosuchmodel", device="cpu")
    rc, _, err = run_cli("analyze", "--model", "./no/such/folder")
    assert_one_line_error(rc, err, "not found")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    rc, _, err = run_cli("analyze", "--model", str(tmp_path))
    assert_one_line_error(rc, err, "not a model folder")
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(MiPrunError, match="not a valid JSON"):
        load_model(str(bad), device="cpu")
    (bad / "config.json").write_text("{}")
    with pytest.raises(MiPrunError, match="model_type"):
        load_model(str(bad), device="cpu")
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))  # config, no weights
    with pytest.raises(MiPrunError, match="no file named model.safetensors"):
        load_model(str(bad), device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "header-only", "garbage"])
def test_corrupt_safetensors_is_refused(llama_dir, tmp_path, damage):
    folder = copy_folder(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "header-only": data[:5],
                         "garbage": os.urandom(4096)}[damage])
    with pytest.raises(MiPrunError, match="truncated or corrupt"):
        load_model(str(folder), device="cpu")


def test_corrupt_safetensors_cli_one_line(llama_dir, tmp_path):
    folder = copy_folder(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, _, err = run_cli("analyze", "--model", str(folder), *SMALL)
    assert_one_line_error(rc, err, "truncated or corrupt")


def test_truncated_and_garbage_gguf_are_refused(tmp_path):
    header = gguf_bytes([("token_embd.weight", (32, 320)), ("blk.0.attn_q.weight", (32, 32))])
    cases = {"truncated.gguf": header[: len(header) - 7], "garbage.gguf": b"GGUF" + os.urandom(2000),
             "random.gguf": os.urandom(2000), "empty.gguf": b""}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(MiPrunError, match=r"GGUF|truncated|corrupt") as info:
            load_model(str(tmp_path / name), device="cpu")
        assert len(str(info.value).splitlines()) == 1, name
    rc, _, err = run_cli("analyze", "--model", str(tmp_path / "truncated.gguf"))
    assert_one_line_error(rc, err, "GGUF")


def test_architecture_without_findable_blocks_cli(llama_dir, monkeypatch):
    # An architecture neither in the table nor with a ModuleList of the configured length.
    monkeypatch.setitem(blocks_mod.BLOCK_PATHS, "llama", "model.no_such_list")
    monkeypatch.setattr(blocks_mod, "num_layers_of", lambda config: 99)
    with pytest.raises(MiPrunError, match=r"cannot find the decoder blocks of LlamaForCausalLM.*families.FAMILIES"):
        load_model(str(llama_dir), device="cpu")
    rc, _, err = run_cli("analyze", "--model", str(llama_dir), *SMALL)
    assert_one_line_error(rc, err, "cannot find the decoder blocks")


def test_remote_code_stays_off_and_is_never_imported(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "IMPORTED"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "num_hidden_layers": 2,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(MiPrunError, match=r"needs custom code.*--trust-remote-code"):
        load_model(str(folder), device="cpu")
    rc, _, err = run_cli("analyze", "--model", str(folder))
    assert_one_line_error(rc, err, "--trust-remote-code")
    assert not marker.exists()
    assert "configuration_evil" not in sys.modules and "modeling_evil" not in sys.modules


def test_encoder_only_and_seq2seq_models_are_refused(tmp_path):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=8,
                                        vocab_size=100)).save_pretrained(tmp_path / "t5")
    for name in ("bert", "t5"):
        with pytest.raises(MiPrunError, match=f"{name}.*not a causal language model"):
            load_model(str(tmp_path / name), device="cpu")
    rc, _, err = run_cli("analyze", "--model", str(tmp_path / "bert"))
    assert_one_line_error(rc, err, "not a causal language model")


def test_weights_size_is_read_from_headers(llama_dir, tmp_path):
    model, _ = tiny_model("llama", n_layers=3)
    n_params = sum(p.numel() for p in model.parameters())
    assert weights_bytes(str(llama_dir), None, torch.float32) == 4 * n_params
    assert weights_bytes(str(llama_dir), None, torch.bfloat16) == 2 * n_params
    (tmp_path / "m.gguf").write_bytes(gguf_bytes([("a", (32, 320)), ("b", (4, 8, 2))], data=True))
    assert weights_bytes(str(tmp_path), "m.gguf", torch.float32) == 4 * (32 * 320 + 64)
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    assert weights_bytes(str(tmp_path), "bad.gguf", torch.float32) is None  # unknown: no check
    assert weights_bytes("nosuchorg/never-downloaded", None, torch.float32) is None


def test_model_too_large_is_refused_before_loading(llama_dir, monkeypatch):
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: 10_000)
    from transformers import AutoModelForCausalLM

    def never(*a, **k):
        raise AssertionError("weights were loaded although they cannot fit")
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", never)
        with pytest.raises(MiPrunError, match=r"needs about .* GiB .*float32.* only .* GiB of cpu memory"
                                              r".*--device-map auto.*--dtype") as info:
            load_model(str(llama_dir), device="cpu", dtype="float32")
        assert "MI_PRUN_SKIP_MEMORY_CHECK" in str(info.value)
        rc, _, err = run_cli("analyze", "--model", str(llama_dir), *SMALL)
        assert_one_line_error(rc, err, "needs about", "--device-map auto")
    # the overrides: a parameter, an environment variable, and a device map (accelerate offloads)
    assert load_model(str(llama_dir), device="cpu", check_memory_first=False).n_blocks == 3
    monkeypatch.setenv("MI_PRUN_SKIP_MEMORY_CHECK", "1")
    assert load_model(str(llama_dir), device="cpu").n_blocks == 3
    monkeypatch.delenv("MI_PRUN_SKIP_MEMORY_CHECK")
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: 10**12)
    assert load_model(str(llama_dir), device="cpu").n_blocks == 3


def test_memory_check_skip_flag_in_cli(llama_dir, monkeypatch):
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: 10_000)
    rc, _, err = run_cli("eval", "--model", str(llama_dir), "--skip-memory-check", "--data", "text:" + TEXT,
                         "--seq-len", "32", "--max-windows", "1")
    assert rc == 0, err


# =============================================================================================
# calibration and evaluation text


@pytest.mark.parametrize("calib, fragment", [("text:", "empty or only whitespace"),
                                             ("text:   \n\t ", "empty or only whitespace"),
                                             ("text:ab", "not enough calibration text")])
def test_empty_whitespace_and_short_text_cli(calib, fragment):
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", calib)
    assert_one_line_error(rc, err, fragment)


def test_short_evaluation_text_cli():
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--data", "text:too short", "--seq-len", "64")
    assert_one_line_error(rc, err, "too short for one window")


def test_binary_and_wrongly_encoded_files_cli(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\xff" * 100)
    (tmp_path / "latin1.txt").write_bytes("d\u00e9j\u00e0 vu ".encode("latin-1") * 50)
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", str(tmp_path / "bin.txt"))
    assert_one_line_error(rc, err, "binary")
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--data", str(tmp_path / "latin1.txt"))
    assert_one_line_error(rc, err, "not valid UTF-8", "iconv")


def test_huge_text_file_is_refused_before_reading(tmp_path, monkeypatch):
    import mi_prun.data as data_mod

    monkeypatch.setattr(data_mod, "MAX_TEXT_BYTES", 1024)
    big = tmp_path / "big.txt"
    big.write_text("x" * 5000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("a file over the limit was read"))
    with pytest.raises(MiPrunError, match="the limit is"):
        load_text(str(big))


def test_missing_dataset_without_internet(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PRUN_DATA_DIR", str(tmp_path))  # a folder without the WikiText-2 files
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(MiPrunError, match=r"WikiText-2 is not available.*--calib builtin"):
        load_text("wikitext2")

    class OfflineDatasets:
        @staticmethod
        def load_dataset(*a, **k):
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    with pytest.raises(MiPrunError, match=r"could not load WikiText-2.*ConnectionError.*MI_PRUN_DATA_DIR"):
        load_text("wikitext2", purpose="evaluation")
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", "wikitext2")
    assert_one_line_error(rc, err, "WikiText-2")


# =============================================================================================
# settings


def test_select_settings_out_of_range_cli(analysis_dir):
    for args, fragment in [(["--ratio", "0"], "between 0 and 1"), (["--ratio", "1"], "between 0 and 1"),
                           (["--ratio", "-0.5"], "between 0 and 1"), (["--ratio", "nan"], "between 0 and 1"),
                           (["--ratio", "inf"], "between 0 and 1"), (["--ratio", "0.01"], "rounds to 0"),
                           (["--n", "0"], "positive integer"), (["--n", "-3"], "positive integer"),
                           (["--n", "6"], "would remove all 6 blocks"), (["--n", "600"], "remove all"),
                           (["--n", "2", "--method", "nope"], "invalid choice: 'nope'"),
                           (["--n", "2", "--run-cost", "nope"], "invalid choice: 'nope'"),
                           (["--ratio", "abc"], "is not a number")]:
        rc, _, err = run_cli("select", str(analysis_dir), *args)
        assert_one_line_error(rc, err, fragment)


def test_prune_refuses_bad_selector_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(commands_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--method", "nope", "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "invalid choice: 'nope'", "fbs")


def test_analysis_settings_are_validated(loaded):
    for kwargs, fragment in [({"n_samples": 0}, "n samples"), ({"n_samples": -4}, "n samples"),
                             ({"seq_len": 1}, "at least 2"), ({"max_positions": 0}, "positions must be at least 1"),
                             ({"batch_size": -1}, "batch size"), ({"seed": -1}, "seed"),
                             ({"seed": 2**70}, "seed"), ({"n_samples": 2.5}, "n samples")]:
        with pytest.raises(MiPrunError, match=fragment):
            AnalysisConfig(**kwargs)
    with pytest.raises(MiPrunError, match=r"exceed the context of tiny-llama \(256 tokens\)"):
        analyze(loaded, AnalysisConfig(calib="text:" + TEXT, seq_len=257))
    with pytest.raises(MiPrunError, match="unknown estimator|no-such"):
        analyze(loaded, AnalysisConfig(calib="text:" + TEXT, n_samples=2, seq_len=16, estimator="no-such"))


def test_settings_out_of_range_cli():
    for args, fragment in [(["--samples", "0"], "positive integer"), (["--samples", "-2"], "positive integer"),
                           (["--tokens", "0"], "positive integer"), (["--tokens", "1"], "at least 2"),
                           (["--tokens", "100000"], "exceed the context"), (["--positions", "-1"], "positive"),
                           (["--estimator", "nope"], "nope"), (["--seed", "-1"], "seed"),
                           (["--estimator-options", "[1]"], "JSON object")]:
        rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--calib", "text:" + TEXT, *args)
        assert_one_line_error(rc, err, fragment)
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--data", "text:" + TEXT, "--seq-len", "4096")
    assert_one_line_error(rc, err, "exceeds the model's context")


# =============================================================================================
# numerics


def test_half_precision_overflow_names_the_block_and_float32_retry_works(tmp_path):
    model, tok = tiny_model("llama", n_layers=4)
    with torch.no_grad():  # block 2 writes values far beyond float16's 65504
        model.model.layers[2].mlp.down_proj.weight.mul_(3e4)
    folder = tmp_path / "overflow"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    half = load_model(str(folder), device="cpu", dtype="float16")
    with pytest.raises(NonFiniteError, match=r"after block 2 .*float16.*--dtype float32") as info:
        analyze(half, AnalysisConfig(calib="text:" + TEXT, n_samples=2, seq_len=16, max_positions=16))
    assert info.value.block == 2 and count_hooks(half.model) == 0
    rc, _, err = run_cli("analyze", "--model", str(folder), "--dtype", "float16", *SMALL, "--calib", "text:" + TEXT)
    assert_one_line_error(rc, err, "block 2", "--dtype float32")
    rc, out, err = run_cli("analyze", "--model", str(folder), "--dtype", "float32", *SMALL, "--calib", "text:" + TEXT)
    assert rc == 0, err
    assert "4 blocks" in out


def test_constant_layer_through_every_estimator_and_score_capture():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(5, 160, 8, generator=g)
    H[2] = 0.0  # a dead block: every activation zero (cosine of zero vectors, zero variance)
    H[3] = 4.0  # a constant layer
    batch_index = torch.arange(160) % 4
    import warnings

    for name in list_estimators():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no silent division by zero
            parts = score_capture(H, batch_index, get_estimator(name), n_groups=4)
        off = ~np.eye(5, dtype=bool)
        assert np.isfinite(parts["block_mi"]).all(), name
        assert np.isfinite(parts["span"][off]).all(), name
        for base, arr in parts["baselines"].items():
            assert np.isfinite(arr[~np.isnan(arr)]).all(), (name, base)
        assert np.isfinite(parts["baselines"]["cosine_bi"]).all(), name


# =============================================================================================
# files


def test_analysis_save_refuses_nonempty_folder(tmp_path, analysis_dir):
    a = Analysis.load(analysis_dir)
    target = tmp_path / "t"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(MiPrunError, match="not empty"):
        a.save(target)
    assert (target / "mine.txt").read_text() == "keep"
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(target))
    assert_one_line_error(rc, err, "not empty", "--overwrite")


def _deny_mkdir_under(monkeypatch, root: Path) -> None:
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_read_only_folder_export_and_save(tmp_path, monkeypatch, analysis_dir):
    model, tok = tiny_model("llama", n_layers=3)
    a = Analysis.load(analysis_dir)
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_mkdir_under(monkeypatch, ro)
    with pytest.raises(MiPrunError, match=r"cannot write the pruned model.*Permission denied.*writable folder"):
        export(pruned_view(model, [1]), tok, None, ro / "out")
    with pytest.raises(MiPrunError, match=r"cannot write the analysis.*Permission denied.*writable folder"):
        a.save(ro / "analysis")
    assert list(ro.iterdir()) == []


def test_full_disk_during_analysis_save(tmp_path, monkeypatch, analysis_dir):
    a = Analysis.load(analysis_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report_mod.np, "savez", full)
    with pytest.raises(MiPrunError, match=r"No space left.*free disk space"):
        a.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    a.save(tmp_path / "old")
    monkeypatch.setattr(report_mod.np, "savez", full)
    with pytest.raises(MiPrunError, match="free disk space"):
        a.save(tmp_path / "old", overwrite=True)
    assert Analysis.load(tmp_path / "old").n_blocks == a.n_blocks  # the previous one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_corrupt_and_incompatible_analysis_is_refused(tmp_path, analysis_dir):
    def broken(name: str) -> Path:
        return copy_folder(analysis_dir, tmp_path / name)

    d = broken("truncated-npz")
    raw = (d / "arrays.npz").read_bytes()
    (d / "arrays.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MiPrunError, match=r"arrays.npz is corrupt"):
        Analysis.load(d)
    d = broken("garbage-json")
    (d / "analysis.json").write_bytes(b"\x89PNG garbage {")
    with pytest.raises(MiPrunError, match="corrupt"):
        Analysis.load(d)
    d = broken("future-version")
    meta = json.loads((d / "analysis.json").read_text())
    (d / "analysis.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(MiPrunError, match=r"format 99.*reads format 1.*run the analysis again"):
        Analysis.load(d)
    d = broken("other-format")
    (d / "analysis.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MiPrunError, match="not a mi-prun analysis"):
        Analysis.load(d)
    d = broken("missing-field")
    (d / "analysis.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "estimator"}))
    with pytest.raises(MiPrunError, match="missing fields"):
        Analysis.load(d)
    d = broken("pickled-array")  # an object array needs pickle: refused, never unpickled
    np.savez(d / "arrays.npz", block_mi=np.array([object()], dtype=object))
    with pytest.raises(MiPrunError, match="corrupt"):
        Analysis.load(d)
    d = broken("no-arrays")
    (d / "arrays.npz").unlink()
    with pytest.raises(MiPrunError, match="not a saved analysis"):
        Analysis.load(d)
    rc, _, err = run_cli("show", str(tmp_path / "future-version"))
    assert_one_line_error(rc, err, "format 99")
    rc, _, err = run_cli("select", str(tmp_path / "truncated-npz"), "--n", "1")
    assert_one_line_error(rc, err, "corrupt")


# A child process that writes an export or an analysis and stalls, once everything but the final
# rename is on disk, until it is killed with SIGKILL (no finally block, no cleanup runs).
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    mode, target = sys.argv[1], Path(sys.argv[2])
    def stall(*args, **kwargs):
        print("READY", flush=True)
        time.sleep(120)
    if mode.startswith("export"):
        import mi_prun.export as P
        from mi_prun.testing import tiny_model
        model, tok = tiny_model("llama", n_layers=3)
        real = P.mergekit_yaml
        def slow_yaml(*args, **kwargs):  # config, weights, tokenizer, mi_prun.json are written
            stall()
            return real(*args, **kwargs)
        P.mergekit_yaml = slow_yaml
        from mi_prun.models import pruned_view
        P.export(pruned_view(model, [1]), tok, None, target, overwrite=mode.endswith("overwrite"))
    else:
        import mi_prun.files as F
        import mi_prun.results as R
        a = R.Analysis.load(sys.argv[3])
        F.fsync_tree = stall  # both files are written, the rename has not happened
        a.save(target, overwrite=mode.endswith("overwrite"))
    print("FINISHED", flush=True)
""")


def _looks_complete(folder: Path) -> bool:
    export_files = {"config.json", "model.safetensors", "mi_prun.json"}
    analysis_files = {"analysis.json", "arrays.npz"}
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return export_files <= names or analysis_files <= names


def test_killed_export_and_save_leave_no_complete_looking_target(tmp_path, analysis_dir):
    # Previous complete results for the overwrite cases: they must survive the kill untouched.
    model, tok = tiny_model("llama", n_layers=3)
    export(pruned_view(model, [0]), tok, None, tmp_path / "export-overwrite")
    Analysis.load(analysis_dir).save(tmp_path / "save-overwrite")
    modes = ["export-new", "export-overwrite", "save-new", "save-overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {mode: subprocess.Popen([sys.executable, "-c", CHILD, mode, str(tmp_path / mode), str(analysis_dir)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for mode in modes}
    try:
        for mode, proc in procs.items():
            line = proc.stdout.readline().strip()  # blocks until the child stalls mid-write
            assert line == "READY", (mode, line, proc.stderr.read() if proc.poll() is not None else "")
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not (tmp_path / "export-new").exists() and not (tmp_path / "save-new").exists()
    # the overwritten targets still hold the previous, complete result
    assert json.loads((tmp_path / "export-overwrite" / "mi_prun.json").read_text())["removed"] == [0]
    assert Analysis.load(tmp_path / "save-overwrite").n_blocks == 6  # tiny-llama has 6 blocks
    # what the kill left behind is hidden (.<name>.*) and never at a target path
    for p in tmp_path.iterdir():
        if p.name.startswith("."):
            assert p.name.lstrip(".") not in modes
        else:
            assert p.name in ("export-overwrite", "save-overwrite"), p
    # and loading the hidden partial folders is not needed for anything: the targets are usable
    assert load_model(str(tmp_path / "export-overwrite"), device="cpu").n_blocks == 2


# =============================================================================================
# determinism and interruption


def test_same_seed_same_analysis_and_selection(loaded):
    cfg = AnalysisConfig(calib="text:" + TEXT, n_samples=4, seq_len=32, max_positions=64, seed=3)
    a, b = analyze(loaded, cfg), analyze(loaded, cfg)
    for name in ("block_mi", "span", "span_norm", "block_mi_batches"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None:
            assert np.array_equal(x, y, equal_nan=True), name
    for name in a.baselines:
        assert np.array_equal(a.baselines[name], b.baselines[name], equal_nan=True), name
    assert a.calibration["sha256"] == b.calibration["sha256"]
    for method in ("fbs", "exact", "random"):
        assert select(a, method, n=1).removed == select(b, method, n=1).removed
    c = analyze(loaded, AnalysisConfig(calib="text:" + TEXT, n_samples=4, seq_len=32, max_positions=64, seed=4))
    assert not np.array_equal(a.block_mi, c.block_mi)  # another seed draws other samples


def test_ctrl_c_during_capture_leaves_no_hooks_and_cli_exits_130(loaded, monkeypatch):
    def interrupt(stage, fraction, message):
        if stage == "capture":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        analyze(loaded, AnalysisConfig(calib="text:" + TEXT, n_samples=4, seq_len=16, batch_size=1),
                progress=interrupt)
    assert count_hooks(loaded.model) == 0
    # Also when the hooks sit on the model itself (isolate=False), not on a weight-sharing copy.
    from mi_prun.capture import capture

    with pytest.raises(KeyboardInterrupt):
        capture(loaded.model, torch.randint(0, 250, (4, 12)), batch_size=1, progress=interrupt, isolate=False)
    assert count_hooks(loaded.model) == 0
    import mi_prun.pipeline as pipeline_mod

    real_capture = pipeline_mod.capture

    def capture_then_interrupt(model, *args, **kwargs):
        kwargs["progress"] = interrupt
        try:
            return real_capture(model, *args, **kwargs)
        finally:
            assert count_hooks(model) == 0
    monkeypatch.setattr(pipeline_mod, "capture", capture_then_interrupt)
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--calib", "text:" + TEXT, *SMALL, "--batch-size", "1")
    assert rc == 130 and err.strip() == "mi-prun: interrupted"


# =============================================================================================
# fuzz: the inputs of `mi-prun analyze` and `mi-prun select` never crash the CLI


_chars = st.characters(blacklist_categories=("Cs",))  # any Unicode a str can hold, controls included
_good_text = st.text(alphabet=_chars, min_size=100, max_size=300)  # enough for 4 x 24 byte tokens
_bad_calib = st.one_of(
    st.text(alphabet=_chars, max_size=40).map(lambda s: ("string", s)),  # empty, blank or too short
    st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c"), max_size=50).map(lambda s: ("file", s.encode())),
    st.binary(max_size=400).map(lambda b: ("file", b)),  # binary or not UTF-8
    st.sampled_from([("source", "no-such-source"), ("source", "")]),
)
_BREAKABLE = ["samples", "tokens", "positions", "estimator", "seed", "calib"]


@st.composite
def analyze_inputs(draw):
    """The settings of one `mi-prun analyze` run: all valid, or one of them broken."""
    broken = draw(st.sampled_from([None, None, None, *_BREAKABLE]))

    def pick(name, valid, *invalid):
        return draw(st.sampled_from(invalid) if broken == name else valid)
    good_calib = st.one_of(_good_text.map(lambda s: ("string", s)),
                           _good_text.map(lambda s: ("file", s.encode("utf-8"))),
                           st.just(("source", "text:" + TEXT)))
    return dict(
        calib=draw(_bad_calib if broken == "calib" else good_calib),
        samples=pick("samples", st.integers(1, 4), 0, -1, 10**6),
        tokens=pick("tokens", st.integers(2, 24), 0, 1, 257, 10**12),
        positions=pick("positions", st.integers(1, 64) | st.just(10**12), 0, -1),
        estimator=pick("estimator", st.sampled_from(["gaussian-channel", "gaussian-joint", "binning"]), "nope", ""),
        seed=pick("seed", st.integers(0, 2**63 - 1), -1, 2**63, 2**64),
        keep_first=draw(st.booleans()))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(inputs=analyze_inputs())
def test_fuzz_analyze_inputs(inputs):
    calib, samples, tokens, positions, estimator, seed, keep_first = (
        inputs[k] for k in ("calib", "samples", "tokens", "positions", "estimator", "seed", "keep_first"))
    with tempfile.TemporaryDirectory() as tmp:
        kind, value = calib
        if kind == "string":
            source = "text:" + value
        elif kind == "file":
            source = str(Path(tmp) / "calib.txt")
            Path(source).write_bytes(value)
        else:
            source = value
        argv = ["analyze", "--model", "tiny-llama", "--calib", source, "--samples", str(samples),
                "--tokens", str(tokens), "--positions", str(positions), "--estimator", estimator,
                "--seed", str(seed)] + (["--keep-first"] if keep_first else [])
        rc, out, err = run_cli(*argv)
    assert rc in (0, 2), (argv, err)
    if rc == 2:
        assert_one_line_error(rc, err)
    else:
        assert "numbered from 0" in out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(amount=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(lambda r: ["--ratio", repr(r)]),
                        st.integers(-3, 12).map(lambda n: ["--n", str(n)]), st.just([])),
       method=st.sampled_from(["fbs", "exact", "topk", "local", "shortgpt", "angular", "random", "nope"]),
       run_cost=st.sampled_from(["neg-mi", "info-loss", "neg-log-nmi", "nope"]),
       protect=st.sampled_from([[], ["--protect-ends"], ["--no-protect-ends"]]))
def test_fuzz_select_settings(analysis_dir, amount, method, run_cost, protect):
    rc, out, err = run_cli("select", str(analysis_dir), *amount, "--method", method, "--run-cost", run_cost, *protect)
    assert rc in (0, 2), err
    if rc == 2:
        assert_one_line_error(rc, err)
    else:
        assert "numbered from 0" in out
