"""Block streaming: the runner gives every family's own logits, a streamed model reads one block at a
time, a verified selection and the CLI pipeline run streamed, and streaming is chosen (or refused) as
the memory check says. The equality of every forward pass across the three weight sources is
`tests/test_weight_sources.py`."""

from __future__ import annotations

import pytest
import torch

from mi_prun.capture import capture
from mi_prun.config import HealConfig, SelectConfig
from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import token_nll
from mi_prun.heal import heal
from mi_prun.models import find_blocks
from mi_prun.runtime.runner import BlockRunner
from mi_prun.runtime.sources import offload_to_cpu, open_streamed, weight_source

from mi_prun.testing import tiny_model



def is_streamed(model) -> bool:
    return weight_source(model).kind == "streamed"
CPU = torch.device("cpu")


def _tokens(n: int = 6, t: int = 24, seed: int = 0, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -5:] = 0  # right padding in one row
    return ids, mask


def test_runner_logits_equal_the_forward_pass_for_every_family():
    from mi_prun.testing import FAMILIES as ALL

    ids, mask = _tokens()
    for family in ALL:
        model, _ = tiny_model(family)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        streamed = offload_to_cpu(model, CPU)
        runner = BlockRunner(streamed, ids, mask, batch_size=4)
        got = torch.cat(list(runner.logits(runner.last(runner.h0))))
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5, msg=family)


def test_streaming_reads_one_block_at_a_time(tmp_path, monkeypatch):
    model, _ = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp_path)
    streamed = open_streamed(tmp_path, CPU, torch.float32)
    assert all(p.is_meta for p in find_blocks(streamed).blocks.parameters())
    stream = weight_source(streamed).stream
    reads: list[list[str]] = []
    real_get = stream.store.get
    monkeypatch.setattr(stream.store, "get", lambda keys: reads.append(sorted(keys)) or real_get(keys))
    ids, mask = _tokens(4, 16)
    capture(streamed, ids, mask, max_positions=30, batch_size=2)
    prefixes = [{k.split(".")[2] for k in keys} for keys in reads]
    assert prefixes == [{"0"}, {"1"}, {"2"}, {"3"}]  # each block read once, alone


def test_streamed_model_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(MiPrunError, match="no .safetensors"):
        open_streamed(tmp_path, CPU, torch.float32)
    model, _ = tiny_model("llama", n_layers=2)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MiPrunError, match="not in the weights files.*down_proj"):
        open_streamed(tmp_path, CPU, torch.float32)


def test_verified_select_streamed_equals_in_memory(tmp_path):
    from mi_prun.config import AnalysisConfig
    from mi_prun.runtime import load_model
    from mi_prun.pipeline import analyze
    from mi_prun.select import select

    model, tok = tiny_model("llama", n_layers=8)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    mem = load_model(tmp_path / "m", device="cpu", dtype="float32", stream=False)
    st = load_model(tmp_path / "m", device="cpu", dtype="float32", stream=True)
    assert is_streamed(st.model) and not is_streamed(mem.model)
    acfg = AnalysisConfig(calib="builtin", n_samples=4, seq_len=48, max_positions=120)
    a_mem, a_st = analyze(mem, acfg), analyze(st, acfg)
    torch.testing.assert_close(torch.as_tensor(a_st.block_mi), torch.as_tensor(a_mem.block_mi), atol=1e-4, rtol=1e-4)
    assert a_st.resources["offload"] is True and a_st.resources["rss_peak_bytes"] > 0
    a_st.check_model(mem.model)  # the identity of a streamed model is the identity of the model
    cfg = SelectConfig(n=2, verify_passes=6, verify_samples=4, verify_seq_len=32)
    s_mem, s_st = select(a_mem, config=cfg, model=mem), select(a_mem, config=cfg, model=st)
    assert s_st.removed == s_mem.removed and s_st.nll == pytest.approx(s_mem.nll, rel=1e-5)
    assert s_st.verification["peak_memory"]["rss_peak_bytes"] > 0


# ------------------------------------------------------------------------------ export, CLI, errors


def _saved(tmp_path, family="llama", n_layers=6):
    model, tok = tiny_model(family, n_layers=n_layers)
    folder = tmp_path / f"src-{family}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder


