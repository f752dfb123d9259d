"""Typed, serialisable results: an `Analysis` saved as a folder (JSON + `.npz`), reloaded without
recomputation.

Folder layout: `analysis.json` (metadata, scalars, small lists; `format` and `format_version`)
and `arrays.npz` (every numpy array, by field name; loaded with `allow_pickle=False`, so a file
from elsewhere can never run code). Writing is atomic: a temporary sibling folder is renamed into
place at the end, so an interrupted save never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mi_prun.errors import MiPrunError

FORMAT = "mi-prun-analysis"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for provenance."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mi-prun", "torch", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Analysis:
    """Everything scoring produced from one capture. Blocks are numbered from 0.

    Shapes (L blocks; h_0 is the input of block 0, h_L the output of the last block):
      block_mi        (L,)        MI_b = I(h_b; h_{b+1}); high = redundant; importance = -block_mi
      span            (L+1, L+1)  M[i, j] = I(h_i; h_j), symmetric, NaN on the diagonal
      span_norm       (L+1, L+1)  normalised MI in [0, 1] (1 on the diagonal), or None where the
                                  estimator defines none
      block_mi_batches (L, B)     block MI per calibration batch (stability)
      baselines       name -> array: "cosine_bi" (L,) ShortGPT Block Influence, 1 - mean cos(h_b,
                      h_{b+1}), high = important; "angular" (L+1, L+1) mean angular distance
                      arccos(cos(h_i, h_j)) / pi, the cost of removing the window i..j-1
    """

    model: dict[str, Any]
    calibration: dict[str, Any]
    estimator: str
    estimator_options: dict[str, Any]
    block_mi: np.ndarray
    span: np.ndarray
    span_norm: np.ndarray | None = None
    dpi: dict[str, Any] = field(default_factory=dict)
    block_mi_batches: np.ndarray | None = None
    stability: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    notes: list[str] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return int(self.block_mi.shape[0])

    @property
    def importance(self) -> np.ndarray:
        """-MI_b: low importance = redundant block."""
        return -self.block_mi

    def ranking(self) -> list[int]:
        """Blocks from most to least redundant (highest block MI first; ties by index)."""
        return sorted(range(self.n_blocks), key=lambda b: (-float(self.block_mi[b]), b))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the analysis to `folder` atomically; refuse a non-empty folder unless `overwrite`."""
        target = Path(folder)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise MiPrunError(f"{target} exists and is not empty. Fix: choose another folder or overwrite it.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        arrays: dict[str, np.ndarray] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                arrays[f.name] = value
            elif f.name == "baselines":
                meta["baselines"] = sorted(value)
                for name, arr in value.items():
                    arrays[f"baseline.{name}"] = np.asarray(arr)
            else:
                meta[f.name] = value
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        except OSError as exc:
            raise _write_error(target, exc) from exc
        try:
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "analysis.json").write_text(json.dumps(_jsonable(meta), indent=2, allow_nan=True))
            _fsync_dir(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                target.rename(old)
                try:
                    tmp.rename(target)
                except OSError:
                    old.rename(target)  # put the previous analysis back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Analysis":
        """Reload a saved analysis; a corrupt or incompatible folder gets a clear `MiPrunError`."""
        src = Path(folder)
        meta_path, arr_path = src / "analysis.json", src / "arrays.npz"
        if not meta_path.is_file() or not arr_path.is_file():
            raise MiPrunError(f"{src} is not a saved analysis (analysis.json and arrays.npz expected). "
                              "Fix: give a folder written by `mi-prun analyze --out`.")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MiPrunError(f"{meta_path} is corrupt ({exc}). Fix: run the analysis again.") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MiPrunError(f"{src} is not a mi-prun analysis. Fix: run the analysis again.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise MiPrunError(
                f"{src} was saved in analysis format {meta.get('format_version')}; this mi-prun reads "
                f"format {FORMAT_VERSION}. Fix: run the analysis again with this version.")
        try:
            with np.load(arr_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile/ValueError/OSError: all mean a damaged file
            raise MiPrunError(f"{arr_path} is corrupt ({type(exc).__name__}). Fix: run the analysis again.") from exc
        kwargs: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in meta.items():
            if key in names and key != "baselines":
                kwargs[key] = value
        for key, value in arrays.items():
            if key.startswith("baseline."):
                continue
            kwargs[key] = value
        kwargs["baselines"] = {name: arrays[f"baseline.{name}"] for name in meta.get("baselines", [])
                               if f"baseline.{name}" in arrays}
        try:
            analysis = cls(**kwargs)
        except TypeError as exc:
            raise MiPrunError(f"{src} is missing fields ({exc}). Fix: run the analysis again.") from exc
        L = analysis.n_blocks
        if analysis.span.shape != (L + 1, L + 1):
            raise MiPrunError(f"{src} is inconsistent: span matrix {analysis.span.shape} for {L} blocks.")
        return analysis


def _write_error(path: Path, exc: OSError) -> MiPrunError:
    """A failed save (read-only folder, full disk) as one line; nothing is left at the target."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = "free disk space" if exc.errno == errno.ENOSPC else "choose a writable folder"
    return MiPrunError(f"cannot save the analysis to {path}: {reason}. Fix: {hint}; the target was "
                       "left as it was.")


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars, tuples, paths and nested containers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(obj: Any, **kwargs: Any) -> str:
    """JSON text of nested results (numpy values converted)."""
    return json.dumps(_jsonable(obj), **kwargs)
