"""What the app keeps and decides without Streamlit: operator settings from the environment, the
library configs it builds, the export-path sanitiser, uploads, progress and time-left bookkeeping,
cancelling, the thread-safe analysis memo and archives.

Every default comes from `mi_prun.config` (the shipped defaults) or from the estimator itself; the
only settings of the app's own are operator ones (export folder, remote code, test model, upload
limit) and the small sample sizes of test mode. Nothing here imports Streamlit.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mi_prun.config import AnalysisConfig, EvalConfig, HealConfig, SelectConfig
from mi_prun.data import WIKITEXT_FILES, data_dir, decode_bytes, parse_jsonl
from mi_prun.errors import MiPrunError
from mi_prun.estimators import ESTIMATORS
from mi_prun.progress import Progress, time_left_text
from mi_prun.select import resolve_n

# ----------------------------------------------------------------------------------------------
# settings the operator controls through the environment (never through the UI)

EXPORT_DIR_ENV = "MI_PRUN_EXPORT_DIR"
REMOTE_CODE_ENV = "MI_PRUN_ALLOW_REMOTE_CODE"
TEST_MODEL_ENV = "MI_PRUN_TEST_MODEL"

# Uploads are read into memory and decoded as text; 20 MB is far more calibration text than an
# analysis uses (32 x 256 tokens is about 40 kB) and keeps a session's memory bounded.
UPLOAD_LIMIT_MB = 20
UPLOAD_LIMIT_BYTES = UPLOAD_LIMIT_MB * 1024 * 1024
UPLOAD_TYPES = ("txt", "md", "jsonl")


def export_root() -> Path:
    """The folder every export lands in: `$MI_PRUN_EXPORT_DIR`, else `./exports` (absolute)."""
    return Path(os.environ.get(EXPORT_DIR_ENV) or "exports").expanduser().absolute()


def remote_code_allowed() -> bool:
    """Remote model code runs only when the operator sets MI_PRUN_ALLOW_REMOTE_CODE=1."""
    return os.environ.get(REMOTE_CODE_ENV, "").strip() == "1"


def test_model() -> str | None:
    """`$MI_PRUN_TEST_MODEL` (e.g. `tiny-llama`): the default model in test mode, else None."""
    value = os.environ.get(TEST_MODEL_ENV, "").strip()
    return value or None


def eval_source() -> str:
    """Evaluation text for perplexity: WikiText-2 test when its local copy exists, else builtin."""

    folder = data_dir()
    if folder is not None and (folder / WIKITEXT_FILES["test"]).is_file():
        return "wikitext2-test"
    return "builtin"


def wikitext_status() -> tuple[bool, str]:
    """Whether WikiText-2 calibration text can be read here, and how (or how to get it)."""

    folder = data_dir()
    if folder is not None and (folder / WIKITEXT_FILES["valid"]).is_file():
        return True, f"local copy in {folder}"
    try:
        import datasets  # noqa: F401  (optional dependency: is it installed?)
    except ImportError:
        return False, ("WikiText-2 is not available here. Get it with `pip install datasets` (downloads "
                       "once, needs internet), or set MI_PRUN_DATA_DIR to a folder holding "
                       f"{WIKITEXT_FILES['valid']}, or give that folder below.")
    return True, "through the `datasets` library (downloads once, needs internet)"


# ----------------------------------------------------------------------------------------------
# the library's configs, as the app builds them

# Test mode (MI_PRUN_TEST_MODEL set): small sample sizes, so that a run takes about a second on a
# CPU. Every other analysis setting is AnalysisConfig's default.
TEST_MODE_SIZES = {"n_samples": 8, "seq_len": 64, "max_positions": 1024}


def default_analysis_config() -> AnalysisConfig:
    """The setup page's starting values: `AnalysisConfig()`, with smaller samples in test mode."""
    cfg = AnalysisConfig()
    return cfg.replace(**TEST_MODE_SIZES) if test_model() else cfg


