"""A GGUF file given by path is dequantised once: the converted model is cached by the file's digest.

transformers reads a GGUF by dequantising every tensor (49 s for a 0.5B model on a 2-core CPU), and
did so again for every command. The first load of a `.gguf` now also writes the dequantised model
as a plain safetensors folder (`save_pretrained`, with the tokenizer), as the built-in model is
cached (`mi_prun.models.zoo.ensure_builtin`); later loads of a file with the same SHA-256, whatever
its name or folder, read that folder instead.

Where: `<cache>/gguf-models/<first 16 hex digits of the SHA-256>/`, `<cache>` being `$MI_PRUN_CACHE`
or `~/.cache/mi-prun`. Written through `mi_prun.files.write_folder` (atomic: an interrupted write
leaves no folder that looks complete). Only a float32 load is cached (the CPU default); a cache
that cannot be written costs the next command the conversion, never this command its result.
Delete the folder to convert again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.files import OutputKind, dump_json, write_folder
from mi_prun.models.zoo import cache_dir

log = logging.getLogger(__name__)

SOURCE_FILE = "mi_prun_source.json"  # the marker: which GGUF file (digest, name, size) the folder holds
GGUF_CACHE = OutputKind("gguf-cache", SOURCE_FILE, "mi-prun-gguf-cache", ("*",), "converted GGUF model")


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_folder(digest: str) -> Path:
    """Where the converted model of the GGUF file with SHA-256 `digest` is cached."""
    return cache_dir() / "gguf-models" / digest[:16]


def cached(digest: str) -> Path | None:
    """The complete cached folder for `digest`, or None."""
    folder = cache_folder(digest)
    try:
        marker = (folder / SOURCE_FILE).read_text(encoding="utf-8")
    except OSError:
        return None
    if digest not in marker or not (folder / "config.json").is_file():
        return None
    return folder


def store(path: str | os.PathLike, digest: str, model: nn.Module, tokenizer: Any) -> Path | None:
    """Cache the model just converted from the GGUF file `path` (SHA-256 `digest`); return the folder,
    or None when it was not cached (not float32, or the cache cannot be written: logged)."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        log.info("the model of %s is %s, not float32: not cached (only a float32 load is)", path, dtype)
        return None
    target = cache_folder(digest)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dump_json({"format": GGUF_CACHE.format, "sha256": digest, "gguf": os.fspath(path),
                   "bytes": Path(path).stat().st_size}, tmp / SOURCE_FILE)

    try:
        if target.exists():  # an incomplete leftover in mi-prun's own cache (a complete one is read, not stored)
            shutil.rmtree(target)
        write_folder(target, GGUF_CACHE, fill)
    except (MiPrunError, OSError) as exc:
        if cached(digest) is not None:  # another process cached the same file meanwhile
            return target
        log.warning("could not cache the converted %s in %s (%s); the next load converts it again", path, target,
                    exc)
        return None
    log.info("cached the converted %s in %s: later loads of this file read it from there", path, target)
    return target


__all__ = ["GGUF_CACHE", "cache_folder", "cached", "file_digest", "store"]
