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
YAMLs are read by lm-eval's own loader, `!function utils.f` resolved to the Python function (in
`utils.py` next to the YAML first), exactly as lm-eval builds its own tasks. A task lm-eval would
score wrongly without a word, or fail on deep inside, is refused in one line naming the item and
the data file: no item, a multiple-choice item with fewer than two choices or an answer not among
them, a broken JSON Lines data file, more few-shot examples than the task has, items longer than
the model's context.

`record_zero_shot(folder, result)` adds the result, with the lm-eval version and the task
versions, to an export's `mi_prun.json` (atomically, read-modify-write under the lock that
replacing an export takes, and only into the export that was evaluated: `export_stamp`). `multiple_choice_items` gives a
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
import inspect
import io
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch
import yaml

from mi_prun.config import ZeroShotConfig, expect_config
from mi_prun.errors import MiPrunError
from mi_prun.files import EXPORT, folder_lock, output_stamp, parse_json, read_marker, write_file
from mi_prun.models.blocks import context_length
from mi_prun.runtime.loading import load_model
from mi_prun.runtime.runner import runner_model
from mi_prun.runtime.sources import check_runnable
from mi_prun.progress import Progress

log = logging.getLogger(__name__)

_T = TypeVar("_T")
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
    export_stamp: str | None = None  # the export evaluated, when zero_shot loaded it from its folder

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
    """Keep lm-eval's own console output out of mi-prun's (which reports through its progress
    callback and its log): its per-default warnings, its progress bars and those of `datasets`
    (written to `sys.stderr`), and what its subprocesses print (`git describe` outside a
    repository: "fatal: not a git repository"; file descriptor 2, redirected on the main thread
    only). All of it is shown when mi-prun itself logs at debug level."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(logging.ERROR)
    saved_fd = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(before)
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def _load_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it: `include:` merged and every `!function name` resolved to
    the Python function it names (`utils.f`: `utils.py` next to the YAML first, then an importable
    module), the way lm-eval's own loader builds its tasks. Left unresolved, lm-eval would take the
    function's path as a prompt template and score every item on that string."""
    try:  # lm-eval >= 0.4.10
        from lm_eval.tasks._yaml_loader import load_yaml  # optional dependency (see lm_eval_version)

        def read() -> Any:
            return load_yaml(path, resolve_func=True)
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config  # optional dependency (see lm_eval_version)

        def read() -> Any:
            return load_yaml_config(yaml_path=str(path), mode="full")
    try:
        cfg = read()
    except Exception as exc:  # yaml.YAMLError, a missing include, a `!function` that cannot be imported
        msg = " ".join(str(exc).split())
        if not isinstance(exc, (yaml.YAMLError, OSError)) and _FUNCTION_TAG in _text(path):
            raise MiPrunError(f"task file {path}: a `!function` cannot be resolved ({type(exc).__name__}: "
                              f"{msg[:200]}). Fix: define the function in the .py file the YAML names (utils.f "
                              "means f in utils.py next to the YAML), or correct the name.") from None
        raise MiPrunError(f"task file {path} cannot be read as a task YAML ({type(exc).__name__}: {msg[:200]}). "
                          "Fix: correct the YAML (lm-eval's task format: task, dataset_path, test_split, "
                          "doc_to_text, doc_to_choice, doc_to_target).") from None
    if not isinstance(cfg, dict):
        raise MiPrunError(f"task file {path} does not hold a mapping of task settings. Fix: write "
                          "`task: <name>` and the other settings as a YAML mapping.")
    return cfg


_FUNCTION_TAG = "!function"


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _function_files(value: Any) -> list[Path]:
    """The Python files of the functions a resolved task config holds (`!function` values), for
    the record's digests."""
    if callable(value) and not isinstance(value, type):
        try:
            source = inspect.getsourcefile(value)
        except TypeError:  # a builtin
            return []
        return [Path(source)] if source else []
    if isinstance(value, dict):
        return [f for v in value.values() for f in _function_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _function_files(v)]
    return []


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
                if cfg.get("dataset_path") == "json":
                    _check_json_data(cand, yaml_path)
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


