"""Helper logic of the Streamlit app that needs no Streamlit: settings from the environment,
upload checks, the export-path sanitiser, progress and time-left bookkeeping, the thread-safe
analysis memo, table and archive builders.

Kept out of `app.py`/`pages/` so that it is unit-tested without a browser and without Streamlit
(the core never imports Streamlit; this module does not either).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mi_prun.errors import MiPrunError

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

# Perplexity in the app: short, so that it answers in seconds on a CPU. Stated next to every
# perplexity figure, because the protocol changes perplexity many times over.
PPL_SEQ_LEN = 128
PPL_WINDOWS = 8


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
    from mi_prun.data import WIKITEXT_FILES, data_dir

    folder = data_dir()
    if folder is not None and (folder / WIKITEXT_FILES["test"]).is_file():
        return "wikitext2-test"
    return "builtin"


def wikitext_status() -> tuple[bool, str]:
    """Whether WikiText-2 calibration text can be read here, and how (or how to get it)."""
    from mi_prun.data import WIKITEXT_FILES, data_dir

    folder = data_dir()
    if folder is not None and (folder / WIKITEXT_FILES["valid"]).is_file():
        return True, f"local copy in {folder}"
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False, ("WikiText-2 is not available here. Get it with `pip install datasets` (downloads "
                       "once, needs internet), or set MI_PRUN_DATA_DIR to a folder holding "
                       f"{WIKITEXT_FILES['valid']}, or give that folder below.")
    return True, "through the `datasets` library (downloads once, needs internet)"


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


# ----------------------------------------------------------------------------------------------
# uploads: read as text, never executed or unpickled

def text_from_upload(name: str, raw: bytes, limit: int = UPLOAD_LIMIT_BYTES) -> str:
    """The calibration text of an uploaded `.txt`/`.md`/`.jsonl` file (UTF-8).

    The bytes are only decoded (and, for `.jsonl`, parsed as JSON objects with a "text" field);
    nothing is written to disk, executed or unpickled.
    """
    from mi_prun.data import decode_bytes, parse_jsonl

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

    `update(stage, fraction, message)` accepts the library's stage names (load, capture, span,
    dpi, stability, baselines, score) and returns the app stage it belongs to.
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
        now = self.clock()
        elapsed = now - self.t0
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


def cancellable(progress: Callable[[str, float, str], None] | None,
                should_cancel: Callable[[], bool]) -> Callable[[str, float, str], None]:
    """Wrap a progress callback so that it raises `Cancelled` once `should_cancel()` is true."""

    def wrapped(stage: str, fraction: float, message: str = "") -> None:
        if should_cancel():
            raise Cancelled(f"cancelled during {stage}")
        if progress is not None:
            progress(stage, fraction, message)

    return wrapped


# ----------------------------------------------------------------------------------------------
# running an analysis on a shared (cached) model

def analysis_key(model_spec: str, cfg: Any, text_sha: str | None = None) -> str:
    """A stable key for the memo: the model and every field of the config (long pasted or
    uploaded text enters through its hash, not verbatim)."""
    fields = asdict(cfg)
    calib = str(fields.get("calib", ""))
    if calib.startswith("text:"):
        fields["calib"] = "text:sha256:" + (text_sha or sha256_text(calib[5:]))
    items = repr(sorted((k, repr(v)) for k, v in fields.items()))
    return hashlib.sha256(f"{model_spec}|{items}".encode()).hexdigest()[:24]


def run_analysis(loaded: Any, cfg: Any, progress: Callable[[str, float, str], None] | None = None) -> Any:
    """The analysis of `loaded` under `cfg`; the shared model is only read.

    `capture` hooks a structural copy that shares the weights (`prune.pruned_view(model, [])`),
    so hooks of one session never fire during another session's forward pass on the same
    cached model.
    """
    from mi_prun.pipeline import analyze

    return analyze(loaded, cfg, progress=progress)


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


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What must never change on a shared model: block count, config, hooks, weight identities
    and a checksum of the weights (tests compare it before and after concurrent sessions)."""
    import torch

    from mi_prun.capture import count_hooks
    from mi_prun.models import find_blocks, num_layers_of

    blocks = find_blocks(model)
    with torch.no_grad():
        checksum = float(sum(float(p.double().abs().sum()) for p in model.parameters()))
    return {"n_blocks": len(blocks), "config_layers": num_layers_of(model.config),
            "hooks": count_hooks(model), "block_ids": [id(b) for b in blocks.blocks],
            "param_ptrs": [p.data_ptr() for p in model.parameters()], "checksum": checksum,
            "training": bool(model.training)}