def test_cli_stream_analyze_prune_eval(tmp_path, capsys):
    import json

    from mi_prun.cli import main

    _, folder = _saved(tmp_path, n_layers=8)
    common = ["--model", str(folder), "--device", "cpu", "--stream", "--calib", "builtin", "--samples", "4",
              "--tokens", "48", "--positions", "120"]
    assert main(["--quiet", "analyze", *common, "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert meta["resources"]["offload"] is True and meta["resources"]["weights_at"] == "disk"
    assert main(["--quiet", "select", str(tmp_path / "a"), "--n", "2", "--model", str(folder), "--device", "cpu", "--offload",
                 "--verify-passes", "4", "--verify-samples", "4", "--verify-tokens", "32"]) == 0
    assert main(["--quiet", "prune", "--model", str(folder), "--device", "cpu", "--offload", "--analysis", str(tmp_path / "a"),
                 "--n", "2", "--verify-passes", "0", "--out", str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p" / "mi_prun.json").read_text())
    assert record["n_blocks"] == 6 and record["peak_memory"]["rss_peak_bytes"] > 0
    assert main(["--quiet", "eval", "--model", str(tmp_path / "p"), "--device", "cpu", "--offload", "--data", "builtin",
                 "--seq-len", "32", "--max-windows", "2"]) == 0
    captured = capsys.readouterr()
    assert "perplexity" in captured.out
    # --offload, the earlier name of --stream, still works and says so once per command
    assert captured.err.count("note: --offload is now --stream") == 3


def test_offload_is_chosen_when_the_model_does_not_fit(tmp_path, monkeypatch):
    from mi_prun.models import memory
    from mi_prun.runtime import load_model

    _, folder = _saved(tmp_path)
    need = memory.weights_bytes(folder, None, torch.float32)
    monkeypatch.setattr(memory, "available_memory", lambda device: int(need * 0.8))  # a block fits, the model not
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert is_streamed(loaded.model) and loaded.info["offload"] == "disk"
    with pytest.raises(MiPrunError, match="--stream"):
        load_model(folder, device="cpu", dtype="float32", stream=False)
    monkeypatch.setattr(memory, "available_memory", lambda device: 16)  # not even one block
    with pytest.raises(MiPrunError, match="needs about .*--stream.*--device-map auto"):
        load_model(folder, device="cpu", dtype="float32")
    with pytest.raises(MiPrunError, match="fits nowhere: even streamed"):
        load_model(folder, device="cpu", dtype="float32", stream=True)


def test_bad_execution_input_is_one_line(tmp_path):
    import json

    from mi_prun.runtime import load_model

    _, folder = _saved(tmp_path, n_layers=2)
    cases = [
        ({"device": "cuda:7"} if not torch.cuda.is_available() or torch.cuda.device_count() < 8
         else {"device": "nonsense"}, "cuda|device"),
        ({"device": "tpu"}, "unknown device|not supported"),
        ({"stream": "sometimes"}, "stream must be"),
        ({"stream": True, "device_map": "auto"}, "alternatives"),
        ({"device_map": {"": 9}}, "GPU 9"),
        ({"device_map": {"": "cuda:5"}}, "cuda:5"),
        ({"device_map": str(tmp_path / "missing.json")}, "not found"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2]")
    cases.append(({"device_map": str(bad_json)}, "JSON object"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    import os

    if os.geteuid() != 0:  # root writes anywhere
        cases.append(({"device_map": "auto", "offload_folder": str(locked / "x")}, "not writable"))
    (tmp_path / "file").write_text("x")
    cases.append(({"device_map": "auto", "offload_folder": str(tmp_path / "file" / "sub")}, "not writable"))
    for kwargs, pattern in cases:
        with pytest.raises(MiPrunError, match=pattern) as err:
            load_model(folder, **{"device": "cpu", **kwargs})
        assert "\n" not in str(err.value), kwargs
    assert json.loads(bad_json.read_text()) == [1, 2]
    assert not (tmp_path / "file" / "sub").exists()


# ------------------------------------------------------------------------------ accelerate device maps


# ------------------------------------------------------------------------------ CUDA (skipped without a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_streamed_on_cuda_equals_in_memory_on_cuda(family, tmp_path):
    cuda = torch.device("cuda")
    model, tok = tiny_model(family)
    model.save_pretrained(tmp_path)
    mem = model.to(cuda)
    st = open_streamed(tmp_path, cuda, torch.float32)
    ids, mask = _tokens()
    a, b = capture(mem, ids, mask, max_positions=60), capture(st, ids, mask, max_positions=60)
    assert a.hidden.device.type == b.hidden.device.type == "cuda"
    torch.testing.assert_close(b.hidden, a.hidden, atol=1e-4, rtol=1e-4)
    assert token_nll(st, ids, mask)[0] == pytest.approx(token_nll(mem, ids, mask)[0], rel=1e-4)
    calib = calibration_tokens(tok, load_text("builtin"), 8, 40, seed=0)
    cfg = HealConfig(n_samples=8, seq_len=40, batch_size=4, ridge=1e-3)
    hm, _ = heal(mem, [2, 4], calib, config=cfg)
    hs, _ = heal(st, [2, 4], calib, config=cfg)
    assert token_nll(hs, ids, mask)[0] == pytest.approx(token_nll(hm, ids, mask)[0], rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_cli_pipeline_on_cuda_in_bfloat16(tmp_path):
    import json

    from mi_prun.cli import main

    _, folder = _saved(tmp_path, n_layers=8)
    for offload in ("--no-stream", "--stream"):
        out = tmp_path / offload.strip("-")
        args = ["--model", str(folder), "--device", "cuda", offload, "--calib", "builtin", "--samples", "4",
                "--tokens", "48", "--positions", "120"]
        assert main(["--quiet", "prune", *args, "--n", "2", "--verify-passes", "4", "--verify-samples", "4",
                     "--verify-tokens", "32", "--heal", "--out", str(out)]) == 0
        record = json.loads((out / "mi_prun.json").read_text())
        assert record["dtype"] == "bfloat16" and record["peak_memory"]["cuda_max_allocated_bytes"] > 0
        assert main(["--quiet", "eval", "--model", str(out), "--device", "cuda", offload, "--data", "builtin",
                     "--seq-len", "32", "--max-windows", "2"]) == 0
