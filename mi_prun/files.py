"""Output folders that never lose a user's files, and plain JSON from nested results.

Every folder mi-prun writes (a saved analysis, an exported model, the built-in model cache) goes
through `write_folder`: the content is written into a hidden temporary sibling, and only when it is
complete is it moved into place, under an exclusive lock on the parent folder, so

- an interrupted write never leaves a folder that looks complete;
- of two processes writing the same new folder exactly one wins, the other gets a clear error;
- `overwrite=True` replaces only an earlier mi-prun output of the same kind (it carries a marker
  file: `analysis.json` for an analysis, `mi_prun.json` for an export), and never a folder that
  holds anything else, the current folder, or an input of the same command (or a folder that
  contains one); the previous output is removed only after the new one is in place.

`check_output` runs the same checks up front, so a command refuses a bad `--out` before the slow
work, not after it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mi_prun.errors import MiPrunError

try:  # POSIX: an advisory lock on the parent folder serialises the final step
    import fcntl
except ImportError:  # pragma: no cover - Windows: renames are still atomic, only the lock is missing
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class OutputKind:
    """One kind of mi-prun output folder: its marker file, the marker's `format` value, and the
    files an earlier output of this kind may hold (glob patterns)."""

    name: str  # "analysis", "export", ...
    marker: str
    format: str
    files: tuple[str, ...]
    what: str  # for messages: "analysis", "pruned model"


ANALYSIS = OutputKind("analysis", "analysis.json", "mi-prun-analysis", ("analysis.json", "arrays.npz"),
                      "analysis")
EXPORT = OutputKind("export", "mi_prun.json", "mi-prun-pruned-model",
                    ("mi_prun.json", "mergekit.yaml", "config.json", "generation_config.json",
                     "model*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.*",
                     "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
                     "spiece.model", "README.md", "model.gguf"),
                    "pruned model")


# ---------------------------------------------------------------------------------------- JSON

MAX_JSON_DEPTH = 64  # mi-prun's own files nest under 10 levels; deeper is damage, not data


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, but nesting deeper than `MAX_JSON_DEPTH` (which would be a RecursionError in
    the decoder or in whatever walks the result) is a `json.JSONDecodeError` like any other
    malformed JSON, so every reader's one-line message for a damaged file covers it. The one JSON
    reader of mi-prun's files and inputs."""
    try:
        obj = json.loads(text)
    except RecursionError:
        obj = None
    else:
        stack = [(obj, 1)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, (dict, list)):
                if depth > MAX_JSON_DEPTH:
                    break
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        else:
            return obj
    doc = text if isinstance(text, str) else text.decode("utf-8", "replace")
    raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", doc[:1], 0)


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars and arrays, tuples, paths, sets, dtypes, objects with
    `to_dict()` and nested containers. Non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict())
    return str(obj)


def dump_json(obj: Any, path: Path) -> None:
    """Write `obj` as indented, strict JSON (no NaN tokens) and flush it to disk."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_marker(folder: Path, kind: OutputKind) -> dict[str, Any] | None:
    """The parsed marker of an earlier output of `kind` in `folder`, or None if it is not one."""
    try:
        meta = json.loads((folder / kind.marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == kind.format else None


# ---------------------------------------------------------------------------------------- checks

def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _foreign_files(folder: Path, kind: OutputKind, marker: dict[str, Any]) -> list[str]:
    """Entries of an earlier output folder that the output did not write itself."""
    listed = marker.get("files")
    allowed = set(listed) if isinstance(listed, list) else None
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            foreign.append(name + "/")
        elif allowed is not None:
            if name not in allowed and name != kind.marker:
                foreign.append(name)
        elif not any(entry.match(p) for p in kind.files):
            foreign.append(name)
    return foreign


def check_path_length(path: str | os.PathLike, what: str) -> None:
    """Refuse a path the file system cannot hold (a name over NAME_MAX, the whole over PATH_MAX)
    before any call fails on it with ENAMETOOLONG: one line, the fix named."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return
    try:
        name_max = os.pathconf("/", "PC_NAME_MAX")
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        name_max, path_max = 255, 4096
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in text.split(os.sep)), default=0)
    size = len(text.encode("utf-8", "surrogateescape"))
    if longest > name_max or size >= path_max:
        shown = text if len(text) <= 60 else text[:40] + "..." + text[-12:]
        too = (f"has a name of {longest} bytes; the file system allows {name_max}" if longest > name_max
               else f"is {size} bytes long; the file system allows {path_max - 1}")
        raise MiPrunError(f"{what} {shown} {too}. Fix: use a shorter path.")


