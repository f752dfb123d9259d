"""Verification on a task or another text (`SelectConfig.verify_on`, `--verify-on`,
`mi_prun.select.task_scorer`): the task scorer's choice NLL against a hand computation and its
accuracy against lm-eval's, the verified search run on it, the CLI, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")

from mi_prun.config import AnalysisConfig, SelectConfig, ZeroShotConfig  # noqa: E402
from mi_prun.errors import MiPrunError  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analyze  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.select.task_scorer import TaskScorer, is_task_spec  # noqa: E402
from mi_prun.zeroshot import multiple_choice_items, zero_shot  # noqa: E402

ITEMS = [
    {"q": "The sky on a clear day is", "c": ["blue", "green", "loud"], "a": 0},
    {"q": "Two plus two makes", "c": ["four", "five"], "a": 0},
    {"q": "Fire feels", "c": ["cold", "hot", "wet", "sad"], "a": 1},
    {"q": "Ice is made of", "c": ["stone", "water"], "a": 1},
    {"q": "A cat says", "c": ["moo", "meow", "quack"], "a": 1},
    {"q": "Bees make", "c": ["milk", "silk", "honey"], "a": 2},
]

YAML = """task: mc_verify
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{q}}\\nAnswer:"
doc_to_choice: "{{c}}"
doc_to_target: "{{a}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

CFG = SelectConfig(verify_seq_len=64, n=2)


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mc")
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    (folder / "mc.yaml").write_text(YAML, encoding="utf-8")
    return folder / "mc.yaml"


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


def hand_choice_nll(model, tokenizer, removed) -> float:
    """Mean over items of -log softmax over choices of the summed log-likelihood, at the answer,
    from one forward pass per (context, choice) string, the request lm-eval builds."""
    view = pruned_view(model, removed)
    total = 0.0
    for it in ITEMS:
        context = f"Question: {it['q']}\nAnswer:"
        ctx = tokenizer.encode(context)
        ll = []
        for choice in it["c"]:
            whole = tokenizer.encode(context + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(view(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            ll.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        total += math.log(sum(math.exp(v) for v in ll)) - ll[it["a"]]
    return total / len(ITEMS)


def test_task_scorer_matches_hand_computation_and_lm_eval_accuracy(tiny, task_yaml):
    loaded, _ = tiny
    items = multiple_choice_items(ZeroShotConfig(tasks=(str(task_yaml),)))
    cache = NLLCache()
    scorer = TaskScorer(loaded.model, loaded.tokenizer, items, cache, batch_size=3)
    value, cached = scorer.score((1, 3))
    assert not cached and value == pytest.approx(hand_choice_nll(loaded.model, loaded.tokenizer, (1, 3)), rel=1e-5)
    assert scorer.score((3, 1)) == (value, True)  # the cache, whatever the order
    acc = zero_shot(pruned_view(loaded.model, [1, 3]), loaded.tokenizer, str(task_yaml)).by_task()["mc_verify"].acc
    assert scorer.accuracy((1, 3)) == pytest.approx(acc)


def test_verified_search_on_a_task(tiny, task_yaml):
    loaded, analysis = tiny
    cfg = CFG.replace(verify_on=str(task_yaml))
    sel = select(analysis, cfg, model=loaded)
    assert sel.verified and sel.options["verify_on"] == str(task_yaml)
    rows = [r for r in sel.candidates if len(r.removed) == sel.n]
    assert sel.nll == min(r.nll for r in rows)  # the winner has the lowest choice NLL of the sets scored
    assert sel.nll == pytest.approx(hand_choice_nll(loaded.model, loaded.tokenizer, sel.removed), rel=1e-5)
    task = sel.verification["task"]
    assert task["items"] == len(ITEMS) and 0.0 <= task["winner_accuracy"] <= 1.0
    assert sel.verification["tokens"]["kind"] == "task"
    assert sel.verification["tokens"]["tasks"][0]["task"] == "mc_verify"
    assert sel.verification["race"]["mode"] == "off (the scorer cannot race)"  # a task's NLL is not per sample
    assert all(r.complete and r.samples is None for r in sel.candidates)
    # verified on text (the default) the same search scores other values
    text_sel = select(analysis, CFG, model=loaded)
    assert text_sel.nll != sel.nll and "task" not in text_sel.verification


def test_verify_on_another_text(tiny):
    loaded, analysis = tiny
    text = "text:" + "A short text about rivers, mountains and the sea. " * 60
    sel = select(analysis, CFG.replace(verify_on=text, verify_samples=4), model=loaded)
    assert sel.verified and sel.verification["tokens"]["n_samples"] == 4
    assert sel.nll != select(analysis, CFG, model=loaded).nll


def test_cli_select_and_prune_verify_on_task(tiny, task_yaml, tmp_path):
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--samples", "8", "--tokens", "48",
                         "--out", str(tmp_path / "a"))
    assert rc == 0, err
    rc, out, err = run_cli("select", str(tmp_path / "a"), "--n", "2", "--model", "tiny-llama",
                           "--verify-tokens", "64", "--verify-on", str(task_yaml), "--out", str(tmp_path / "s.json"))
    assert rc == 0, err
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["verified"] and saved["verification"]["task"]["items"] == len(ITEMS)
    rc, out, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(tmp_path / "a"), "--n", "2",
                           "--verify-tokens", "64", "--verify-on", str(task_yaml), "--verify-items", "4",
                           "--out", str(tmp_path / "p"))
    assert rc == 0, err
    meta = json.loads((tmp_path / "p" / "mi_prun.json").read_text())
    assert meta["selection"]["verification"]["task"]["items"] == 4


def test_bad_verify_on_is_one_line(tiny, task_yaml, tmp_path):
    loaded, analysis = tiny
    assert is_task_spec(str(task_yaml)) and not is_task_spec("builtin")
    with pytest.raises(MiPrunError, match="not found. Fix:"):
        select(analysis, CFG.replace(verify_on=str(tmp_path / "missing.yaml")), model=loaded)
    gen = tmp_path / "gen.yaml"
    gen.write_text(YAML.replace("output_type: multiple_choice", "output_type: generate_until")
                   .replace("mc_verify", "gen_task"), encoding="utf-8")
    (tmp_path / "items.jsonl").write_text(json.dumps(ITEMS[0]) + "\n", encoding="utf-8")
    with pytest.raises(MiPrunError, match="not multiple-choice.*Fix: give a task with output_type: multiple_choice"):
        select(analysis, CFG.replace(verify_on=str(gen)), model=loaded)
    rc, _, err = run_cli("select", "/nonexistent-analysis", "--verify-items", "0")
    assert_one_line_error(rc, err, "--verify-items", "positive integer")
