"""Zero-shot accuracy through lm-evaluation-harness, on a pruned model in memory or an export.

Block-pruning papers report zero-shot accuracy (PIQA, HellaSwag, WinoGrande, ARC, BoolQ, OBQA)
through lm-eval beside WikiText-2 perplexity, and perplexity rankings of pruned models and
downstream rankings can disagree. `zero_shot` runs lm-eval's own task code and metrics through its
Hugging Face wrapper (`HFLM(pretrained=model, tokenizer=...)`) on a weight-sharing copy of the
model (HFLM switches what it is given to eval mode and re-ties its embeddings; the caller's model,
possibly shared by other sessions, is left as it was). It takes a `LoadedModel`, a module (a
`pruned_view` / `prune` result) with its tokenizer, or an exported folder.

Tasks (`ZeroShotConfig.tasks`), offline:
- a name lm-eval knows (`piqa`, `hellaswag`, ...): its dataset must be in the `datasets` cache
  (run it once online, then `HF_DATASETS_OFFLINE=1`);
- a task YAML file in lm-eval's format, e.g. `dataset_path: json` with
  `dataset_kwargs: {data_files: {test: items.jsonl}}`; relative `data_files` are looked up next to
  the YAML first;
- a folder of task YAMLs (lm-eval's `TaskManager(include_path=...)`): every task defined in it.
Groups are evaluated as their member tasks (each reported; no group average).

`record_zero_shot(folder, result)` adds the result, with the lm-eval version and the task
versions, to an export's `mi_prun.json` (atomically). `multiple_choice_items` gives a
multiple-choice task's (context, choices, answer) requests exactly as lm-eval builds them, for the
verified search's task scorer (`mi_prun.select.task_scorer`).

Layer: imports errors, config, files and models only (lm_eval, an optional dependency, is
imported inside functions), so `select` may build on it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import hashlib
import importlib.metadata as md
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from mi_prun.config import ZeroShotConfig
from mi_prun.errors import MiPrunError
from mi_prun.files import EXPORT, read_marker, write_file
from mi_prun.runtime.loading import load_model
from mi_prun.runtime.runner import runner_model
from mi_prun.progress import Progress

log = logging.getLogger(__name__)

EVAL_EXTRA = 'pip install "mi-prun[eval]"'
YAML_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class TaskScore:
    """One task's scores: accuracy with its standard error (lm-eval's: the sample standard deviation
    of the per-item 0/1 scores over sqrt(items)), the length-normalised accuracy where the task
    defines it, every other numeric metric, the items scored and the task's version."""

    task: str
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    samples: int = 0
    version: Any = None
    source: str = ""  # the task's name, or the YAML file it came from
    sha256: Mapping[str, str] = field(default_factory=dict)  # local files: path -> digest
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sha256": dict(self.sha256), "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class ZeroShotResult:
    """Every task's `TaskScore`, the lm-eval version, the protocol (few-shot examples, item
    limit) and the wall time."""

    tasks: tuple[TaskScore, ...]
    lm_eval_version: str
    num_fewshot: int
    limit: int | None
    seconds: float

    def by_task(self) -> dict[str, TaskScore]:
        return {t.task: t for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "lm_eval_version": self.lm_eval_version,
                "num_fewshot": self.num_fewshot, "limit": self.limit, "seconds": self.seconds}

    def summary(self) -> str:
        """One line per task, e.g. `piqa: acc 0.612 +- 0.011, acc_norm 0.620 +- 0.011 (1838 items, v1.0)`."""
        lines = []
        for t in self.tasks:
            parts = [f"acc {_fmt(t.acc, t.acc_stderr)}"] if t.acc is not None else \
                [f"{k} {v:.4g}" for k, v in t.metrics.items()]
            if t.acc_norm is not None:
                parts.append(f"acc_norm {_fmt(t.acc_norm, t.acc_norm_stderr)}")
            lines.append(f"{t.task}: {', '.join(parts)} ({t.samples} items, version {t.version})")
        return "\n".join(lines)


