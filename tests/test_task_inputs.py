"""Task inputs for zero-shot accuracy and task-based verification (`mi_prun.zeroshot`): task YAMLs
are read the way lm-eval reads them (`!function` resolved), and a task that lm-eval would score
wrongly or fail on deep inside is refused in one line naming the file and the fix.
docs/RELIABILITY.md cites these tests as `T::test`."""

from __future__ import annotations

import json

import pytest

from cli_helpers import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")

from mi_prun.config import ZeroShotConfig  # noqa: E402
from mi_prun.errors import MiPrunError  # noqa: E402
from mi_prun.models import load_model  # noqa: E402
from mi_prun.zeroshot import multiple_choice_items, zero_shot  # noqa: E402

ITEMS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two makes", "choices": ["four", "five"], "label": 0},
    {"question": "Fire feels", "choices": ["cold", "hot", "wet", "sad"], "label": 1},
    {"question": "Ice is made of", "choices": ["stone", "water"], "label": 1},
    {"question": "A cat says", "choices": ["moo", "meow", "quack"], "label": 1},
    {"question": "The opposite of up is", "choices": ["down", "left"], "label": 0},
]

FN_YAML = """task: tiny_fn
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: !function utils.prompt
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS = '''def prompt(doc):
    return "Question: " + doc["question"] + "\\nAnswer:"
'''


def write_task(folder, items=ITEMS, yaml_text=FN_YAML, utils=UTILS, name="tiny_fn.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (folder / name).write_text(yaml_text, encoding="utf-8")
    if utils is not None:
        (folder / "utils.py").write_text(utils, encoding="utf-8")
    return folder / name


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def lm_eval_own_accuracy(loaded, folder, task: str) -> float:
    """lm-eval's own result: its TaskManager indexes the folder (resolving `!function` relative to
    the YAML) and its evaluator scores the model through its HF wrapper."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mi_prun.models import pruned_view

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = HFLM(pretrained=pruned_view(loaded.model, []), tokenizer=loaded.tokenizer, batch_size=1)
    res = lm_eval.evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=manager, num_fewshot=0,
                                            log_samples=False)
    return float(res["results"][task]["acc,none"])


def test_function_prompts_are_resolved_and_agree_with_lm_eval(tiny, tmp_path, monkeypatch):
    path = write_task(tmp_path / "task")
    items = multiple_choice_items(ZeroShotConfig(tasks=(str(path),)))
    # the prompt is the function's output, never the function's path as a template
    assert [it.context for it in items] == [f"Question: {it['question']}\nAnswer:" for it in ITEMS]
    res = zero_shot(tiny, tasks=str(path))
    score = res.by_task()["tiny_fn"]
    assert score.samples == len(ITEMS)
    monkeypatch.chdir(tmp_path / "task")  # lm-eval reads relative data files from the current folder
    assert score.acc == pytest.approx(lm_eval_own_accuracy(tiny, tmp_path / "task", "tiny_fn"), abs=1e-12)
    assert str((tmp_path / "task" / "utils.py").resolve()) in score.sha256  # the function's file is recorded


def test_function_that_cannot_be_resolved_is_one_line(tiny, tmp_path):
    missing_fn = write_task(tmp_path / "a", yaml_text=FN_YAML.replace("utils.prompt", "utils.no_such"))
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(missing_fn))
    assert_one_line_error(rc, err, "tiny_fn.yaml", "`!function` cannot be resolved", "no_such", "Fix:")
    missing_file = write_task(tmp_path / "b", utils=None)
    with pytest.raises(MiPrunError, match=r"`!function` cannot be resolved.*Fix: define the function"):
        zero_shot(tiny, tasks=str(missing_file))
    broken = write_task(tmp_path / "c", utils="def prompt(doc:\n")
    with pytest.raises(MiPrunError, match=r"`!function` cannot be resolved \(SyntaxError"):
        zero_shot(tiny, tasks=str(broken))