def _check_json_data(path: Path, yaml_path: Path) -> None:
    """Refuse a local JSON / JSON Lines data file that `datasets` could not read, naming the line
    (`datasets` reports only "An error occurred while generating the dataset")."""
    fix = "Fix: correct the data file (JSON Lines: one JSON object per line; .json: a list of objects)."
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MiPrunError(f"task file {yaml_path}: data file {path} cannot be read ({type(exc).__name__}). {fix}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = parse_json(text)
        except ValueError as exc:
            raise MiPrunError(f"task file {yaml_path}: data file {path} is not valid JSON ({exc}). {fix}") from None
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None) if isinstance(rows, list) else 0
        if bad is not None:
            raise MiPrunError(f"task file {yaml_path}: data file {path} must hold a list of JSON objects (item {bad} "
                              f"is not one). {fix}")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as exc:
            raise MiPrunError(f"task file {yaml_path}: data file {path}, line {number} is not JSON ({exc}). {fix}") from None
        if not isinstance(row, dict):
            raise MiPrunError(f"task file {yaml_path}: data file {path}, line {number} is a {type(row).__name__}, not a "
                              f"JSON object. {fix}")


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
    digests.update({str(f.resolve()): _sha256(f) for f in _function_files(cfg) if f.is_file()})
    return TaskSource(name=name, spec=cfg, source=str(path.resolve()), sha256=digests)


def resolve_tasks(config: ZeroShotConfig) -> tuple[list[TaskSource], list[str]]:
    """(tasks, folders for lm-eval's include_path) of `config.tasks`; refuses, in one line naming
    the fix, an unknown name, a YAML file that is not a task, a missing data file, no task at all."""
    expect_config(config, ZeroShotConfig)
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
        except StopIteration:  # lm-eval reads the first item while building the task
            raise MiPrunError(f"task {src.name} holds no item{_data_note(src)}. Fix: give it data with at least "
                              "one item (or check its test_split and process_docs).") from None
        except IndexError as exc:  # lm-eval applies doc_to_target / doc_to_choice to the first item
            raise MiPrunError(f"task {src.name}: its first item's answer is not one of its choices, or the item has "
                              f"no choices (IndexError: {exc}){_data_note(src)}. Fix: make every item's "
                              "doc_to_target an index into its doc_to_choice list (from 0), and give every item "
                              "choices.") from None
        except Exception as exc:  # dataset download refused offline, a template error, a bad setting, ...
            msg = " ".join(str(exc).split())[:200]
            fix = ("correct the task YAML (lm-eval's task format)" if src.source != src.name else
                   "cache its dataset (run it once online, then set HF_DATASETS_OFFLINE=1), or give a local task YAML")
            raise MiPrunError(f"task {src.name} could not be built ({type(exc).__name__}: {msg}). "
                              f"Fix: {fix}.") from None
        for task in tasks:
            task.set_config(key="num_fewshot", value=config.num_fewshot)
            name = getattr(task, "task_name", None) or task.config.task
            source = src if name == src.name else TaskSource(name, name, src.source, src.sha256)
            with _quiet_lm_eval():
                _check_task(source, task, config)
            built.append((source, task))
    return built, manager


def _data_note(src: TaskSource) -> str:
    files = [p for p in src.sha256 if not p.endswith(YAML_SUFFIXES) and not p.endswith(".py")]
    return f" (data: {', '.join(files)})" if files else (f" ({src.source})" if src.source != src.name else "")


def _check_task(src: TaskSource, task: Any, config: ZeroShotConfig) -> None:
    """Refuse a task lm-eval would score wrongly without a word, or fail on deep inside: no item; a
    multiple-choice item without choices, with a single choice (accuracy 1 and NLL 0 whatever the
    model), or whose answer is not one of its choices (scored as always wrong); more few-shot
    examples asked for than the task has."""
    docs = task.eval_docs
    n = len(docs)
    if n == 0:
        raise MiPrunError(f"task {src.name} holds no item{_data_note(src)}. Fix: give it data with at least one item.")
    kind = getattr(task, "OUTPUT_TYPE", None) or getattr(task.config, "output_type", None)
    if kind == "multiple_choice":
        for i in range(n if config.limit is None else min(n, config.limit)):
            doc = docs[i]
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_target(doc)
            where = f"task {src.name}, item {i}{_data_note(src)}"
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                count = len(choices) if isinstance(choices, (list, tuple)) else "no list of"
                raise MiPrunError(f"{where}: {count} choice(s); a multiple-choice item needs at least 2 (with one, "
                                  "every model scores it right). Fix: give every item two or more choices.")
            golds = gold if isinstance(gold, list) else [gold]
            for g in golds:
                if isinstance(g, str) and g not in choices:
                    raise MiPrunError(f"{where}: answer {g!r} is not one of its choices {list(choices)[:6]}. Fix: make "
                                      "doc_to_target an index into doc_to_choice (from 0) or one of its strings.")
                if not isinstance(g, str) and not (isinstance(g, int) and 0 <= g < len(choices)):
                    raise MiPrunError(f"{where}: answer {g!r} is not a choice index (0..{len(choices) - 1}). Fix: make "
                                      "doc_to_target an index into doc_to_choice (from 0) or one of its strings.")
    shots = int(config.num_fewshot or 0)
    if shots > 0:
        pool = task.fewshot_docs()
        size = len(pool) if pool is not None else 0
        split = getattr(task.config, "fewshot_split", None)
        same = not (task.has_training_docs() or task.has_validation_docs()) and split in (None, task.config.test_split)
        available = size - 1 if same else size  # drawn from the items themselves: never the item scored
        if shots > available:
            raise MiPrunError(f"--num-fewshot {shots} asks for more examples than task {src.name} has to draw from "
                              f"({available}{', its other items' if same else ''}). Fix: use --num-fewshot "
                              f"{max(available, 0)} or less, or give the task a training or validation split.")


