"""The result of a selection: `Selection` (which blocks, how chosen, at what cost), its JSON form,
and `make_selection`, which every selector's answer goes through so that results are checked and
serialisable alike.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


from mi_prun.errors import MiPrunError
from mi_prun.files import check_path_length, dump_json, jsonable, parse_json, write_error
from mi_prun.select.costs import runs_of


@dataclass(frozen=True)
class Selection:
    """Which blocks to remove, how they were chosen, and what it cost. Blocks numbered from 0.

    objective: sum of run costs of `removed` under `run_cost` (lower = better); NaN only where no
        span matrix was available (e.g. `sleb_select` without an analysis).
    forward_passes: full passes over the calibration set (0 for score-based methods).
    span_lookups: distinct span entries the method read.
    trajectory: method-specific steps (JSON-serialisable), e.g. FBS iterations or SLEB steps.
    verified: True when forward passes on verification tokens chose `removed` among candidate
        sets (`mi_prun.select.verify`); then `nll` is its verification NLL, `candidates` lists every
        scored set ({"removed", "proposers", "objective", "nll", "cached", "stage"}),
        `winner_source` the criterion that proposed the winner, `one_pass_removed` /
        `one_pass_nll` the one-pass answer and its NLL, and `verification` the budget, passes,
        dense NLL and tokens. Unverified selections may carry `verification["note"]` saying why.
    """

    method: str
    n: int
    n_blocks: int
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    runs: list[tuple[int, int]]
    objective: float
    run_cost: str
    seconds: float
    forward_passes: int = 0
    span_lookups: int = 0
    ratio: float | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # the analysis: model (with identity), estimator, calibration
    verified: bool = False
    nll: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    winner_source: str | None = None
    one_pass_removed: tuple[int, ...] | None = None
    one_pass_nll: float | None = None
    verification: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
        return jsonable({
            "method": self.method, "n": self.n, "n_blocks": self.n_blocks,
            "removed": list(self.removed), "kept": list(self.kept),
            "runs": [list(r) for r in self.runs], "objective": self.objective,
            "run_cost": self.run_cost, "seconds": self.seconds,
            "forward_passes": self.forward_passes, "span_lookups": self.span_lookups,
            "ratio": self.ratio, "trajectory": self.trajectory, "options": self.options,
            "provenance": self.provenance, "verified": self.verified, "nll": self.nll,
            "candidates": self.candidates, "winner_source": self.winner_source,
            "one_pass_removed": None if self.one_pass_removed is None else list(self.one_pass_removed),
            "one_pass_nll": self.one_pass_nll, "verification": self.verification,
        })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """Inverse of `to_dict`. Block numbers and counts must be whole numbers as written (2.7 or
        true is damage, never rounded or cast to a block)."""
        try:
            objective = d["objective"]
            return cls(
                method=_str(d["method"], "method"), n=_int(d["n"], "n"), n_blocks=_int(d["n_blocks"], "n_blocks"),
                removed=_blocks(d["removed"], "removed"), kept=_blocks(d["kept"], "kept"),
                runs=[(_int(s, "runs"), _int(e, "runs")) for s, e in _list(d["runs"], "runs")],
                objective=math.nan if objective is None else _num(objective, "objective"),
                run_cost=_str(d["run_cost"], "run_cost"), seconds=_num(d["seconds"], "seconds"),
                forward_passes=_int(d.get("forward_passes", 0), "forward_passes"),
                span_lookups=_int(d.get("span_lookups", 0), "span_lookups"),
                ratio=None if d.get("ratio") is None else _num(d["ratio"], "ratio"),
                trajectory=list(d.get("trajectory", [])), options=dict(d.get("options", {})),
                provenance=dict(d.get("provenance") or {}),
                verified=bool(d.get("verified", False)), nll=_opt_float(d.get("nll")),
                candidates=list(d.get("candidates") or []), winner_source=d.get("winner_source"),
                one_pass_removed=None if d.get("one_pass_removed") is None else
                _blocks(d["one_pass_removed"], "one_pass_removed"),
                one_pass_nll=_opt_float(d.get("one_pass_nll")),
                verification=dict(d.get("verification") or {}),
            )
        except KeyError as exc:
            raise MiPrunError(f"not a saved selection: the field {exc} is missing. Fix: write it again with "
                              "`mi-prun select --out`.") from exc
        except (TypeError, ValueError) as exc:
            raise MiPrunError(f"not a saved selection: {exc}. Fix: write it again with "
                              "`mi-prun select --out`.") from exc

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the selection as a JSON file (atomically); an existing file is replaced only with
        `overwrite` and only if it is an earlier selection file."""
        from mi_prun.config import as_path

        check_path_length(as_path(path, "selection file"), "selection file")
        target = Path(as_path(path, "selection file")).expanduser().absolute()
        if target.is_dir():
            raise MiPrunError(f"{target} is a folder. Fix: give a file name such as selection.json.")
        if target.exists():
            if not overwrite:
                raise MiPrunError(f"{target} exists. Fix: choose another file name or pass --overwrite.")
            if _read(target, quiet=True) is None:
                raise MiPrunError(f"{target} is not an earlier mi-prun selection; --overwrite replaces only "
                                  "those. Fix: choose another file name.")
        record = {"format": SELECTION_FORMAT, "format_version": SELECTION_FORMAT_VERSION, **self.to_dict()}
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            dump_json(record, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise write_error(target, exc, "selection") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Selection":
        """Read a selection file written by `save` (or `mi-prun select --out`), checked."""
        from mi_prun.config import as_path

        src = Path(as_path(path, "selection file"))
        check_path_length(src, "selection file")
        if not src.is_file():
            raise MiPrunError(f"selection file {src} not found. Fix: give a file written by "
                              "`mi-prun select --out`.")
        record = _read(src)
        assert record is not None
        version = record.get("format_version")
        if version != SELECTION_FORMAT_VERSION or isinstance(version, bool):
            raise MiPrunError(f"selection file {src} has format_version {version!r}; this mi-prun reads format "
                              f"{SELECTION_FORMAT_VERSION}. Fix: write it again with `mi-prun select --out`.")
        try:
            sel = cls.from_dict(record)
        except MiPrunError as exc:
            raise MiPrunError(f"selection file {src}: {exc}") from exc
        L = sel.n_blocks
        if L < 1 or len(set(sel.removed)) != sel.n or not 0 < sel.n < L or \
                any(not 0 <= b < L for b in sel.removed) or \
                tuple(sorted(set(range(L)) - set(sel.removed))) != sel.kept or runs_of(sel.removed) != sel.runs:
            raise MiPrunError(f"selection file {src} is inconsistent (removed {list(sel.removed)} of "
                              f"{L} blocks). Fix: write it again with `mi-prun select --out`.")
        return sel

    def check_model(self, model: Any, force: bool = False, where: str = "the selection") -> None:
        """Refuse to apply this selection to a model other than the one its analysis was made on
        (`mi_prun.results.check_same_model`; `force=True` accepts another model with the same
        block count)."""
        from mi_prun.results import check_same_model

        check_same_model(self.provenance.get("model"), self.n_blocks, model, force=force, where=where)


SELECTION_FORMAT = "mi-prun-selection"


SELECTION_FORMAT_VERSION = 1


def _int(value: Any, name: str) -> int:
    """A whole number as JSON writes one (an int, not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{name}' must hold whole numbers, got {value!r}")
    return value


def _num(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{name}' must be a number, got {value!r}")
    return float(value)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be text, got {value!r}")
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"'{name}' must be a list, got {type(value).__name__}")
    return value


def _blocks(value: Any, name: str) -> tuple[int, ...]:
    return tuple(_int(b, name) for b in _list(value, name))


def _opt_float(value: Any) -> float | None:
    return None if value is None else _num(value, "nll")


def _read(path: Path, quiet: bool = False) -> dict[str, Any] | None:
    try:
        record = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if quiet:
            return None
        raise MiPrunError(f"selection file {path} cannot be read ({type(exc).__name__}). Fix: write it "
                          "again with `mi-prun select --out`.") from exc
    if not isinstance(record, dict) or record.get("format") != SELECTION_FORMAT:
        if quiet:
            return None
        raise MiPrunError(f"{path} is not a mi-prun selection file. Fix: give a file written by "
                          "`mi-prun select --out`.")
    return record


def make_selection(method: str, n: int, L: int, removed: Iterable[int], objective: float,
                   run_cost: str, seconds: float, *, forward_passes: int = 0, span_lookups: int = 0,
                   ratio: float | None = None, trajectory: list[dict[str, Any]] | None = None,
                   options: dict[str, Any] | None = None,
                   provenance: dict[str, Any] | None = None) -> Selection:
    """A checked `Selection`: `removed` sorted, kept and runs derived, extras made JSON-safe.

    Raises AssertionError when `removed` is not n distinct blocks of 0..L-1 (a selector bug).
    """
    rem = tuple(sorted(int(b) for b in removed))
    if len(set(rem)) != n or any(b < 0 or b >= L for b in rem):
        # A selector bug, not a user problem: fail loudly.
        raise AssertionError(f"{method} returned {rem}, expected {n} distinct blocks in 0..{L - 1}")
    gone = set(rem)
    kept = tuple(b for b in range(L) if b not in gone)
    return Selection(method=method, n=n, n_blocks=L, removed=rem, kept=kept, runs=runs_of(rem),
                     objective=float(objective), run_cost=run_cost, seconds=float(seconds),
                     forward_passes=int(forward_passes), span_lookups=int(span_lookups),
                     ratio=None if ratio is None else float(ratio),
                     trajectory=jsonable(trajectory or []), options=jsonable(options or {}),
                     provenance=jsonable(provenance or {}))

