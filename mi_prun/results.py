"""Typed, serialisable results: an `Analysis` saved as a folder (JSON + `.npz`), reloaded without
recomputation, and the identity of the model it describes.

Folder layout: `analysis.json` (metadata, scalars, small lists; `format` and `format_version`)
and `arrays.npz` (every numpy array, by field name; loaded with `allow_pickle=False`, so a file
from elsewhere can never run code). Saving goes through `mi_prun.files.write_folder` (atomic,
exclusive, never replacing anything but an earlier analysis). Loading validates every array
(shape, dtype, finiteness, symmetry, range) and refuses a damaged or hand-edited folder.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mi_prun.errors import MiPrunError
from mi_prun.files import ANALYSIS, check_path_length, dump_json, parse_json, write_folder
from mi_prun.runtime.identity import check_same_model

FORMAT = ANALYSIS.format
FORMAT_VERSION = 1
_NEG_TOL = 1e-6  # MI estimates are clipped at 0; anything below this is damage, not rounding
_SYM_TOL = 1e-5


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for provenance."""
    out = {"python": platform.python_version()}
    for pkg in ("mi-prun", "torch", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------------------------------- Analysis

@dataclass
class Analysis:
    """Everything scoring produced from one capture. Blocks are numbered from 0.

    Shapes (L blocks; h_0 is the input of block 0, h_L the output of the last block):
      block_mi        (L,)        MI_b = I(h_b; h_{b+1}); high = redundant
      span            (L+1, L+1)  M[i, j] = I(h_i; h_j), symmetric, NaN on the diagonal
      span_norm       (L+1, L+1)  normalised MI in [0, 1] (1 on the diagonal), or None where the
                                  estimator defines none
      block_mi_batches (L, B)     block MI per calibration batch (stability)
      baselines       name -> array: "cosine_bi" (L,) ShortGPT Block Influence, 1 - mean cos(h_b,
                      h_{b+1}), high = important; "angular" (L+1, L+1) mean angular distance
                      arccos(cos(h_i, h_j)) / pi, the cost of removing the window i..j-1
      span_unexplained (L+1, L+1) share of h_j's variance the best linear map from h_i leaves
                      unexplained, in [0, 1] (not symmetric), or None in older analyses
    `model` describes the analysed model; its "identity" (see `model_identity`) lets `prune`
    refuse to apply the analysis to another model.
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
    span_unexplained: np.ndarray | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # peak memory, offload (see pipeline.analyze)

    @property
    def n_blocks(self) -> int:
        return int(self.block_mi.shape[0])

    def ranking(self) -> list[int]:
        """Blocks from most to least redundant (highest block MI first; ties by lower index)."""
        return rank_blocks(self.block_mi, descending=True)

    def check_model(self, model: Any, force: bool = False, where: str = "this analysis") -> None:
        """Refuse (`MiPrunError`) to apply this analysis to a model other than the analysed one.

        `force=True` accepts a model with the same block count (for a user who knows the two
        share a structure); a different block count is refused always."""
        check_same_model(self.model, self.n_blocks, model, force=force, where=where, what="analysis")

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike, overwrite: bool = False,
             inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
        """Write the analysis to `folder` atomically (see `mi_prun.files.write_folder`): a
        non-empty folder is refused unless `overwrite` and it holds an earlier analysis."""
        validate_arrays(self, str(folder))
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
            elif value is not None:
                meta[f.name] = value

        def fill(tmp: Path) -> None:
            np.savez(tmp / "arrays.npz", **arrays)
            dump_json(meta, tmp / "analysis.json")

        return write_folder(folder, ANALYSIS, fill, overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Analysis":
        """Reload a saved analysis; a corrupt, damaged or incompatible folder gets `MiPrunError`."""
        if not isinstance(folder, (str, os.PathLike)):
            raise MiPrunError(f"an analysis folder must be a path, got {type(folder).__name__}.")
        check_path_length(folder, "analysis folder")
        src = Path(folder)
        meta_path, arr_path = src / "analysis.json", src / "arrays.npz"
        if not meta_path.is_file() or not arr_path.is_file():
            raise MiPrunError(f"{src} is not a saved analysis (analysis.json and arrays.npz expected). "
                              "Fix: give a folder written by `mi-prun analyze --out`.")
        try:
            meta = parse_json(meta_path.read_text(encoding="utf-8"))
        except PermissionError as exc:
            raise MiPrunError(f"cannot read {meta_path}: permission denied. Fix: check the file's "
                              "permissions (chmod u+r).") from exc
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise MiPrunError(f"{meta_path} cannot be read ({type(exc).__name__}). Fix: run the "
                              "analysis again.") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MiPrunError(f"{src} is not a mi-prun analysis. Fix: run the analysis again.")
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise MiPrunError(f"{meta_path}: format_version must be a whole number, got {version!r}; the "
                              "analysis is damaged or was edited. Fix: run the analysis again.")
        if version != FORMAT_VERSION:
            raise MiPrunError(
                f"{src} was saved in analysis format {meta.get('format_version')}; this mi-prun reads "
                f"format {FORMAT_VERSION}. Fix: run the analysis again with this version.")
        try:
            with np.load(arr_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except PermissionError as exc:
            raise MiPrunError(f"cannot read {arr_path}: permission denied. Fix: check the file's "
                              "permissions (chmod u+r).") from exc
        except Exception as exc:  # zipfile/ValueError/OSError: all mean a damaged file
            raise MiPrunError(f"{arr_path} is corrupt ({type(exc).__name__}). Fix: run the analysis again.") from exc
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in meta.items() if k in names and k != "baselines"}
        kwargs.update({k: v for k, v in arrays.items() if not k.startswith("baseline.")})
        baseline_names = meta.get("baselines", [])
        if not isinstance(baseline_names, list):
            raise MiPrunError(f"{meta_path}: 'baselines' must be a list. Fix: run the analysis again.")
        kwargs["baselines"] = {str(name): arrays[f"baseline.{name}"] for name in baseline_names
                               if f"baseline.{name}" in arrays}
        for key, typ in (("model", dict), ("calibration", dict), ("estimator", str),
                         ("estimator_options", dict), ("dpi", dict), ("stability", dict),
                         ("timings", dict), ("versions", dict), ("notes", list)):
            if key in kwargs and not isinstance(kwargs[key], typ):
                raise MiPrunError(f"{meta_path}: '{key}' must be a {typ.__name__}, got "
                                  f"{type(kwargs[key]).__name__}. Fix: run the analysis again.")
        _check_scalars(kwargs, meta_path)
        try:
            analysis = cls(**kwargs)
        except TypeError as exc:
            raise MiPrunError(f"{src} is missing fields ({exc}). Fix: run the analysis again.") from exc
        validate_arrays(analysis, str(src))
        return analysis


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_scalars(kwargs: dict[str, Any], meta_path: Path) -> None:
    """The numbers that reports print must be numbers (a hand-edited JSON is refused, not shown)."""
    bad = [f"timings.{k}" for k, v in (kwargs.get("timings") or {}).items() if not _is_number(v)]
    tau = (kwargs.get("stability") or {}).get("kendall_tau_halves")
    if tau is not None and not _is_number(tau):
        bad.append("stability.kendall_tau_halves")
    dpi = kwargs.get("dpi") or {}
    for key in ("n_violations", "n_cells", "max_excess"):
        if key in dpi and dpi[key] is not None and not _is_number(dpi[key]):
            bad.append(f"dpi.{key}")
    if "tolerance" in dpi and not isinstance(dpi["tolerance"], (dict, int, float, list)):
        bad.append("dpi.tolerance")
    notes = kwargs.get("notes") or []
    if not all(isinstance(n, str) for n in notes):
        bad.append("notes")
    if bad:
        raise MiPrunError(f"{meta_path}: {', '.join(bad[:4])} must be numbers (or text for notes); the "
                          "analysis is damaged or was edited. Fix: run the analysis again.")


def _refuse(where: str, name: str, problem: str) -> MiPrunError:
    return MiPrunError(f"{where}: array '{name}' {problem}; the analysis is damaged or was edited. "
                       "Fix: run the analysis again.")


def _numeric(where: str, name: str, arr: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise _refuse(where, name, f"has dtype {a.dtype}, not a number type")
    if a.shape != shape:
        raise _refuse(where, name, f"has shape {a.shape}, expected {shape}")
    return a.astype(np.float64)


def validate_arrays(analysis: Analysis, where: str = "analysis") -> None:
    """Refuse arrays with the wrong shape or dtype, non-finite or negative MI, an asymmetric span
    matrix, a block MI that disagrees with the span matrix, or normalised MI outside [0, 1]."""
    bm = np.asarray(analysis.block_mi)
    if bm.ndim != 1 or bm.shape[0] < 1:
        raise _refuse(where, "block_mi", f"has shape {bm.shape}, expected (L,) with L >= 1")
    L = bm.shape[0]
    recorded = (analysis.model or {}).get("n_blocks") if isinstance(analysis.model, dict) else None
    if _is_number(recorded) and int(recorded) != L:
        raise _refuse(where, "block_mi", f"holds {L} blocks but the analysis records a model of {recorded} blocks")
    bm = _numeric(where, "block_mi", bm, (L,))
    if not np.isfinite(bm).all():
        raise _refuse(where, "block_mi", f"holds {int((~np.isfinite(bm)).sum())} non-finite value(s)")
    if (bm < -_NEG_TOL).any():
        raise _refuse(where, "block_mi", f"holds negative mutual information ({bm.min():.4g})")
    span = _numeric(where, "span", analysis.span, (L + 1, L + 1))
    off = ~np.eye(L + 1, dtype=bool)
    if not np.isfinite(span[off]).all():
        raise _refuse(where, "span", f"holds {int((~np.isfinite(span[off])).sum())} non-finite off-diagonal value(s)")
    if (span[off] < -_NEG_TOL).any():
        raise _refuse(where, "span", f"holds negative mutual information ({span[off].min():.4g})")
    scale = max(1.0, float(np.abs(span[off]).max()))
    if np.abs(span - span.T)[off].max(initial=0.0) > _SYM_TOL * scale:
        raise _refuse(where, "span", "is not symmetric")
    if np.abs(np.diagonal(span, 1) - bm).max() > _SYM_TOL * scale:
        raise _refuse(where, "block_mi", "disagrees with the span matrix's first off-diagonal")
    if analysis.span_norm is not None:
        sn = _numeric(where, "span_norm", analysis.span_norm, (L + 1, L + 1))
        if not np.isfinite(sn[off]).all() or (sn[off] < -_NEG_TOL).any() or (sn[off] > 1 + 1e-4).any():
            raise _refuse(where, "span_norm", "holds values outside [0, 1]")
        if np.abs(sn - sn.T)[off].max(initial=0.0) > _SYM_TOL:
            raise _refuse(where, "span_norm", "is not symmetric")
    if analysis.span_unexplained is not None:
        su = _numeric(where, "span_unexplained", analysis.span_unexplained, (L + 1, L + 1))
        if not np.isfinite(su).all() or (su < -1e-6).any() or (su > 1 + 1e-6).any():
            raise _refuse(where, "span_unexplained", "holds values outside [0, 1]")
    if analysis.block_mi_batches is not None:
        b = np.asarray(analysis.block_mi_batches)
        if b.ndim != 2 or b.shape[0] != L:
            raise _refuse(where, "block_mi_batches", f"has shape {b.shape}, expected ({L}, groups)")
        b = _numeric(where, "block_mi_batches", b, b.shape)
        if not np.isfinite(b).all():
            raise _refuse(where, "block_mi_batches", "holds non-finite values")
    bi = analysis.baselines.get("cosine_bi")
    if bi is not None:
        bi = _numeric(where, "baseline.cosine_bi", bi, (L,))
        if not np.isfinite(bi).all() or (bi < -1e-4).any() or (bi > 2 + 1e-4).any():
            raise _refuse(where, "baseline.cosine_bi", "holds values outside [0, 2]")
    ang = analysis.baselines.get("angular")
    if ang is not None:
        ang = _numeric(where, "baseline.angular", ang, (L + 1, L + 1))
        if not np.isfinite(ang[off]).all() or (ang < -1e-4).any() or (ang > 1 + 1e-4).any():
            raise _refuse(where, "baseline.angular", "holds values outside [0, 1]")


def rank_blocks(scores: Any, descending: bool = True, among: Iterable[int] | None = None) -> list[int]:
    """Block indices ordered by score (highest first when `descending`), NaN last, ties by lower
    index; only the blocks in `among` when given. The one ranking of mi-prun (CLI, app, selectors):
    ranks are positions in this list, so rank 0 is the first (0-based, like block numbers)."""
    s = np.asarray(scores, dtype=np.float64)
    blocks = range(s.shape[0]) if among is None else among

    def key(b: int) -> tuple:
        nan = bool(np.isnan(s[b]))
        return (nan, 0.0 if nan else (-s[b] if descending else s[b]), b)

    return sorted((int(b) for b in blocks), key=key)


__all__ = ["Analysis", "FORMAT", "FORMAT_VERSION", "library_versions", "rank_blocks", "validate_arrays"]
