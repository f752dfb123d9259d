"""The prune page's zero-shot accuracy section: lm-evaluation-harness on the sets the user picks,
beside their perplexity, behind a button (every task item costs a forward pass per choice), with
progress. The computation is the library's (`mi_prun.zeroshot.zero_shot` on a weight-sharing
`pruned_view`; the cached model is never changed); this module only adds Streamlit.

Which tasks may run, since the app may serve other people: lm-eval task names (their datasets must
be in this server's `datasets` cache), and task YAML files only from the folder the operator names
in `$MI_PRUN_TASKS_DIR` (a task YAML can import Python code with `!function`, so a visitor never
types a path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import streamlit as st

from mi_prun.config import ZeroShotConfig
from mi_prun.errors import MiPrunError
from mi_prun.models import pruned_view
from mi_prun.zeroshot import lm_eval_version, zero_shot
from mi_prun_app.ui import model_for, show_error, table

TASKS_DIR_ENV = "MI_PRUN_TASKS_DIR"
YAML_SUFFIXES = (".yaml", ".yml")


def tasks_dir() -> Path | None:
    value = os.environ.get(TASKS_DIR_ENV, "").strip()
    return Path(value).expanduser().absolute() if value else None


def local_tasks() -> list[str]:
    """The task YAML files in `$MI_PRUN_TASKS_DIR` (names relative to it), sorted."""
    root = tasks_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in YAML_SUFFIXES)


def task_specs(names: str, files: list[str]) -> tuple[str, ...]:
    """The `ZeroShotConfig.tasks` of the widgets: lm-eval names (no paths), then the chosen files."""
    out = []
    for name in (t.strip() for t in names.split(",")):
        if not name:
            continue
        if os.sep in name or name.lower().endswith(YAML_SUFFIXES):
            raise MiPrunError(f"{name!r} looks like a path; the app runs task files only from "
                              f"${TASKS_DIR_ENV}. Fix: give an lm-eval task name, or pick a local task file.")
        out.append(name)
    root = tasks_dir()
    out += [str(root / f) for f in files if root is not None and f in local_tasks()]
    return tuple(out)


def accuracy_rows(loaded: Any, sets: Mapping[str, tuple[int, ...]], tasks: tuple[str, ...], limit: int | None,
                  progress: Any = None) -> list[dict[str, Any]]:
    """One row per (set, task): the library's zero-shot scores of the dense model ("dense", ()) and
    of each removed set. `progress(fraction, text)` after every task."""
    cfg = ZeroShotConfig(tasks=tasks, limit=limit)
    rows: list[dict[str, Any]] = []
    todo = list(sets.items())
    for i, (who, removed) in enumerate(todo):
        def inner(stage: str, fraction: float, message: str, i: int = i, who: str = who) -> None:
            if progress is not None:
                progress((i + fraction) / len(todo), f"{who}: {message}")

        res = zero_shot(pruned_view(loaded.model, list(removed)), loaded.tokenizer, config=cfg, progress=inner)
        for t in res.tasks:
            rows.append({"set": who, "removed": " ".join(map(str, removed)), "task": t.task, "acc": t.acc,
                         "acc_stderr": t.acc_stderr, "acc_norm": t.acc_norm, "items": t.samples,
                         "task_version": t.version, "lm_eval": res.lm_eval_version})
    return rows


def section(analysis: Any, n: int, sets: Mapping[str, Any], ppl_points: list[dict[str, Any]]) -> None:
    """The accuracy widgets, button, progress and table for `sets` ({label: Selection}) at n."""
    st.subheader("Zero-shot accuracy")
    try:
        lm_eval_version()
    except MiPrunError as exc:
        st.caption(str(exc))
        return
    c1, c2, c3 = st.columns([3, 3, 1])
    names = c1.text_input("lm-eval tasks", value="", key="acc_names", placeholder="piqa, hellaswag",
                          help="Task names; their datasets must be in this server's `datasets` cache.")
    files = c2.multiselect("Local task files", local_tasks(), key="acc_files",
                           help=f"Task YAMLs in ${TASKS_DIR_ENV}" + ("" if tasks_dir() else " (not set)"))
    limit = c3.number_input("Items", min_value=1, value=100, step=10, key="acc_limit",
                            help="At most this many items per task.")
    rows: list = st.session_state.setdefault("acc_rows", [])
    if st.button(f"Compute accuracy for n = {n}", key="acc_now", icon=":material/quiz:",
                 help="lm-eval on the dense model and each method's set; every item costs a forward pass "
                      "per choice, so this takes a while on a real model."):
        try:
            tasks = task_specs(names, files)
            if not tasks:
                raise MiPrunError("no task chosen. Fix: name an lm-eval task or pick a local task file.")
            loaded = model_for(analysis)
            todo = {"dense": ()} | {label: tuple(s.removed) for label, s in sets.items()}
            bar = st.progress(0, text="zero-shot accuracy")
            new = accuracy_rows(loaded, todo, tasks, int(limit),
                                lambda f, text: bar.progress(min(100, int(100 * f)), text=text))
            bar.empty()
            keep = {(r["set"], r["removed"], r["task"]) for r in new}
            rows[:] = [r for r in rows if (r["set"], r["removed"], r["task"]) not in keep] + new
        except MiPrunError as exc:
            show_error(exc)
    if rows:
        ppl = {p["removed"]: p["ppl"] for p in ppl_points if not p.get("healed")}
        df = pd.DataFrame(rows)
        df.insert(3, "perplexity", [ppl.get(r) for r in df["removed"]])
        table(df, "accuracy", "acc_table", "Accuracy through lm-evaluation-harness (acc_stderr: its standard "
              "error); perplexity where this session computed it for the same set. Accuracy on a few items "
              "is noisy: compare sets only where the difference exceeds about two standard errors.")
