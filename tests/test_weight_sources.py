"""Every forward pass gives the same numbers whatever holds the weights.

One suite, parametrised over tiny families and the three weight sources of `mi_prun.runtime`
(resident in memory, streamed block by block from safetensors, dispatched by accelerate with part of
the blocks on the CPU and part offloaded to disk): capture, per-row NLL, prefix-cached scoring of
some verification groups (and from a lazy prefix, the confirmation's), task scoring, healing and
export all equal the resident model's within float tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

from mi_prun.capture import capture
from mi_prun.config import HealConfig
from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import token_nll_rows
from mi_prun.heal import heal
from mi_prun.models import find_blocks
from mi_prun.runtime import load_model
from mi_prun.select.scorer import NLLCache, PrefixScorer
from mi_prun.select.task_scorer import TaskScorer
from mi_prun.testing import tiny_model
from mi_prun.zeroshot import ChoiceItem

FAMILIES = ["llama", "gemma3", "gpt2", "qwen3"]
SOURCES = ["streamed", "dispatched"]
N_LAYERS = 6


def _tokens(n: int = 6, t: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding in one row
    return ids, mask


def _device_map(model: torch.nn.Module) -> dict[str, str]:
    """Blocks 0-2 on the CPU, 3.. offloaded to disk, every other module on the CPU (leaf names)."""
    path = find_blocks(model).path
    out: dict[str, str] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):  # a tied head needs its own entry
        if name.startswith(path + "."):
            i = int(name[len(path) + 1:].split(".")[0])
            out[f"{path}.{i}"] = "cpu" if i < 3 else "disk"
        else:
            out[name.rpartition(".")[0]] = "cpu"
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    """{source name: LoadedModel} of one tiny family saved to disk."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    model, tok = tiny_model(family, n_layers=N_LAYERS)
    model.save_pretrained(tmp / "src")
    tok.save_pretrained(tmp / "src")
    (tmp / "map.json").write_text(json.dumps(_device_map(model)))
    out = {"resident": load_model(tmp / "src", device="cpu", dtype="float32", stream=False),
           "streamed": load_model(tmp / "src", device="cpu", dtype="float32", stream=True),
           "dispatched": load_model(tmp / "src", device="cpu", dtype="float32", device_map=str(tmp / "map.json"),
                                    offload_folder=tmp / "off")}
    return family, out, tmp


@pytest.mark.parametrize("source", SOURCES)
def test_the_source_is_the_one_asked_for(models, source):
    family, m, _ = models
    assert m[source].weights.kind == source and m["resident"].weights.kind == "resident"
    assert any(p.is_meta for p in m[source].model.parameters())  # really not in memory