def load_stamped(spec: str | os.PathLike, load: Callable[[], _T]) -> tuple[_T, str | None]:
    """`load()` (the loading of the model at `spec`) and, when `spec` is an export, its
    `export_stamp` taken before: an export replaced while it was loading is refused (its files
    may be of two models)."""
    stamp = export_stamp(spec) if is_export(spec) else None
    value = load()
    if stamp is not None and export_stamp(spec) != stamp:
        raise MiPrunError(f"{spec} was replaced by another export while it was being loaded. Fix: run again once "
                          "nothing else writes to it.")
    return value, stamp


def _model_and_tokenizer(model: Any, tokenizer: Any) -> tuple[Any, Any, Any, str | None]:
    """(module, tokenizer, LoadedModel or None, export stamp) from a LoadedModel, a module, or a
    folder / spec."""
    stamp = None
    if isinstance(model, (str, os.PathLike)):
        spec = model
        model, stamp = load_stamped(spec, lambda: load_model(spec))
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return model.model, tokenizer if tokenizer is not None else model.tokenizer, model, stamp
    if tokenizer is None:
        raise MiPrunError("zero_shot needs the model's tokenizer. Fix: pass tokenizer=..., or a LoadedModel.")
    return model, tokenizer, None, stamp


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
    expect_config(cfg, ZeroShotConfig)
    if tasks is not None:
        cfg = cfg.replace(tasks=tasks)
    version = lm_eval_version()
    t0 = time.perf_counter()
    built, manager = _build(cfg)
    module, tok, _, stamp = _model_and_tokenizer(model, tokenizer)
    check_runnable(module, "the model")
    import lm_eval.evaluator  # optional dependency (see lm_eval_version)
    from lm_eval.models.huggingface import HFLM  # optional dependency (see lm_eval_version)

    # HFLM calls eval() and tie_weights() on what it gets: a weight-sharing copy keeps the caller's
    # (possibly shared) model as it was; its forward runs the one block runner (any weight source).
    with _quiet_lm_eval():
        lm = HFLM(pretrained=runner_model(module), tokenizer=tok, batch_size=cfg.batch_size)
    for src, task in built:  # items past the model's context: refused before any is scored
        if (getattr(task, "OUTPUT_TYPE", None) or getattr(task.config, "output_type", None)) == "multiple_choice":
            check_items_fit(module, ((it, len(tok.encode(it.context + c))) for it in _task_items(src, task, cfg.limit)
                                     for c in it.choices))
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
                          limit=cfg.limit, seconds=time.perf_counter() - t0, export_stamp=stamp)


# ---------------------------------------------------------------------------------------- exports

def is_export(path: Any) -> bool:
    """Whether `path` is a folder written by `mi_prun.export` (it holds mi-prun's marker)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir() and read_marker(Path(path), EXPORT) is not None


def export_stamp(folder: str | os.PathLike) -> str | None:
    """What identifies the export now at `folder` (`mi_prun.files.output_stamp`): take it before
    loading the model and give it to `record_zero_shot`, so that an export replaced meanwhile
    (`prune --overwrite` by another process) never gets another model's accuracy."""
    return output_stamp(folder, EXPORT)