def changed_options(estimator: str, chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The options in `chosen` that differ from the estimator's own defaults (what goes into
    `AnalysisConfig.estimator_options`; untouched widgets give `{}`, as the CLI does)."""

    own = ESTIMATORS[estimator].default_options()
    return {k: v for k, v in chosen.items() if k not in own or v != own[k]}


def protect_margin() -> bool | int | float:
    """What "protect the ends" means when switched on: SelectConfig's default margin (one block at
    each end if that default were off)."""
    margin = SelectConfig().protect_ends
    return margin if margin else True


# Test mode also shrinks the verification tokens and the healing calibration (tiny model, seconds).
# 8 x 32: two groups of 4 samples, so the race has a look (as many tokens as 4 x 64).
TEST_MODE_VERIFY = {"verify_samples": 8, "verify_seq_len": 32}
TEST_MODE_HEAL = {"n_samples": 8, "seq_len": 64}


def select_config(method: str = SelectConfig.method, n: int | None = None, protect: bool = True,
                  verify_passes: int | str = 0, verify_race: str | None = None) -> SelectConfig:
    """The selection settings of the app's widgets: a method, n blocks, the protect switch, the
    verification budget (0 = the one-pass answer, "auto" or a number of passes) and the race mode (None:
    SelectConfig's); the run cost, seed, method options and verification tokens are SelectConfig's
    defaults (smaller tokens in test mode)."""
    cfg = SelectConfig(method=method, n=n, protect_ends=protect_margin() if protect else False,
                       verify_passes=verify_passes,
                       **({} if verify_race is None else {"verify_race": verify_race}))
    return cfg.replace(**TEST_MODE_VERIFY) if test_model() else cfg


def heal_config(analysis: Any) -> HealConfig:
    """The healing settings: `HealConfig.for_analysis(analysis)` (calibrated like the analysis),
    with a smaller calibration set in test mode."""
    cfg = HealConfig.for_analysis(analysis)
    return cfg.replace(**TEST_MODE_HEAL) if test_model() else cfg


def default_n_remove(n_blocks: int) -> int:
    """The blocks-to-remove slider's start: the count the library uses when given neither n nor a
    ratio (SelectConfig's default ratio, checked against the protected ends), else 1."""

    d = SelectConfig()
    for protect in (d.protect_ends, False):
        try:
            return resolve_n(n_blocks, **d.count, protect_ends=protect)
        except MiPrunError:
            continue
    return 1


def eval_config() -> EvalConfig:
    """The app's perplexity protocol: the library's short one (`EvalConfig.quick()`) on the
    evaluation text available here."""
    return EvalConfig.quick(data=eval_source())


# ----------------------------------------------------------------------------------------------
# the export-path sanitiser

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def safe_export_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """`root / name` for a plain folder name, or MiPrunError; the result never leaves `root`.

    Accepted: 1-100 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit.
    Refused: empty names, `.`/`..`, any path separator (`/`, `\\`), absolute paths, drive letters,
    whitespace, control or non-ASCII characters (look-alike separators), and names that resolve
    outside `root` (a symlink already sitting at `root/name`).
    """
    base = Path(root).expanduser().absolute() if root is not None else export_root()
    if not isinstance(name, str):
        raise MiPrunError(f"export folder name must be text, got {type(name).__name__}.")
    if not name.strip():
        raise MiPrunError("export folder name is empty. Fix: type a name such as my-model-pruned.")
    if name in (".", "..") or ".." in name:
        raise MiPrunError(f"export folder name {name!r} contains '..'. Fix: use a plain name; exports "
                          f"always go into {base}.")
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name) or ":" in name:
        raise MiPrunError(f"export folder name {name!r} contains a path separator or drive letter. "
                          f"Fix: give a plain folder name; exports always go into {base}.")
    if not _NAME_OK.match(name):
        raise MiPrunError(f"export folder name {name!r} is not allowed. Fix: use up to 100 letters, "
                          "digits, '.', '_' or '-', starting with a letter or digit.")
    target = base / name
    resolved_base = base.resolve()
    if not target.resolve().is_relative_to(resolved_base) or target.resolve() == resolved_base:
        raise MiPrunError(f"export folder {name!r} resolves outside {base}. Fix: choose another name.")
    return target


def default_export_name(model_spec: str, method: str, removed: Sequence[int]) -> str:
    """A valid folder name like `smollm2-135m-fbs-minus-12-13-14`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model_spec)).name).strip("-._") or "model"
    blocks = "-".join(str(b) for b in removed)
    name = f"{stem}-{method}-minus-{blocks}" if blocks else f"{stem}-{method}"
    return name[:100].rstrip("-._")


def zip_folder(folder: str | os.PathLike, arcname: str | None = None) -> bytes:
    """The folder as a zip archive in memory (stored, not compressed: safetensors barely shrink
    and compressing hundreds of MB would keep the page busy for no gain)."""
    root = Path(folder)
    if not root.is_dir():
        raise MiPrunError(f"{root} is not a folder; nothing to archive.")
    prefix = arcname or root.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, f"{prefix}/{path.relative_to(root).as_posix()}")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# uploads: read as text, never executed or unpickled

def text_from_upload(name: str, raw: bytes, limit: int = UPLOAD_LIMIT_BYTES) -> str:
    """The calibration text of an uploaded `.txt`/`.md`/`.jsonl` file (UTF-8).

    The bytes are only decoded (and, for `.jsonl`, parsed as JSON objects with a "text" field);
    nothing is written to disk, executed or unpickled.
    """

    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise MiPrunError(f"{name}: only {', '.join('.' + t for t in UPLOAD_TYPES)} files are accepted.")
    if len(raw) > limit:
        raise MiPrunError(f"{name} is {len(raw) / 2**20:.1f} MB; the app accepts up to "
                          f"{limit / 2**20:.0f} MB. Fix: calibration needs a few hundred kB; upload less.")
    text = decode_bytes(raw, name)
    if suffix == "jsonl":
        text = parse_jsonl(text, name)
    if not text.strip():
        raise MiPrunError(f"{name} holds no text. Fix: upload a file with text in it.")
    return text


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# progress: one bar per stage and an estimate of the time left

# Library progress stages -> the app's three stages. Scoring reports sub-stages; each gets a
# slice of the "score" bar (rough shares of the scoring time measured on SmolLM2).
STAGES = ("load", "capture", "score")
_SCORE_SLICES = {"span": (0.0, 0.6), "dpi": (0.6, 0.62), "stability": (0.62, 0.95),
                 "baselines": (0.95, 1.0), "score": (0.0, 1.0)}
# Relative durations used only to weigh stages that have not started yet in the time-left estimate.
_STAGE_WEIGHTS = {"load": 0.15, "capture": 0.45, "score": 0.40}


class Cancelled(Exception):
    """Raised from a progress callback to stop a run the user cancelled."""


@dataclass
class ProgressTracker:
    """Fractions per app stage, and a time-left estimate from the elapsed time.

    `update` is a `mi_prun.progress.Progress`: it accepts the library's stage names (load,
    capture, span, dpi, stability, baselines, score) and returns the app stage they belong to.
    """

    clock: Callable[[], float] = time.perf_counter
    fractions: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    messages: dict[str, str] = field(default_factory=lambda: {s: "waiting" for s in STAGES})
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    t0: float | None = None

    def update(self, stage: str, fraction: float, message: str = "") -> str:
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        app_stage = stage if stage in STAGES else ("score" if stage in _SCORE_SLICES else "load")
        lo, hi = _SCORE_SLICES.get(stage, (0.0, 1.0)) if app_stage == "score" else (0.0, 1.0)
        f = lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0)
        # Earlier stages are done once a later one reports (a stage may skip its final 100 %).
        for s in STAGES[:STAGES.index(app_stage)]:
            self._finish(s, now)
        self.started.setdefault(app_stage, now)
        self.fractions[app_stage] = max(self.fractions[app_stage], f)
        self.messages[app_stage] = message or stage
        if self.fractions[app_stage] >= 1.0:
            self._finish(app_stage, now)
        return app_stage

    def _finish(self, stage: str, now: float) -> None:
        self.started.setdefault(stage, now)
        self.fractions[stage] = 1.0
        self.finished.setdefault(stage, now)

    def overall(self) -> float:
        return sum(_STAGE_WEIGHTS[s] * self.fractions[s] for s in STAGES)

    def seconds_left(self) -> float | None:
        """Estimated seconds to the end of the run, or None until enough is known."""
        if self.t0 is None:
            return None
        elapsed = self.clock() - self.t0
        done = self.overall()
        if done < 0.05 or elapsed < 0.5:
            return None
        return max(elapsed * (1.0 - done) / done, 0.0)

    def eta_text(self) -> str:
        left = self.seconds_left()
        if left is None:
            return "estimating the time left..."
        if left < 1.0:
            return "almost done"
        if left < 90:
            return f"about {left:.0f} s left"
        return f"about {left / 60:.0f} min left"


def progress_text(message: str, left: float | None, fraction: float) -> str:
    """A progress bar's text: the library's message and the time left (`mi_prun.progress.TimeLeft`)."""
    return message if fraction >= 1.0 else f"{message} - {time_left_text(left)}"


def cancellable(progress: Progress | None, should_cancel: Callable[[], bool]) -> Progress:
    """Wrap a progress callback so that it raises `Cancelled` once `should_cancel()` is true."""

    def wrapped(stage: str, fraction: float, message: str = "") -> None:
        if should_cancel():
            raise Cancelled(f"cancelled during {stage}")
        if progress is not None:
            progress(stage, fraction, message)

    return wrapped


# ----------------------------------------------------------------------------------------------
# analyses shared between sessions

def analysis_key(model_spec: str, cfg: AnalysisConfig, text_sha: str | None = None) -> str:
    """A stable key for the memo: the model and every field of the config (long pasted or
    uploaded text enters through its hash, not verbatim)."""
    fields = asdict(cfg)
    calib = str(fields.get("calib", ""))
    if calib.startswith("text:"):
        fields["calib"] = "text:sha256:" + (text_sha or sha256_text(calib[5:]))
    items = repr(sorted((k, repr(v)) for k, v in fields.items()))
    return hashlib.sha256(f"{model_spec}|{items}".encode()).hexdigest()[:24]


class Memo:
    """A small thread-safe LRU map shared by all sessions (held in st.cache_resource).

    Values must be treated as read-only by readers: sessions share them.
    """

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class CurveJob:
    """The verified answer for every n of one analysis and one set of selection settings, computed
    in a background thread so that the page stays usable (the prune page's "verify every n").

    `verify(n)` is the library call for one n (`select(..., model=...)` with the session's
    settings); `lock` is the analysis's NLL-cache lock, taken for one n at a time, so a
    verification the user asks for in the foreground waits for at most one n. Every n reuses the
    sets measured at any other n (the shared NLL cache and, raced, the partly scored sets), which
    is what makes the whole curve cheap once a few n are done. Nothing here touches Streamlit: the
    page reads `results`, `progress()` and `error`.
    """

    def __init__(self, ns: Sequence[int], verify: Callable[[int], Any], lock: threading.Lock) -> None:
        self.ns = [int(n) for n in ns]
        self.verify, self.lock = verify, lock
        self.results: dict[int, Any] = {}
        self.seconds: dict[int, float] = {}  # wall time of each n verified here
        self.current: int | None = None
        self.error: str | None = None
        self.cancelled = False
        self._queue = list(self.ns)
        self._queue_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mi-prun-verify-curve", daemon=True)

    def start(self) -> "CurveJob":
        self.thread.start()
        return self

    def prefer(self, n: int) -> None:
        """Verify `n` next (the n the user looks at), then the rest in their order."""
        with self._queue_lock:
            if int(n) in self._queue:
                self._queue.remove(int(n))
                self._queue.insert(0, int(n))

    def _next(self) -> int | None:
        with self._queue_lock:
            return self._queue.pop(0) if self._queue and not self.cancelled else None

    def _run(self) -> None:
        while (n := self._next()) is not None:
            self.current = n
            started = time.perf_counter()
            try:
                with self.lock:
                    self.results[n] = self.verify(n)
            except MiPrunError as exc:  # the library's one-line reason; the n done so far stay
                self.error = f"n = {n}: {exc}"
                break
            self.seconds[n] = time.perf_counter() - started
        self.current = None

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def progress(self) -> tuple[int, int]:
        """(n verified so far, n to verify)."""
        return len(self.results), len(self.ns)

    def seconds_left(self) -> float | None:
        """The time the n left will take at the mean pace of the n done so far (None before the
        first is done). Later n reuse more of the cache, so this errs long."""
        if not self.seconds:
            return None
        return sum(self.seconds.values()) / len(self.seconds) * (len(self.ns) - len(self.results))

    def cancel(self) -> None:
        """Stop after the n being verified (its answer is kept)."""
        self.cancelled = True


# ----------------------------------------------------------------------------------------------
# text

def ratio_text(n: int, L: int) -> str:
    return f"{n} of {L} blocks ({100.0 * n / L:.0f} %)" if L else f"{n} blocks"


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.1f} s"