@pytest.mark.parametrize("source", SOURCES)
def test_capture_and_nll_rows_equal_resident(models, source):
    _, m, _ = models
    ids, mask = _tokens()
    a = capture(m["resident"].model, ids, mask, max_positions=50, batch_size=4)
    b = capture(m[source].model, ids, mask, max_positions=50, batch_size=4)
    torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
    ra, rb = (token_nll_rows(m[k].model, ids, mask, batch_size=4) for k in ("resident", source))
    torch.testing.assert_close(rb[0], ra[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(rb[1], ra[1])


@pytest.mark.parametrize("source", SOURCES)
def test_prefix_cached_scoring_of_some_groups_equals_resident(models, source):
    _, m, _ = models
    ids, mask = _tokens(n=8)
    scorers = {k: PrefixScorer(m[k].model, ids, mask, 2, range(1, N_LAYERS), NLLCache()) for k in ("resident", source)}
    assert scorers[source].groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for removed in ([2, 3], [4], [1, 5]):
        full = scorers["resident"].rows(removed)
        some = scorers[source].rows(removed, groups=[3, 1])
        torch.testing.assert_close(some[0], torch.cat([full[0][6:8], full[0][2:4]]), atol=1e-6, rtol=1e-6)
        # from the cached dense state at the first removed block = from the embeddings
        torch.testing.assert_close(scorers[source].rows(removed, use_prefix=False)[0], full[0], atol=1e-6, rtol=1e-6)
        # the units charged: the blocks run from the first removed block, without the removed ones
        assert scorers[source].units(removed, groups=[3]) == 2 * ids.shape[1] * (N_LAYERS - removed[0] - len(
            [b for b in removed if b >= removed[0]]) + 1)
    # sets that remove what an earlier set removed up to a later block start from its kept states
    hits = scorers[source].run_states.hits
    for removed in ([2, 3, 5], [2, 3, 4], [1, 5, 4]):
        full = scorers["resident"].rows(removed)
        some = scorers[source].rows(removed, groups=[3, 1])
        torch.testing.assert_close(some[0], torch.cat([full[0][6:8], full[0][2:4]]), atol=1e-6, rtol=1e-6)
    assert scorers[source].run_states.hits >= hits + 2 * 2  # [2, 3, 5] and [1, 4, 5] in both groups
    assert scorers[source].dense() == pytest.approx(scorers["resident"].dense(), rel=1e-6)


@pytest.mark.parametrize("source", SOURCES)
def test_a_lazy_prefix_equals_resident(models, source):
    # the confirmation's draw B: the dense blocks run on demand, only as deep as the sets scored need
    _, m, _ = models
    ids, mask = _tokens(n=8)
    lazy = PrefixScorer(m[source].model, ids, mask, 2, range(1, N_LAYERS), NLLCache(), dense=False)
    ref = PrefixScorer(m["resident"].model, ids, mask, 2, range(1, N_LAYERS), NLLCache())
    for removed in ([3, 4], [1, 5], [2]):
        torch.testing.assert_close(lazy.rows(removed)[0], ref.rows(removed)[0], atol=1e-6, rtol=1e-6)
    assert lazy.cache.prefix["prefix"].reached[0] == 3 and lazy.dense_passes == 0
    with pytest.raises(MiPrunError, match="runs no dense pass"):
        lazy.dense()


@pytest.mark.parametrize("source", SOURCES)
def test_task_scoring_equals_resident(models, source):
    _, m, _ = models
    tok = m["resident"].tokenizer
    items = [ChoiceItem("t", i, f"Question {i}: the sky is", (" blue", " green", " made of cheese"), i % 3)
             for i in range(4)]
    got = {k: TaskScorer(m[k].model, tok, items, NLLCache(), batch_size=4).measure([2]) for k in ("resident", source)}
    assert got[source][0] == pytest.approx(got["resident"][0], rel=1e-6, abs=1e-7)
    assert got[source][1] == got["resident"][1]


@pytest.mark.parametrize("source", SOURCES)
def test_healing_and_export_equal_resident(models, source, tmp_path):
    from transformers import AutoModelForCausalLM

    from mi_prun.export import export

    _, m, _ = models
    calib = calibration_tokens(m["resident"].tokenizer, load_text("builtin"), 8, 40, seed=0)
    cfg = HealConfig(n_samples=8, seq_len=40, batch_size=4, ridge=1e-3)
    healed = {k: heal(m[k].model, [2, 4], calib, config=cfg) for k in ("resident", source)}  # block 4 is on disk
    ra, rb = healed["resident"][1], healed[source][1]
    assert [r.unexplained_healed for r in rb.runs] == pytest.approx([r.unexplained_healed for r in ra.runs],
                                                                    rel=1e-4, abs=1e-7)
    ids, mask = _tokens()
    na, nb = (token_nll_rows(healed[k][0], ids, mask)[0] for k in ("resident", source))
    torch.testing.assert_close(nb, na, atol=1e-5, rtol=1e-5)
    outs = [export(healed[k][0], m[k].tokenizer, None, tmp_path / k, loaded=m[k]) for k in ("resident", source)]
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(p)(input_ids=ids, attention_mask=mask).logits for p in outs)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)


def test_results_record_where_the_weights_were(models):
    from mi_prun.pipeline import resources

    _, m, _ = models
    assert resources(m["resident"])["weights"] == "resident"
    streamed = resources(m["streamed"])
    assert streamed["weights_at"] == "disk" and streamed["offload"] is True
    dispatched = resources(m["dispatched"])
    assert dispatched["weights"] == "dispatched" and "disk" in dispatched["weights_at"] and not dispatched["offload"]