def _earlier_records(target: Path, marker: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(zero_shot record, its tasks) already in the marker; a damaged or wrongly typed part is
    dropped with a warning saying what (never silently)."""
    where = target / EXPORT.marker
    record = marker.get("zero_shot")
    if record is None:
        return {}, {}
    if not isinstance(record, dict):
        log.warning("%s: its zero_shot entry is a %s, not a mapping of results; it is replaced by this run's "
                    "results (earlier zero-shot records in it are lost)", where, type(record).__name__)
        return {}, {}
    tasks = record.get("tasks")
    if tasks is None:
        return dict(record), {}
    if not isinstance(tasks, dict):
        log.warning("%s: zero_shot.tasks is a %s, not a mapping of task -> result; it is replaced by this "
                    "run's results", where, type(tasks).__name__)
        return dict(record), {}
    bad = sorted(str(k) for k, v in tasks.items() if not isinstance(v, dict))
    if bad:
        log.warning("%s: zero_shot record(s) of %s are damaged (not a mapping) and are dropped", where, ", ".join(bad))
    return dict(record), {k: v for k, v in tasks.items() if isinstance(v, dict)}


def record_zero_shot(folder: str | os.PathLike, result: ZeroShotResult, *, stamp: str | None = None) -> Path:
    """Add `result` to the export's `mi_prun.json` under "zero_shot" (by task: a task evaluated
    again replaces its entry; each entry says its lm-eval version, task version, protocol and
    date). Written atomically: a reader sees the old file or the new one.

    The read-modify-write runs under the lock `write_folder` holds while it replaces an export
    (`mi_prun.files.folder_lock` on the export's parent), so concurrent writers of records lose
    none, and an export being replaced waits. `stamp` (`export_stamp(folder)` taken before the
    model was loaded; default: the stamp `zero_shot` took when it loaded the folder itself) is
    checked under that lock: a folder replaced since is refused, never given the old model's
    accuracy."""
    target = Path(folder).expanduser().absolute()
    expected = stamp if stamp is not None else result.export_stamp
    with folder_lock(target.parent):
        marker = read_marker(target, EXPORT) if target.is_dir() else None
        if marker is None:
            raise MiPrunError(f"{target} is not a mi-prun export (no {EXPORT.marker} of format {EXPORT.format}). "
                              "Fix: give a folder written by `mi-prun prune`.")
        if expected is not None and export_stamp(target) != expected:
            raise MiPrunError(f"{target} was replaced by another export while this one was evaluated; the "
                              "accuracy was not recorded (it belongs to the model that was there before). Fix: "
                              "evaluate the new export again once nothing else writes to it.")
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        record, tasks = _earlier_records(target, marker)
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
        items += _task_items(src, task, config.limit)
    if not items:
        raise MiPrunError("the tasks hold no item. Fix: give a task with at least one item.")
    return items


def check_items_fit(model: Any, lengths: Iterable[tuple[ChoiceItem, int]]) -> None:
    """Refuse items whose context and choice, in tokens (`lengths`: (item, tokens) per choice),
    exceed the model's context: lm-eval would cut the context from the left and score what is
    left without a word, and positions past the context are not what the model was trained on."""
    config = getattr(model, "config", None) if isinstance(model, torch.nn.Module) else None
    limit = context_length(config) if config is not None else None
    if not isinstance(limit, int):
        return
    over = [(it, n) for it, n in lengths if n > limit]
    if over:
        it, n = max(over, key=lambda x: x[1])
        raise MiPrunError(f"task {it.task}, item {it.doc_id}: its context and a choice are {n} tokens, longer than "
                          f"the model's context of {limit} ({len({(o.task, o.doc_id) for o, _ in over})} item(s) are); "
                          "they would be scored cut short. Fix: shorten or drop those items (or lower --num-fewshot), "
                          "or use a model with a longer context.")


def _task_items(src: TaskSource, task: Any, limit: int | None) -> list[ChoiceItem]:
    """One multiple-choice task's items, as lm-eval builds their requests."""
    items: list[ChoiceItem] = []
    with _quiet_lm_eval():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
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
    return items


def task_provenance(config: ZeroShotConfig) -> list[dict[str, Any]]:
    """What `config`'s tasks are, for a record: name, source, file digests."""
    sources, _ = resolve_tasks(config)
    return [{"task": s.name, "source": s.source, "sha256": dict(s.sha256)} for s in sources]


__all__ = ["ChoiceItem", "EVAL_EXTRA", "TaskScore", "TaskSource", "ZeroShotResult", "build_tasks", "check_items_fit", "is_export",
           "export_stamp", "lm_eval_version", "load_stamped", "multiple_choice_items", "record_zero_shot", "resolve_tasks", "task_provenance",
           "zero_shot"]
