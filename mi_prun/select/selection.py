"""The result of a selection: `Selection` (which blocks, how chosen, at what cost), its JSON form,
and `make_selection`, which every selector's answer goes through so that results are checked and
serialisable alike.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from mi_prun.config import as_path
from mi_prun.errors import MiPrunError
from mi_prun.files import check_path_length, jsonable, parse_json, write_file
from mi_prun.runtime.identity import check_same_model
from mi_prun.select.costs import runs_of


@dataclass(frozen=True)
class ScoredSet:
    """One set the verified search scored (`Selection.candidates`), in the order it was scored.

    removed: the removed blocks, sorted. proposers: who proposed it, the first counts ("fbs",
        "exact:neg-mi#2", "exchange:fbs", "put-back:7", "swap:fbs", ...). objective: its MI
        objective (NaN when none). nll: its verification NLL (nats per token; NaN for a broken
        pass). cached: it cost no new forward work. stage: "candidate", "exchange", "exchange (put
        back)" or "swap".
    A raced search (`mi_prun.select.race`) also records `complete` (False: dropped after `samples`
        of the verification samples, `nll` then being the paired estimate of its full NLL) and the
        token-block `units` it was charged; unraced rows leave them at True / None / None and
        write the same JSON as before racing existed.
    """

    removed: tuple[int, ...]
    proposers: tuple[str, ...]
    objective: float
    nll: float
    cached: bool
    stage: str
    complete: bool = True
    samples: int | None = None
    units: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"removed": list(self.removed), "proposers": list(self.proposers),
                               "objective": self.objective, "nll": self.nll, "cached": self.cached,
                               "stage": self.stage}
        if not self.complete or self.samples is not None or self.units is not None:
            out.update(complete=self.complete, samples=self.samples, units=self.units)
        return jsonable(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScoredSet":
        """Inverse of `to_dict`; reads every saved selection's rows (None for a NaN)."""
        objective, nll = d.get("objective"), d.get("nll")
        return cls(removed=tuple(_whole(b) for b in d["removed"]), proposers=tuple(_str(p) for p in d.get("proposers") or ()),
                   objective=math.nan if objective is None else _num(objective),
                   nll=math.nan if nll is None else _num(nll), cached=bool(d.get("cached", False)),
                   stage=_str(d.get("stage", "candidate")), complete=bool(d.get("complete", True)),
                   samples=None if d.get("samples") is None else _whole(d["samples"]),
                   units=None if d.get("units") is None else _whole(d["units"]))


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
        scored set (`ScoredSet`),
        `winner_source` the criterion that proposed the winner, `one_pass_removed` /
        `one_pass_nll` the one-pass answer and its NLL, and `verification` the budget, passes,
        dense NLL and tokens. Unverified selections may carry `verification["note"]` saying why.
    """

    method: str
    n_blocks: int
    removed: tuple[int, ...]
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
    candidates: list[ScoredSet] = field(default_factory=list)
    winner_source: str | None = None
    one_pass_removed: tuple[int, ...] | None = None
    one_pass_nll: float | None = None
    verification: dict[str, Any] = field(default_factory=dict)

    # Derived from `removed` (written to JSON for readers, checked against it on load).
    @property
    def n(self) -> int:
        return len(self.removed)

    @property
    def kept(self) -> tuple[int, ...]:
        gone = set(self.removed)
        return tuple(b for b in range(self.n_blocks) if b not in gone)

    @property
    def runs(self) -> list[tuple[int, int]]:
        return runs_of(self.removed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; non-finite floats become None (strict JSON has no NaN). Holds every
        field, and the derived n, kept and runs."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(n=self.n, kept=self.kept, runs=self.runs)
        return jsonable(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """Inverse of `to_dict` (the derived n, kept and runs are checked by `load`)."""
        if "removed" in d and not isinstance(d["removed"], (list, tuple)):
            raise MiPrunError(f"not a saved selection: 'removed' must be a list of block numbers (from 0), got "
                              f"{json.dumps(d['removed']) if d['removed'] is None else type(d['removed']).__name__}. "
                              "Fix: write it again with `mi-prun select --out`.")
        try:
            objective = d["objective"]
            one = d.get("one_pass_removed")
            return cls(
                method=_str(d["method"]), n_blocks=_whole(d["n_blocks"]),
                removed=tuple(_whole(b) for b in d["removed"]),
                objective=math.nan if objective is None else _num(objective),
                run_cost=_str(d["run_cost"]), seconds=_num(d["seconds"]),
                forward_passes=_whole(d.get("forward_passes", 0)),
                span_lookups=_whole(d.get("span_lookups", 0)),
                ratio=None if d.get("ratio") is None else _num(d["ratio"]),
                trajectory=list(d.get("trajectory", [])), options=dict(d.get("options", {})),
                provenance=dict(d.get("provenance") or {}),
                verified=bool(d.get("verified", False)), nll=_opt_float(d.get("nll")),
                candidates=[ScoredSet.from_dict(c) for c in d.get("candidates") or []], winner_source=d.get("winner_source"),
                one_pass_removed=None if one is None else tuple(_whole(b) for b in one),
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
        """Write the selection as a JSON file (atomically, `mi_prun.files.write_file`); an existing
        file is replaced only with `overwrite` and only if it is an earlier selection file."""
        record = {"format": SELECTION_FORMAT, "format_version": SELECTION_FORMAT_VERSION, **self.to_dict()}
        return write_file(as_path(path, "selection file"), "selection", record, overwrite=overwrite,
                          is_ours=lambda p: _read(p, quiet=True) is not None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Selection":
        """Read a selection file written by `save` (or `mi-prun select --out`), checked."""
        src = Path(as_path(path, "selection file"))
        check_path_length(src, "selection file")
        if not src.is_file():
            raise MiPrunError(f"selection file {src} not found. Fix: give a file written by "
                              "`mi-prun select --out`.")
        record = _read(src)
        assert record is not None
        try:
            sel = cls.from_dict(record)
        except MiPrunError as exc:
            raise MiPrunError(f"selection file {src}: {exc}") from exc
        L = sel.n_blocks
        derived = {"n": sel.n, "kept": list(sel.kept), "runs": [list(r) for r in sel.runs]}
        fix = "Fix: write it again with `mi-prun select --out`."
        if L < 1:
            raise MiPrunError(f"selection file {src}: n_blocks is {L}; a model has at least one block. {fix}")
        if sel.n == 0:
            raise MiPrunError(f"selection file {src} removes no block (removed: []), so there is nothing to prune. "
                              "Fix: select at least one block (mi-prun select --n 1 or more).")
        out_of_range = sorted({b for b in sel.removed if not 0 <= b < L})
        if out_of_range:
            raise MiPrunError(f"selection file {src}: block(s) {out_of_range} out of range for {L} blocks (numbered "
                              f"from 0 to {L - 1}). {fix}")
        if len(set(sel.removed)) != sel.n:
            twice = sorted({b for b in sel.removed if sel.removed.count(b) > 1})
            raise MiPrunError(f"selection file {src} names block(s) {twice} more than once. {fix}")
        if sel.n >= L:
            raise MiPrunError(f"selection file {src} removes all {L} blocks; a model needs at least one. Fix: "
                              "select fewer blocks (mi-prun select --n with n < the block count).")
        wrong = [key for key, value in derived.items() if key in record and record[key] != value]
        if wrong:
            raise MiPrunError(f"selection file {src} is inconsistent: {', '.join(wrong)} disagree(s) with removed "
                              f"{list(sel.removed)} of {L} blocks. {fix}")
        return sel

    def check_model(self, model: Any, force: bool = False, where: str = "the selection") -> None:
        """Refuse to apply this selection to a model other than the one its analysis was made on
        (`force=True` accepts another model with the same block count)."""
        model_meta = self.provenance.get("model")
        check_same_model(model_meta if isinstance(model_meta, dict) else None, self.n_blocks, model,
                         force=force, where=where, what="selection")


SELECTION_FORMAT = "mi-prun-selection"
SELECTION_FORMAT_VERSION = 1


def _whole(value: Any) -> int:
    """A whole number from JSON: an int (not a bool, not 2.7)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def _num(value: Any) -> float:
    """A number from JSON (not a bool, not a string that looks like one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def _opt_float(value: Any) -> float | None:
    return None if value is None else _num(value)


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
    version = record.get("format_version")
    if version != SELECTION_FORMAT_VERSION or isinstance(version, bool):  # true == 1 in Python
        if quiet:
            return None
        raise MiPrunError(f"selection file {path} has format_version {record.get('format_version')!r}; this "
                          f"mi-prun reads format_version {SELECTION_FORMAT_VERSION}. Fix: write it again with "
                          "`mi-prun select --out` (or use the mi-prun version that wrote it).")
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
    return Selection(method=method, n_blocks=L, removed=rem,
                     objective=float(objective), run_cost=run_cost, seconds=float(seconds),
                     forward_passes=int(forward_passes), span_lookups=int(span_lookups),
                     ratio=None if ratio is None else float(ratio),
                     trajectory=jsonable(trajectory or []), options=jsonable(options or {}),
                     provenance=jsonable(provenance or {}))