def _fmt(value: float | None, stderr: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" + ("" if stderr is None else f" +- {stderr:.3f}")


# ---------------------------------------------------------------------------------------- lm-eval

def lm_eval_version() -> str:
    """The installed lm-eval's version; a one-line error naming the extra when it is missing."""
    try:
        import lm_eval  # noqa: F401  (optional dependency, the [eval] extra: imported only when needed)
    except ImportError:
        raise MiPrunError(f"zero-shot tasks need lm-evaluation-harness, which is not installed. "
                          f"Fix: {EVAL_EXTRA}.") from None
    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return str(getattr(lm_eval, "__version__", "unknown"))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning per default it fills in; keep them out of mi-prun's output unless
    mi-prun itself logs at debug level."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _load_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (`include:` merged, `!function` kept unresolved)."""
    try:  # lm-eval >= 0.4.10
        from lm_eval.tasks._yaml_loader import load_yaml  # optional dependency (see lm_eval_version)

        def read() -> Any:
            return load_yaml(path, resolve_func=False)
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config  # optional dependency (see lm_eval_version)

        def read() -> Any:
            return load_yaml_config(yaml_path=str(path), mode="simple")
    try:
        cfg = read()
    except Exception as exc:  # yaml.YAMLError, a missing include, ...: all one user problem
        msg = " ".join(str(exc).split())
        raise MiPrunError(f"task file {path} cannot be read as a task YAML ({type(exc).__name__}: {msg[:200]}). "
                          "Fix: correct the YAML (lm-eval's task format: task, dataset_path, test_split, "
                          "doc_to_text, doc_to_choice, doc_to_target).") from None
    if not isinstance(cfg, dict):
        raise MiPrunError(f"task file {path} does not hold a mapping of task settings. Fix: write "
                          "`task: <name>` and the other settings as a YAML mapping.")
    return cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_data_files(cfg: dict[str, Any], yaml_path: Path) -> dict[str, str]:
    """Make the config's relative `dataset_kwargs.data_files` absolute (next to the YAML first,
    then the current folder), in place; return {path: sha256} of the local data files."""
    kwargs = cfg.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    digests: dict[str, str] = {}
    if files is None:
        return digests

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or "://" in p or any(c in p for c in "*?["):
            return p
        for cand in ((yaml_path.parent / p), Path(p)) if not os.path.isabs(p) else (Path(p),):
            if cand.is_file():
                found = str(cand.resolve())
                digests[found] = _sha256(cand)
                return found
        raise MiPrunError(f"task file {yaml_path}: data file {p} not found (looked next to the YAML and in "
                          f"{Path.cwd()}). Fix: give its path, relative to the YAML's folder or absolute.")

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return fix(v)

    kwargs["data_files"] = walk(files)
    return digests


@dataclass(frozen=True)
class TaskSource:
    """One task of the config, resolved: what lm-eval loads (`spec`: a name, or the YAML's settings
    with absolute data paths) and what the record says of it."""

    name: str
    spec: Any
    source: str
    sha256: Mapping[str, str] = field(default_factory=dict)


def _yaml_task(path: Path) -> TaskSource | None:
    cfg = _load_yaml(path)
    name = cfg.get("task")
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise MiPrunError(f"task file {path}: `task:` must be a name, got {name!r}. Fix: write `task: my_task`.")
    digests = {str(path.resolve()): _sha256(path), **_resolve_data_files(cfg, path)}
    return TaskSource(name=name, spec=cfg, source=str(path.resolve()), sha256=digests)


def resolve_tasks(config: ZeroShotConfig) -> tuple[list[TaskSource], list[str]]:
    """(tasks, folders for lm-eval's include_path) of `config.tasks`; refuses, in one line naming
    the fix, an unknown name, a YAML file that is not a task, a missing data file, no task at all."""
    if not isinstance(config, ZeroShotConfig):
        raise MiPrunError(f"config must be a ZeroShotConfig, got {type(config).__name__}.")
    if not config.tasks:
        raise MiPrunError("no task given. Fix: name lm-eval tasks or task YAML files, e.g. --tasks piqa,my_task.yaml.")
    lm_eval_version()
    out: list[TaskSource] = []
    folders: list[str] = []
    names: list[str] = []
    for item in config.tasks:
        path = Path(item).expanduser()
        if path.suffix.lower() in YAML_SUFFIXES or os.sep in item or path.exists():
            if path.is_dir():
                found = [t for p in sorted(path.rglob("*")) if p.suffix.lower() in YAML_SUFFIXES and p.is_file()
                         for t in [_yaml_task(p)] if t is not None]
                if not found:
                    raise MiPrunError(f"task folder {path} defines no task (no YAML file with `task:`). "
                                      "Fix: give a folder of lm-eval task YAMLs, or the YAML file itself.")
                folders.append(str(path.resolve()))
                out += found
            elif path.is_file():
                task = _yaml_task(path)
                if task is None:
                    raise MiPrunError(f"task file {path} defines no task (no `task:` key). Fix: add `task: <name>`.")
                out.append(task)
            else:
                raise MiPrunError(f"task file {path} not found. Fix: give the path of a task YAML file or folder.")
        else:
            names.append(item)
    if names:
        from lm_eval.tasks import TaskManager  # optional dependency (see lm_eval_version)

        with _quiet_lm_eval():
            known = set(TaskManager(include_path=folders or None).all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise MiPrunError(f"unknown task {name!r}{hint}: not an lm-eval task name, nor a task YAML file or "
                                  "folder. Fix: give a name lm-eval lists (`lm_eval ls tasks`) or a local task YAML.")
            out.append(TaskSource(name=name, spec=name, source=name))
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise MiPrunError(f"task {t.name!r} is given twice. Fix: name each task once.")
        seen.add(t.name)
    return out, folders


def _leaves(obj: Any) -> list[Any]:
    """The Task objects of lm-eval's (possibly nested, for groups) task dict."""
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    return [obj] if obj is not None else []


def build_tasks(config: ZeroShotConfig) -> list[tuple[TaskSource, Any]]:
    """Every task of `config` built by lm-eval (its dataset loaded), with its source: the check
    a command runs before loading a model. A task that cannot be built is one line naming the fix."""
    return _build(config)[0]


def _build(config: ZeroShotConfig) -> tuple[list[tuple[TaskSource, Any]], Any]:
    """`build_tasks` and the lm-eval TaskManager that built them (lm-eval builds one with every
    default task indexed, about 14 s, when none is passed)."""
    sources, folders = resolve_tasks(config)
    from lm_eval.tasks import TaskManager, get_task_dict  # optional dependency (see lm_eval_version)

    needs_defaults = any(isinstance(s.spec, str) for s in sources)
    with _quiet_lm_eval():
        manager = TaskManager(include_path=folders or None, include_defaults=needs_defaults)
    built: list[tuple[TaskSource, Any]] = []
    for src in sources:
        try:
            with _quiet_lm_eval():
                if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat {"tasks": {name: Task}}
                    tasks = list(manager.load([src.spec])["tasks"].values())
                else:
                    tasks = _leaves(get_task_dict([src.spec], manager))
        except MiPrunError:
            raise
        except Exception as exc:  # dataset download refused offline, a template error, a bad setting, ...
            msg = " ".join(str(exc).split())[:200]
            fix = ("correct the task YAML (lm-eval's task format)" if src.source != src.name else
                   "cache its dataset (run it once online, then set HF_DATASETS_OFFLINE=1), or give a local task YAML")
            raise MiPrunError(f"task {src.name} could not be built ({type(exc).__name__}: {msg}). "
                              f"Fix: {fix}.") from None
        for task in tasks:
            task.set_config(key="num_fewshot", value=config.num_fewshot)
            name = getattr(task, "task_name", None) or task.config.task
            built.append((src if name == src.name else TaskSource(name, name, src.source, src.sha256), task))
    return built, manager


def _model_and_tokenizer(model: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(module, tokenizer, LoadedModel or None) from a LoadedModel, a module, or a folder / spec."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return model.model, tokenizer if tokenizer is not None else model.tokenizer, model
    if tokenizer is None:
        raise MiPrunError("zero_shot needs the model's tokenizer. Fix: pass tokenizer=..., or a LoadedModel.")
    return model, tokenizer, None


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it has no standard error
    return v if v == v else None


def _score(src: TaskSource, res: dict[str, Any]) -> TaskScore:
    row = res["results"].get(src.name, {})
    metrics: dict[str, float] = {}
    for key, value in row.items():
        metric, _, filt = str(key).partition(",")
        if filt in ("none", "") and not metric.endswith("_stderr") and _number(value) is not None \
                and metric not in ("sample_len",):
            metrics[metric] = float(value)

    def get(metric: str) -> float | None:
        for key, value in row.items():
            if str(key).partition(",")[0] == metric:
                return _number(value)
        return None

    n = res.get("n-samples", {}).get(src.name, {})
    samples = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(row.get("sample_len", 0))
    return TaskScore(task=src.name, acc=get("acc"), acc_stderr=get("acc_stderr"), acc_norm=get("acc_norm"),
                     acc_norm_stderr=get("acc_norm_stderr"), samples=samples,
                     version=res.get("versions", {}).get(src.name), source=src.source, sha256=dict(src.sha256),
                     metrics={k: v for k, v in metrics.items() if k not in ("acc", "acc_norm")})


def zero_shot(model: Any, tokenizer: Any = None, tasks: Any = None, config: ZeroShotConfig | None = None, *,
              progress: Progress | None = None) -> ZeroShotResult:
    """Accuracy of `model` on `tasks` through lm-eval (module docstring).

    `model`: a `LoadedModel`, a module (`pruned_view` / `prune` result, then `tokenizer`), or a
    spec `load_model` takes (an exported folder). `tasks` (names, YAML files, folders; a list or a
    comma-separated string) overrides `config.tasks`. The model is only read: lm-eval runs a
    weight-sharing copy. `progress("zero-shot", fraction, message)` is called before and after
    every task. No global random state is touched (zero-shot prompts need none).
    """
    cfg = config if config is not None else ZeroShotConfig()
    if not isinstance(cfg, ZeroShotConfig):
        raise MiPrunError(f"config must be a ZeroShotConfig, got {type(cfg).__name__}.")
    if tasks is not None:
        cfg = cfg.replace(tasks=tasks)
    version = lm_eval_version()
    t0 = time.perf_counter()
    built, manager = _build(cfg)
    module, tok, _ = _model_and_tokenizer(model, tokenizer)
    import lm_eval.evaluator  # optional dependency (see lm_eval_version)
    from lm_eval.models.huggingface import HFLM  # optional dependency (see lm_eval_version)

    # HFLM calls eval() and tie_weights() on what it gets: a weight-sharing copy keeps the caller's
    # (possibly shared) model as it was; its forward runs the one block runner (any weight source).
    with _quiet_lm_eval():
        lm = HFLM(pretrained=runner_model(module), tokenizer=tok, batch_size=cfg.batch_size)
    scores: list[TaskScore] = []
    for i, (src, task) in enumerate(built):
        if progress is not None:
            progress("zero-shot", i / len(built), f"task {i + 1}/{len(built)}: {src.name}")
        with _quiet_lm_eval():
            res = lm_eval.evaluator.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                log_samples=False, random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        if res is None:  # lm-eval returns None on non-zero ranks only
            raise MiPrunError("lm-eval returned no result (a distributed launch?). Fix: run in one process.")
        score = _score(src, res)
        scores.append(score)
        log.info("zero-shot %s: acc %s (%d items)", src.name, score.acc, score.samples)
        if progress is not None:
            progress("zero-shot", (i + 1) / len(built), f"{src.name}: acc {_fmt(score.acc, score.acc_stderr)}")
    return ZeroShotResult(tasks=tuple(scores), lm_eval_version=version, num_fewshot=cfg.num_fewshot,
                          limit=cfg.limit, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------- exports

def is_export(path: Any) -> bool:
    """Whether `path` is a folder written by `mi_prun.export` (it holds mi-prun's marker)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir() and read_marker(Path(path), EXPORT) is not None


def record_zero_shot(folder: str | os.PathLike, result: ZeroShotResult) -> Path:
    """Add `result` to the export's `mi_prun.json` under "zero_shot" (by task: a task evaluated
    again replaces its entry; each entry says its lm-eval version, task version, protocol and
    date). Written atomically: a reader sees the old file or the new one."""
    target = Path(folder)
    marker = read_marker(target, EXPORT) if target.is_dir() else None
    if marker is None:
        raise MiPrunError(f"{target} is not a mi-prun export (no {EXPORT.marker} of format {EXPORT.format}). "
                          "Fix: give a folder written by `mi-prun prune`.")
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = dict(marker.get("zero_shot") or {})
    tasks = dict(record.get("tasks") or {})
    for t in result.tasks:
        tasks[t.task] = {**t.to_dict(), "lm_eval_version": result.lm_eval_version,
                         "num_fewshot": result.num_fewshot, "limit": result.limit, "evaluated": when}
    record.update({"tasks": tasks, "lm_eval_version": result.lm_eval_version, "updated": when,
                   "note": "accuracy through lm-evaluation-harness (mi_prun.zeroshot); acc_stderr is lm-eval's"})
    return write_file(target / EXPORT.marker, "export report", {**marker, "zero_shot": record}, overwrite=True,
                      is_ours=lambda path: read_marker(path.parent, EXPORT) is not None)


# ---------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item as lm-eval scores it: the context, each choice's continuation
    (with the task's target delimiter, as lm-eval builds the loglikelihood requests), the index
    of the correct one."""

    task: str
    doc_id: int
    context: str
    choices: tuple[str, ...]
    target: int


def multiple_choice_items(config: ZeroShotConfig) -> list[ChoiceItem]:
    """Every item of `config`'s tasks (at most `config.limit` per task), which must be
    multiple-choice (`output_type: multiple_choice`)."""
    items: list[ChoiceItem] = []
    for src, task in build_tasks(config):
        kind = getattr(task, "OUTPUT_TYPE", None) or getattr(task.config, "output_type", None)
        if kind != "multiple_choice":
            raise MiPrunError(f"task {src.name} is not multiple-choice (output_type {kind}). Fix: give a task "
                              "with output_type: multiple_choice.")
        with _quiet_lm_eval():
            task.build_all_requests(limit=config.limit, rank=0, world_size=1)
        by_doc: dict[int, list[Any]] = {}
        for inst in task.instances:
            by_doc.setdefault(int(inst.doc_id), []).append(inst)
        for doc_id, insts in sorted(by_doc.items()):
            insts.sort(key=lambda r: r.idx)
            doc = insts[0].doc
            gold = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc)
            if isinstance(gold, str):
                if gold not in choices:
                    raise MiPrunError(f"task {src.name}, item {doc_id}: answer {gold!r} is not one of its choices. "
                                      "Fix: make doc_to_target an index or one of doc_to_choice's strings.")
                gold = choices.index(gold)
            if not isinstance(gold, int) or not 0 <= gold < len(insts):
                raise MiPrunError(f"task {src.name}, item {doc_id}: answer {gold!r} is not a choice index "
                                  f"(0..{len(insts) - 1}). Fix: correct doc_to_target or the data.")
            items.append(ChoiceItem(task=src.name, doc_id=doc_id, context=insts[0].arguments[0],
                                    choices=tuple(r.arguments[1] for r in insts), target=int(gold)))
    if not items:
        raise MiPrunError("the tasks hold no item. Fix: give a task with at least one item.")
    return items


def task_provenance(config: ZeroShotConfig) -> list[dict[str, Any]]:
    """What `config`'s tasks are, for a record: name, source, file digests."""
    sources, _ = resolve_tasks(config)
    return [{"task": s.name, "source": s.source, "sha256": dict(s.sha256)} for s in sources]


__all__ = ["ChoiceItem", "EVAL_EXTRA", "TaskScore", "TaskSource", "ZeroShotResult", "build_tasks", "is_export",
           "lm_eval_version", "multiple_choice_items", "record_zero_shot", "resolve_tasks", "task_provenance",
           "zero_shot"]
