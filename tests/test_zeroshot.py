"""Zero-shot accuracy through lm-evaluation-harness (`mi_prun.zeroshot`, `mi-prun eval --tasks`):
a small local multiple-choice task, checked against a hand computation of the same model's
log-likelihoods; the export record; one-line errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")

from mi_prun.config import ZeroShotConfig  # noqa: E402
from mi_prun.errors import MiPrunError  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.zeroshot import multiple_choice_items, record_zero_shot, zero_shot  # noqa: E402

ITEMS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two makes", "choices": ["four", "five"], "label": 0},
    {"question": "Fire feels", "choices": ["cold", "hot", "wet", "sad"], "label": 1},
    {"question": "Ice is made of", "choices": ["stone", "water"], "label": 1},
    {"question": "A cat says", "choices": ["moo", "meow", "quack"], "label": 1},
    {"question": "The opposite of up is", "choices": ["down", "left"], "label": 0},
    {"question": "Bees make", "choices": ["milk", "silk", "honey"], "label": 2},
]

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 3.0
"""


def write_task(folder, items=ITEMS, yaml_text=TASK_YAML, name="tiny_mc.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (folder / name).write_text(yaml_text, encoding="utf-8")
    return folder / name


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def hand_loglikelihoods(model, tokenizer, context: str, choice: str) -> float:
    """log p(" " + choice | context), summed over the choice's tokens, by one forward pass: the
    request lm-eval builds (target delimiter " "; context encoded as the tokenizer does by default,
    the continuation's tokens being those of the whole string after the context's)."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + " " + choice)
    assert whole[:len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def hand_scores(model, tokenizer, items=ITEMS) -> tuple[float, float, float]:
    """(acc, acc_stderr, acc_norm) by lm-eval's definitions: argmax of the summed log-likelihood;
    the standard error of the mean of the 0/1 scores (sample standard deviation / sqrt(n));
    acc_norm: argmax of the log-likelihood per character of the continuation."""
    hits, norm_hits = [], []
    for it in items:
        ll = [hand_loglikelihoods(model, tokenizer, it["question"], c) for c in it["choices"]]
        hits.append(float(max(range(len(ll)), key=lambda i: ll[i]) == it["label"]))
        per_char = [v / len(" " + c) for v, c in zip(ll, it["choices"])]
        norm_hits.append(float(max(range(len(ll)), key=lambda i: per_char[i]) == it["label"]))
    n = len(hits)
    acc = sum(hits) / n
    sd = math.sqrt(sum((h - acc) ** 2 for h in hits) / (n - 1))
    return acc, sd / math.sqrt(n), sum(norm_hits) / n


def test_accuracy_equals_hand_computation_on_a_pruned_view(tiny, task_yaml):
    view = pruned_view(tiny.model, [2, 3])
    res = zero_shot(view, tiny.tokenizer, str(task_yaml))
    score = res.by_task()["tiny_mc"]
    acc, stderr, acc_norm = hand_scores(view, tiny.tokenizer)
    assert score.samples == len(ITEMS)
    assert score.acc == pytest.approx(acc, abs=1e-9)
    assert score.acc_stderr == pytest.approx(stderr, rel=1e-6)
    assert score.acc_norm == pytest.approx(acc_norm, abs=1e-9)
    assert float(score.version) == 3.0 and res.lm_eval_version
    assert str(task_yaml.resolve()) in score.sha256  # the task's files are named in the record
    # the dense model scores its own log-likelihoods (a different model, its own hand computation)
    dense = zero_shot(tiny, tasks=[str(task_yaml)]).by_task()["tiny_mc"]
    assert dense.acc == pytest.approx(hand_scores(tiny.model, tiny.tokenizer)[0], abs=1e-9)
    assert not tiny.model.training and len(tiny.model.model.layers) == 6  # the shared model is untouched


def test_items_are_the_requests_lm_eval_scores(task_yaml):
    items = multiple_choice_items(ZeroShotConfig(tasks=(str(task_yaml),), limit=3))
    assert [it.target for it in items] == [it["label"] for it in ITEMS[:3]]
    assert items[0].context == ITEMS[0]["question"]
    assert items[0].choices == tuple(" " + c for c in ITEMS[0]["choices"])


def test_export_gets_the_record_and_eval_from_the_folder_agrees(tiny, task_yaml, tmp_path):
    from mi_prun.models import prune
    from mi_prun.export import export

    pruned = prune(tiny.model, [1, 4])
    out = export(pruned, tiny.tokenizer, None, tmp_path / "exp")
    before = json.loads((out / "mi_prun.json").read_text())
    res = zero_shot(str(out), tasks=str(task_yaml))
    assert res.by_task()["tiny_mc"].acc == pytest.approx(hand_scores(pruned, tiny.tokenizer)[0], abs=1e-9)
    record_zero_shot(out, res)
    meta = json.loads((out / "mi_prun.json").read_text())
    entry = meta["zero_shot"]["tasks"]["tiny_mc"]
    assert entry["acc"] == res.by_task()["tiny_mc"].acc and entry["lm_eval_version"] == res.lm_eval_version
    assert float(entry["version"]) == 3.0 and entry["samples"] == len(ITEMS) and entry["num_fewshot"] == 0
    assert {k: v for k, v in meta.items() if k != "zero_shot"} == before  # nothing else changed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cli_eval_tasks_records_in_export(tiny, task_yaml, tmp_path):
    from mi_prun.models import prune
    from mi_prun.export import export

    out = export(prune(tiny.model, [2]), tiny.tokenizer, None, tmp_path / "exp")
    rc, stdout, err = run_cli("eval", "--model", str(out), "--data", "text:" + "hello world " * 40,
                              "--seq-len", "32", "--tasks", str(task_yaml), "--limit", "5")
    assert rc == 0, err
    assert "perplexity" in stdout and "tiny_mc: acc" in stdout and "(5 items" in stdout
    assert f"recorded in {out / 'mi_prun.json'}" in stdout
    entry = json.loads((out / "mi_prun.json").read_text())["zero_shot"]["tasks"]["tiny_mc"]
    assert entry["samples"] == 5 and entry["limit"] == 5


def test_folder_of_tasks(tiny, tmp_path):
    folder = tmp_path / "tasks"
    write_task(folder)
    write_task(folder, items=ITEMS[:3], yaml_text=TASK_YAML.replace("tiny_mc", "tiny_mc3"), name="three.yaml")
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    res = zero_shot(tiny, tasks=str(folder))
    assert sorted(res.by_task()) == ["tiny_mc", "tiny_mc3"]


def test_bad_tasks_are_one_line_errors(tiny, task_yaml, tmp_path):
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(tmp_path / "nope.yaml"))
    assert_one_line_error(rc, err, "nope.yaml not found", "Fix:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n  doc_to_text: {{\n", encoding="utf-8")
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(bad))
    assert_one_line_error(rc, err, "bad.yaml", "cannot be read as a task YAML", "Fix: correct the YAML")
    notask = tmp_path / "notask.yaml"
    notask.write_text("dataset_path: json\n", encoding="utf-8")
    with pytest.raises(MiPrunError, match="no `task:` key.*Fix: add `task: <name>`"):
        zero_shot(tiny, tasks=str(notask))
    nodata = write_task(tmp_path / "nodata")
    (tmp_path / "nodata" / "items.jsonl").unlink()
    with pytest.raises(MiPrunError, match="data file items.jsonl not found.*Fix:"):
        zero_shot(tiny, tasks=str(nodata))
    broken = write_task(tmp_path / "broken", yaml_text=TASK_YAML.replace("output_type: multiple_choice",
                                                                          "output_type: no_such_type"))
    with pytest.raises(MiPrunError, match="tiny_mc could not be built.*Fix: correct the task YAML"):
        zero_shot(tiny, tasks=str(broken))
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--limit", "3")
    assert_one_line_error(rc, err, "--limit would be ignored", "no --tasks")


@pytest.mark.slow
def test_unknown_task_name_suggests_and_names_the_fix(tiny):
    """Indexing lm-eval's own tasks takes about 14 s on a busy 2-core machine."""
    with pytest.raises(MiPrunError, match=r"unknown task 'piqaa' \(did you mean piqa.*Fix: give a name lm-eval lists"):
        zero_shot(tiny, tasks="piqaa")


def test_missing_lm_eval_names_the_extra(tiny, task_yaml, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(MiPrunError, match=r'not installed\. Fix: pip install "mi-prun\[eval\]"'):
        zero_shot(tiny, tasks=str(task_yaml))