@pytest.mark.parametrize("source", SOURCES)
def test_zero_shot_through_lm_eval_equals_resident(models, source, tmp_path):
    """lm-eval's HF wrapper runs the model through the block runner, so a streamed or dispatched
    model gets the resident model's accuracy (it used to fail on the meta device)."""
    pytest.importorskip("lm_eval")
    from test_zeroshot import write_task

    from mi_prun.config import ZeroShotConfig
    from mi_prun.zeroshot import zero_shot

    family, m, _ = models
    if family != "llama":
        pytest.skip("one family is enough for lm-eval's wrapper (the runner is covered above)")
    task = write_task(tmp_path / "task")
    got = {k: zero_shot(m[k], tasks=[str(task)], config=ZeroShotConfig(batch_size=4)) for k in ("resident", source)}
    a, b = got["resident"].tasks[0], got[source].tasks[0]
    assert (b.acc, b.samples) == (a.acc, a.samples)


def test_generation_speed_runs_dispatched_and_refuses_streamed_in_one_line(models):
    from mi_prun.errors import MiPrunError
    from mi_prun.evaluate import generate_sample
    from mi_prun.speed import size_and_speed

    _, m, _ = models
    got = size_and_speed(m["dispatched"].model, m["dispatched"].tokenizer, prompt_tokens=8, decode_tokens=2, repeats=1)
    assert got["prefill_tokens_per_s"] > 0
    for call in (lambda: size_and_speed(m["streamed"].model, m["streamed"].tokenizer, prompt_tokens=8,
                                        decode_tokens=2, repeats=1),
                 lambda: generate_sample(m["streamed"].model, m["streamed"].tokenizer, "Hello")):
        with pytest.raises(MiPrunError, match=r"streams its blocks.*Fix: load it without --stream") as err:
            call()
        assert "\n" not in str(err.value)


def test_cli_tasks_run_streamed(tmp_path, capsys):
    """`eval --stream --tasks` and `select --stream --verify-on TASK` run through the runner (they failed
    with "Tensor on device cpu is not on the expected device meta!")."""
    pytest.importorskip("lm_eval")
    from cli_helpers import run_cli
    from test_zeroshot import write_task

    model, tok = tiny_model("llama", n_layers=N_LAYERS)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    task = write_task(tmp_path / "task")
    small = ["--device", "cpu", "--calib", "builtin", "--samples", "4", "--tokens", "32", "--positions", "80"]
    rc, _, err = run_cli("analyze", "--model", str(tmp_path / "m"), "--stream", *small, "--out", str(tmp_path / "a"))
    assert rc == 0, err
    rc, out, err = run_cli("eval", "--model", str(tmp_path / "m"), "--device", "cpu", "--stream", "--tasks", str(task),
                           "--data", "builtin", "--seq-len", "32", "--max-windows", "2")
    assert rc == 0 and "tiny_mc" in out, err
    rc, out, err = run_cli("select", str(tmp_path / "a"), "--n", "2", "--model", str(tmp_path / "m"), "--device", "cpu",
                           "--stream", "--verify-on", str(task), "--verify-passes", "3")
    assert rc == 0 and "verified" in out.lower(), err


@pytest.mark.parametrize("argv, flag", [
    (["select", "{a}", "--n", "2", "--stream"], "--stream"),
    (["analyze", "--model", "{m}", "--device", "cpu", "--stream", "--offload-folder", "{t}/off", "--calib", "builtin",
      "--out", "{t}/x"], "--offload-folder"),
])
def test_stream_flags_that_would_mean_nothing_are_one_line(tmp_path, argv, flag):
    """--stream without a model to stream; --offload-folder (accelerate's) without a device map."""
    from cli_helpers import assert_one_line_error, run_cli

    model, tok = tiny_model("llama", n_layers=4)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "a").mkdir()
    rc, _, err = run_cli(*[a.format(a=tmp_path / "a", m=tmp_path / "m", t=tmp_path) for a in argv])
    assert_one_line_error(rc, err, flag)
    assert not (tmp_path / "x").exists() and not (tmp_path / "off").exists()
