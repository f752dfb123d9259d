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
from mi_prun.runtime import load_model  # noqa: E402
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


# ---------------------------------------------------------------------------------------------
# tasks lm-eval would score wrongly, or fail on deep inside: refused in one line naming the file

PLAIN_YAML = FN_YAML.replace("!function utils.prompt", '"{{question}}"')


def _item(**changes):
    return [dict(ITEMS[0], **changes)] + ITEMS[1:]


DEGENERATE = {
    "no items": ([], "holds no item"),
    "label out of range, first item": (_item(label=7), "not one of its choices, or the item has no choices"),
    "label out of range, later item": (ITEMS[:3] + [dict(ITEMS[3], label=9)], "item 3", "answer 9 is not a choice index"),
    "empty choices": (_item(choices=[]), "not one of its choices, or the item has no choices"),
    "empty choices, later item": (ITEMS[:2] + [dict(ITEMS[2], choices=[], label=0)], "item 2", "0 choice(s)"),
    "one choice": ([dict(it, choices=[it["choices"][it["label"]]], label=0) for it in ITEMS], "1 choice(s)"),
    "answer not among choices": (_item(label="purple"), "answer 'purple' is not one of its choices"),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_tasks_are_refused_naming_the_data(tmp_path, case):
    items, *fragments = DEGENERATE[case]
    path = write_task(tmp_path / "t", items=items, yaml_text=PLAIN_YAML, utils=None)
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(path))
    assert_one_line_error(rc, err, *fragments, str(tmp_path / "t" / "items.jsonl"), "Fix:")


def test_broken_data_file_names_the_line(tmp_path):
    path = write_task(tmp_path / "t", yaml_text=PLAIN_YAML, utils=None)
    with open(tmp_path / "t" / "items.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"question": "unclosed\n')
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(path))
    assert_one_line_error(rc, err, "items.jsonl, line 7 is not JSON", "Fix: correct the data file")


def test_more_fewshot_examples_than_items_is_one_line(tmp_path):
    path = write_task(tmp_path / "t", yaml_text=PLAIN_YAML, utils=None)
    rc, _, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(path), "--num-fewshot", "6")
    assert_one_line_error(rc, err, "--num-fewshot 6 asks for more examples than task tiny_fn has", "(5, its other items)",
                          "Fix: use --num-fewshot 5 or less")
    rc, out, err = run_cli("eval", "--model", "tiny-llama", "--tasks", str(path), "--num-fewshot", "5",
                           "--data", "text:" + "hello world " * 40, "--seq-len", "32")
    assert rc == 0 and "tiny_fn: acc" in out and err == "", err  # lm-eval's own output stays out (--quiet)


def test_items_longer_than_the_context_or_with_one_choice_are_refused_on_eval_and_verification(tiny, tmp_path):
    from mi_prun.config import SelectConfig
    from mi_prun.pipeline import analyze
    from mi_prun.config import AnalysisConfig
    from mi_prun.select import select

    path = write_task(tmp_path / "t", items=_item(question="word " * 400), yaml_text=PLAIN_YAML, utils=None)
    with pytest.raises(MiPrunError, match=r"task tiny_fn, item 0: its context and a choice are \d+ tokens, longer "
                                          r"than the model's context of 256.*Fix: shorten or drop"):
        zero_shot(tiny, tasks=str(path))
    analysis = analyze(tiny, AnalysisConfig(n_samples=4, seq_len=32))
    with pytest.raises(MiPrunError, match="longer than the model's context of 256"):
        select(analysis, SelectConfig(n=2, verify_on=str(path), verify_passes=4), model=tiny)
    # a one-choice task would give NLL 0 to every set and call the answer "verified"
    one = write_task(tmp_path / "one", items=DEGENERATE["one choice"][0], yaml_text=PLAIN_YAML, utils=None)
    with pytest.raises(MiPrunError, match=r"1 choice\(s\); a multiple-choice item needs at least 2"):
        select(analysis, SelectConfig(n=2, verify_on=str(one), verify_passes=4), model=tiny)


def test_quiet_eval_prints_nothing_of_lm_eval_outside_a_git_repository(tmp_path):
    """lm-eval runs `git describe`, which prints "fatal: not a git repository" to the terminal (file
    descriptor 2) outside one; with its progress bars it stays out of mi-prun's output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = write_task(tmp_path / "t", yaml_text=PLAIN_YAML, utils=None)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    res = subprocess.run([sys.executable, "-m", "mi_prun.cli", "--quiet", "eval", "--model", "tiny-llama",
                          "--data", "text:" + "hello world " * 40, "--seq-len", "32", "--tasks", str(path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "tiny_fn: acc" in res.stdout and res.stderr == "", res.stderr