def check_output(out: str | os.PathLike, kind: OutputKind, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Validate an output folder before any work; return its absolute path. The checks run under
    the lock that `write_folder`'s last step takes, so a writer replacing the folder meanwhile is
    never seen half-done (`_check_output` has the checks themselves)."""
    if isinstance(out, (str, os.PathLike)) and os.fspath(out).strip():
        check_path_length(out, "the output folder")
        probe = Path(os.path.abspath(Path(os.fspath(out)).expanduser())).parent
        while not probe.is_dir() and probe != probe.parent:
            probe = probe.parent
        if os.access(probe, os.R_OK):
            with _parent_lock(probe):
                return _check_output(out, kind, overwrite, inputs)
    return _check_output(out, kind, overwrite, inputs)


def _check_output(out: str | os.PathLike, kind: OutputKind, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The checks of `check_output`, without the lock.

    Refused with `MiPrunError` (one line, with the fix): a path that is a file; a non-empty folder
    without `overwrite`; with `overwrite`, a folder that is not an earlier mi-prun output of this
    kind, that holds files the output did not write (they are named), that is the current folder,
    or that is or contains one of `inputs` (the model, the analysis); a parent that cannot be
    created or written.
    """
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise MiPrunError(f"the output folder must be a path, got {out!r}. Fix: give a folder name.")
    target = Path(os.path.abspath(Path(os.fspath(out)).expanduser()))
    if target.exists() and not target.is_dir():
        raise MiPrunError(f"output {target} is a file, not a folder. Fix: give a folder path.")
    resolved = target.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(os.path.abspath(Path(os.fspath(item)).expanduser()))
        if not src.exists():
            continue
        src = src.resolve()
        if src == resolved or _is_within(src, resolved):
            raise MiPrunError(f"output {target} {'is' if src == resolved else 'contains'} the input "
                              f"{src}; writing there would destroy it. Fix: choose another output folder.")
    cwd = Path.cwd().resolve()
    if resolved == cwd or _is_within(cwd, resolved):
        raise MiPrunError(f"output {target} is the current folder or contains it. Fix: give a new "
                          "subfolder as the output, e.g. ./out.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise MiPrunError(f"{target} exists and is not empty. Fix: choose another folder, or pass "
                              f"--overwrite (overwrite=True) to replace an earlier mi-prun {kind.what} there.")
        marker = read_marker(target, kind)
        if marker is None:
            raise MiPrunError(f"{target} is not an earlier mi-prun {kind.what} (no {kind.marker} of "
                              f"format {kind.format}); --overwrite replaces only those. Fix: choose "
                              "another folder.")
        foreign = _foreign_files(target, kind, marker)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise MiPrunError(f"{target} holds files mi-prun did not write ({shown}); --overwrite "
                              "would delete them. Fix: move them away or choose another folder.")
    parent = target.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MiPrunError(f"cannot write to {target}: {probe} is not a writable folder. "
                          "Fix: choose a writable location.")
    return target


# ---------------------------------------------------------------------------------------- writing

def write_error(target: Path, exc: BaseException, what: str) -> MiPrunError:
    """A failed write (read-only folder, full disk) as one line."""
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    hint = ("free disk space" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            else "choose a writable folder")
    return MiPrunError(f"cannot write the {what} to {target}: {reason}. Fix: {hint}; the target was "
                       "left as it was.")


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """The exclusive lock `write_folder` holds on a parent folder while it replaces an output in
    it: held, no output in `folder` is replaced, and no other holder (process or thread) runs."""
    with _parent_lock(Path(folder)):
        yield


def output_stamp(folder: str | os.PathLike, kind: OutputKind) -> str | None:
    """What tells one written output folder from another at the same path (its inode, and its
    marker's `output_id` or creation time): `write_folder` replaces a folder by renaming a new one
    into place, so the stamp changes with every replacement. None when `folder` is no such output."""
    path = Path(folder)
    marker = read_marker(path, kind) if path.is_dir() else None
    if marker is None:
        return None
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{marker.get('output_id') or marker.get('created')}"


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` (and the folder entry itself) to disk."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder(out: str | os.PathLike, kind: OutputKind, fill: Callable[[Path], Any], *,
                 overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Create the folder `out` atomically: `fill(tmp)` writes the content into a hidden temporary
    sibling (it must write `kind.marker`); then, under an exclusive lock on the parent, the checks
    of `check_output` run again and the folder is moved into place. Returns the final path.

    If `fill` raises, nothing is left behind and an existing folder is untouched. Exactly one of
    several concurrent writers of a new folder succeeds; the others get `MiPrunError`.
    """
    inputs = list(inputs)
    target = check_output(out, kind, overwrite, inputs)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # mkdir honours the umask (mkdtemp's 0700 would end up on the output)
    except OSError as exc:
        raise write_error(target, exc, kind.what) from exc
    old: Path | None = None
    try:
        try:
            fill(tmp)
            if not (tmp / kind.marker).is_file():
                raise RuntimeError(f"internal: {kind.what} written without its marker {kind.marker}")
            fsync_tree(tmp)
        except OSError as exc:
            raise write_error(target, exc, kind.what) from exc
        with _parent_lock(parent):
            _check_output(target, kind, overwrite, inputs)  # the folder may have changed meanwhile
            try:
                if target.is_dir() and any(target.iterdir()):
                    old = parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
                    target.rename(old)
                try:
                    os.rename(tmp, target)  # fails (ENOTEMPTY/EEXIST) if a folder with content is there
                except OSError as exc:
                    if old is not None and not target.exists():
                        old.rename(target)  # put the previous output back
                        old = None
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise MiPrunError(f"{target} was created by another writer meanwhile; nothing "
                                          "of it was changed. Fix: choose another folder.") from exc
                    raise
            except OSError as exc:
                raise write_error(target, exc, kind.what) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def write_file(path: str | os.PathLike, what: str, record: dict[str, Any], *, overwrite: bool = False,
               is_ours: Callable[[Path], bool]) -> Path:
    """Write `record` as JSON to the file `path` atomically (a hidden temporary sibling, then a
    rename under the parent's lock). An existing file is replaced only with `overwrite` and only
    when `is_ours(path)` says it is an earlier output of the same kind; the check runs under the
    lock, so two writers never see a half-replaced file."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise MiPrunError(f"{target} is a folder. Fix: give a file name such as {what.replace(' ', '_')}.json.")

    def refuse_existing() -> None:
        if target.exists():
            if not overwrite:
                raise MiPrunError(f"{target} exists. Fix: choose another file name or pass --overwrite.")
            if not is_ours(target):
                raise MiPrunError(f"{target} is not an earlier mi-prun {what}; --overwrite replaces only "
                                  "those. Fix: choose another file name.")

    refuse_existing()  # before any work; again under the lock below
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        dump_json(record, tmp)
        with _parent_lock(target.parent):
            refuse_existing()
            os.replace(tmp, target)
    except OSError as exc:
        raise write_error(target, exc, what) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def folder_files(folder: Path) -> list[str]:
    """Names of the plain files directly in `folder`, sorted (recorded in markers)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file())


__all__ = ["ANALYSIS", "EXPORT", "OutputKind", "check_output", "check_path_length", "dump_json", "folder_files",
           "folder_lock", "fsync_tree", "output_stamp", "jsonable", "parse_json", "read_marker", "write_error", "write_file", "write_folder"]