# ----------------------------------------------------------------------------------------------
# tables (every table in the app can be downloaded as CSV)

def csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode("utf-8")


def _rank(values: np.ndarray, descending: bool) -> np.ndarray:
    """1 = first; ties by block index."""
    order = sorted(range(len(values)), key=lambda b: ((-values[b] if descending else values[b]), b))
    ranks = np.empty(len(values), dtype=int)
    for r, b in enumerate(order, 1):
        ranks[b] = r
    return ranks


def ranking_frame(analysis: Any) -> pd.DataFrame:
    """One row per block: block MI and the baselines' scores, and each criterion's redundancy rank
    (1 = removed first). Blocks are numbered from 0."""
    L = analysis.n_blocks
    mi = np.asarray(analysis.block_mi, dtype=float)
    df = pd.DataFrame({"block": np.arange(L), "block_mi": mi, "rank_mi": _rank(mi, descending=True)})
    bi = analysis.baselines.get("cosine_bi")
    if bi is not None:
        bi = np.asarray(bi, dtype=float)
        df["cosine_bi"] = bi
        df["rank_cosine_bi"] = _rank(bi, descending=False)
    ang = analysis.baselines.get("angular")
    if ang is not None:
        single = np.array([float(np.asarray(ang)[b, b + 1]) for b in range(L)])
        df["angular_distance"] = single
        df["rank_angular"] = _rank(single, descending=False)
    return df


def span_frame(analysis: Any) -> pd.DataFrame:
    """Every span i < j: the blocks it covers, its MI, normalised MI and DPI bound."""
    span = np.asarray(analysis.span, dtype=float)
    bound = (analysis.dpi or {}).get("bound")
    bound = np.asarray(bound, dtype=float) if bound is not None else None
    norm = np.asarray(analysis.span_norm, dtype=float) if analysis.span_norm is not None else None
    rows = []
    n = span.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            rows.append({"i": i, "j": j, "first_block": i, "last_block": j - 1, "n_blocks": j - i,
                         "span_mi": span[i, j],
                         "span_nmi": None if norm is None else norm[i, j],
                         "dpi_bound": None if bound is None or not np.isfinite(bound[i, j]) else bound[i, j]})
    return pd.DataFrame(rows)


def violations_frame(analysis: Any) -> pd.DataFrame:
    worst = (analysis.dpi or {}).get("worst") or []
    cols = ["i", "j", "value", "bound", "excess", "bound_cell"]
    df = pd.DataFrame([{k: (str(w.get(k)) if k == "bound_cell" else w.get(k)) for k in cols}
                       for w in worst], columns=cols)
    return df


def stability_frame(analysis: Any) -> pd.DataFrame:
    batches = analysis.block_mi_batches
    if batches is None:
        return pd.DataFrame()
    batches = np.asarray(batches, dtype=float)
    df = pd.DataFrame(batches, columns=[f"group_{g}" for g in range(batches.shape[1])])
    df.insert(0, "block", np.arange(batches.shape[0]))
    return df


def trajectory_frame(selection: Any) -> pd.DataFrame:
    """FBS iterations: prune pool P, alternative pool A, candidates measured, objective, time."""
    rows = []
    for step in selection.trajectory:
        rows.append({"iteration": step.get("iteration"), "P": " ".join(map(str, step.get("P", []))),
                     "A": " ".join(map(str, step.get("A", []))),
                     "candidates_measured": len(step.get("candidates", []) or []),
                     "objective": step.get("objective"), "changed": step.get("changed"),
                     "elapsed_s": step.get("elapsed")})
    return pd.DataFrame(rows)


def candidates_frame(step: Mapping[str, Any]) -> pd.DataFrame:
    cols = ["start", "end", "coarse", "span_mi", "cost", "source", "chosen"]
    rows = [{k: c.get(k) for k in cols} for c in step.get("candidates", []) or []]
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        df.insert(2, "blocks", [f"{s}..{e - 1}" for s, e in zip(df["start"], df["end"])])
    return df


def comparison_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """`select.compare` rows as a table (removed blocks as text, so that the CSV stays flat)."""
    out = []
    for r in rows:
        r = dict(r)
        r["removed"] = " ".join(map(str, r["removed"])) if r.get("removed") is not None else ""
        out.append(r)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# archives

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


def ratio_text(n: int, L: int) -> str:
    return f"{n} of {L} blocks ({100.0 * n / L:.0f} %)" if L else f"{n} blocks"


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.1f} s"
