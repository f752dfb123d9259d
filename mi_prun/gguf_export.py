"""Write a pruned model as a GGUF file that llama.cpp runs, with the source's quantisation untouched.

mi-prun reads a GGUF by dequantising it to float32; writing that back as a GGUF would lose the
file's quantisation (and quadruple a 4-bit model). Instead the pruned GGUF is made from the source
file itself:

- the kept blocks' tensors are copied byte for byte in their original quantisation, renumbered
  `blk.0..`, and the removed blocks' tensors are left out; every tensor outside the blocks
  (embeddings, final norm, output head) is copied unchanged;
- `<arch>.block_count` is the number of kept blocks, and every per-layer array under `<arch>.` (an
  array as long as the source's block count, such as a per-layer `head_count_kv`) is cut to the
  kept blocks; every other key, the tokenizer included, is copied unchanged;
- a healed model's folded tensors (the output projection, or Gemma's post-MLP norm, of the block
  before each bridged run: see `mi_prun.heal`) are the only tensors that are not copied: they are
  written in a precision that keeps the fold (`FOLD_TYPES`; F16 by default, see benchmarks/RESULTS.md);
- three short keys record what was done: `mi_prun.version`, `mi_prun.source_block_count`,
  `mi_prun.removed_blocks` (and `mi_prun.healed_tensors` when a bridge was folded).

`mi_prun.export.export(..., config=ExportConfig(format="gguf"))` calls `write_gguf_export` inside
its atomic folder writer (`mi_prun.files.write_folder`), so the folder holds `model.gguf` beside the
same `mi_prun.json` a safetensors export has, and an interrupted or failed write leaves nothing.

Only architectures whose GGUF layout is known (`LAYOUTS`) are written. Gemma 2 and 3 have no
per-block attention type in a GGUF: llama.cpp and transformers make every 2nd / 6th block global by
its position, so a removal that moves a global block to a sliding-window position is refused.

Blocks are numbered from 0 everywhere.
"""

from __future__ import annotations

import logging
import os
import re
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from mi_prun.config import GGUF_FOLD_TYPES
from mi_prun.errors import MiPrunError
from mi_prun.heal import Healing
from mi_prun.models.blocks import find_blocks
from mi_prun.models.zoo import ZOO, cache_dir

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"  # the file's name inside an export folder
FOLD_TYPES = GGUF_FOLD_TYPES  # precisions a folded (healed) 2-D tensor can be written in
_FOLD_GGML = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
              "q8_0": GGMLQuantizationType.Q8_0}
CONVERT_HINT = ("export it as safetensors (--format safetensors) and convert that folder with llama.cpp's "
                "convert_hf_to_gguf.py (python convert_hf_to_gguf.py OUT --outfile pruned.gguf), then quantise "
                "it with llama-quantize if you want")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFLayout:
    """What mi-prun knows of one GGUF architecture (`general.architecture`).

    `attention_period`: llama.cpp and transformers derive a block's attention type from its position
    (global when `position % period == period - 1`, sliding-window otherwise), not from the file;
    None where every block attends alike. `norm_offset`: the file stores a norm weight w as
    `norm_offset + w` (Gemma computes x * (1 + w)); it applies to a folded norm.
    """

    arch: str
    attention_period: int | None = None
    norm_offset: float = 0.0


LAYOUTS: dict[str, GGUFLayout] = {layout.arch: layout for layout in (
    GGUFLayout("llama"),  # Llama 1-3, SmolLM, Mistral (llama.cpp writes Mistral as llama)
    GGUFLayout("qwen2"),
    GGUFLayout("qwen3"),
    GGUFLayout("phi3"),
    GGUFLayout("gemma", norm_offset=1.0),
    GGUFLayout("gemma2", attention_period=2, norm_offset=1.0),
    GGUFLayout("gemma3", attention_period=6, norm_offset=1.0),
)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200].rstrip(".")


@dataclass
class GGUFSource:
    """A source GGUF file, read and checked: its reader, architecture, layout and block count."""

    path: Path
    reader: GGUFReader
    arch: str
    layout: GGUFLayout
    n_blocks: int
    block_bytes: int  # bytes of all `blk.N.*` tensors
    other_bytes: int  # bytes of every other tensor

    def field(self, key: str) -> Any:
        f = self.reader.get_field(key)
        return f.contents() if f is not None else None

    def tensor(self, name: str) -> Any:
        for t in self.reader.tensors:
            if t.name == name:
                return t
        return None


def read_source(path: str | os.PathLike) -> GGUFSource:
    """Open and check a GGUF file for pruning; `MiPrunError` (one line, with the fix) for a file that
    cannot be read or is truncated, a split file, an architecture whose layout mi-prun does not know,
    and block tensors not named `blk.N.*` or not covering blocks 0..block_count-1."""
    path = Path(path)
    fix_damaged = "Fix: the file may be truncated or corrupt; download it again."
    if not path.is_file():
        raise MiPrunError(f"GGUF file not found: {path}. Fix: give the path of an existing .gguf file.")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails on damaged bytes with whatever error they provoke
        raise MiPrunError(f"cannot read the GGUF file {path}: {_one_line(exc)}. {fix_damaged}") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise MiPrunError(f"the GGUF file {path} is truncated: tensor {t.name} ends at byte "
                              f"{t.data_offset + t.n_bytes} of a {size}-byte file. {fix_damaged}")
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if not isinstance(arch, str):
        raise MiPrunError(f"the GGUF file {path} names no architecture (general.architecture). {fix_damaged}")
    split = reader.get_field("split.count")
    if split is not None and int(split.contents()) > 1:
        raise MiPrunError(f"{path} is one part of a split GGUF ({split.contents()} parts). Fix: merge the parts "
                          "first (llama-gguf-split --merge FIRST-PART merged.gguf) and prune the merged file.")
    layout = LAYOUTS.get(arch)
    if layout is None:
        raise MiPrunError(f"mi-prun does not know the GGUF layout of architecture {arch!r} (it writes "
                          f"{', '.join(sorted(LAYOUTS))}). Fix: {CONVERT_HINT}.")
    count = reader.get_field(f"{arch}.block_count")
    if count is None:
        raise MiPrunError(f"the GGUF file {path} has no {arch}.block_count. {fix_damaged}")
    n_blocks = int(count.contents())
    seen: set[int] = set()
    block_bytes = other_bytes = 0
    for t in reader.tensors:
        match = _BLOCK_TENSOR.match(t.name)
        if match:
            b = int(match.group(1))
            if b >= n_blocks:
                raise MiPrunError(f"the GGUF file {path} has tensor {t.name} but {arch}.block_count is {n_blocks}. "
                                  f"{fix_damaged}")
            seen.add(b)
            block_bytes += int(t.n_bytes)
        elif t.name.startswith("blk"):
            raise MiPrunError(f"the GGUF file {path} has a tensor named {t.name!r}, not blk.N.<name>, so its blocks "
                              f"cannot be told apart. Fix: {CONVERT_HINT}.")
        else:
            other_bytes += int(t.n_bytes)
    if seen != set(range(n_blocks)):
        missing = sorted(set(range(n_blocks)) - seen)
        raise MiPrunError(f"the GGUF file {path} says {n_blocks} blocks but has no tensors named blk.N.* for "
                          f"block{'s' if len(missing) > 1 else ''} {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                          f"so its blocks cannot be told apart. Fix: {CONVERT_HINT}.")
    return GGUFSource(path=path, reader=reader, arch=arch, layout=layout, n_blocks=n_blocks,
                      block_bytes=block_bytes, other_bytes=other_bytes)


def check_kept(source: GGUFSource, kept: Sequence[int]) -> None:
    """Refuse a removal that the GGUF cannot express: a block moved to a position where llama.cpp and
    transformers give it another attention type (Gemma 2 and 3)."""
    period = source.layout.attention_period
    if not period:
        return
    for position, block in enumerate(kept):
        was_global, is_global = block % period == period - 1, position % period == period - 1
        if was_global != is_global:
            kinds = ("global", "sliding-window")
            raise MiPrunError(
                f"{source.arch} GGUF files have no per-block attention type: llama.cpp and transformers make every "
                f"{period}{'nd' if period == 2 else 'th'} block global by its position, and this removal moves "
                f"{kinds[not was_global]} block {block} to position {position}, where it would run as "
                f"{kinds[not is_global]}. Fix: remove whole runs of {period} consecutive blocks, or export as "
                "safetensors (--format safetensors).")


def gguf_source_of(loaded: Any) -> Path | None:
    """The GGUF file a `LoadedModel` was read from: a `.gguf` given by path, or the built-in model's
    GGUF in the mi-prun cache; None for any other model."""
    if loaded is None:
        return None
    info = getattr(loaded, "info", None) or {}
    if info.get("gguf"):
        return Path(info["gguf"])
    spec = str(getattr(loaded, "spec", "") or "")
    if spec.lower().endswith(".gguf"):
        return Path(getattr(loaded, "source", ".")) / Path(spec).name
    zoo = info.get("zoo")
    if zoo in ZOO:
        return cache_dir() / "gguf" / zoo / Path(ZOO[zoo].gguf_member).name
    return None


def check_gguf_spec(spec: str | os.PathLike) -> None:
    """Before any work: refuse `--format gguf` for a model that did not come from a GGUF file (saying
    how to convert the export instead) and a GGUF whose layout mi-prun cannot write."""
    text = os.fspath(spec)
    if text in ZOO:
        return  # the built-in model's GGUF is extracted with the model
    if not text.lower().endswith(".gguf"):
        raise MiPrunError(f"--format gguf copies the blocks of the GGUF file the model was read from, and {text} "
                          f"is not a GGUF file. Fix: {CONVERT_HINT}.")
    read_source(text)


# ----------------------------------------------------------------------------------------------
# folded (healed) tensors


@dataclass(frozen=True)
class FoldedTensor:
    """A tensor of the pruned GGUF that is not copied: a healed fold site, in its new precision."""

    name: str  # GGUF name in the pruned numbering, e.g. blk.11.ffn_down.weight
    source_name: str  # the same tensor in the source numbering
    data: np.ndarray  # float32 / float16 values, or Q8_0 bytes
    ggml_type: GGMLQuantizationType
    source_type: str


def _gguf_name(source: GGUFSource, hf_name: str) -> str:
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[source.arch]
    name = gguf.get_tensor_name_map(arch_enum, source.n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise MiPrunError(f"mi-prun does not know the GGUF name of {hf_name} in a {source.arch} file, so the "
                          f"healed weight cannot be written. Fix: {CONVERT_HINT}.")
    return name


def _encode(values: np.ndarray, fold_type: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`values` (float32) in `fold_type`; a 1-D tensor (a norm) stays F32, as llama.cpp expects, and a
    row length Q8_0 cannot block (not a multiple of 32) falls back to F16."""
    if values.ndim == 1 or fold_type == "f32":
        return values.astype(np.float32), GGMLQuantizationType.F32
    if fold_type == "q8_0" and values.shape[-1] % 32 == 0:
        return gguf.quants.quantize(values.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return values.astype(np.float16), GGMLQuantizationType.F16


def decode(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Float32 values of a tensor as stored in a GGUF (its numpy shape: rows first)."""
    return np.asarray(gguf.quants.dequantize(np.asarray(data), ggml_type), dtype=np.float32)


def folded_tensors(source: GGUFSource, original: nn.Module, healed: nn.Module, healing: Healing | Mapping[str, Any],
                   kept: Sequence[int], fold_type: str) -> list[FoldedTensor]:
    """The healed fold sites of `healed` (the model `mi_prun.heal.heal` returned from `original`) as
    GGUF tensors in `fold_type`.

    Before anything is written, each site's tensor in the *original* model is checked against the
    source file's dequantised tensor of the same name (after the layout's norm offset): a mismatch
    means the file is not the one the model was read from, or mi-prun maps the name wrongly, and is
    refused rather than written.
    """
    if fold_type not in FOLD_TYPES:
        raise MiPrunError(f"gguf_fold_type must be one of {', '.join(FOLD_TYPES)}, got {fold_type!r}.")
    record = healing.to_dict() if hasattr(healing, "to_dict") else dict(healing)
    block_path = find_blocks(original).path
    out: list[FoldedTensor] = []
    for run in record.get("runs", []):
        if not run.get("kept", True):
            continue  # the check left this run unbridged: its tensor is the source's, copied
        new_index = kept.index(run["fold_block"])
        suffix = run["module"].split(f"{block_path}.{new_index}.", 1)[-1]
        healed_module = healed.get_submodule(run["module"])
        original_module = original.get_submodule(f"{block_path}.{run['fold_block']}.{suffix}")
        offset = source.layout.norm_offset if run.get("kind") == "norm" else 0.0
        for param in ("weight", "bias"):
            value = getattr(healed_module, param, None)
            if not isinstance(value, torch.Tensor):
                continue
            hf_name = f"{block_path}.{run['fold_block']}.{suffix}.{param}"
            src_name = _gguf_name(source, hf_name)
            src = source.tensor(src_name)
            if src is None:
                raise MiPrunError(f"the GGUF file {source.path} has no tensor {src_name} for {hf_name}, so the healed "
                                  f"weight cannot be written. Fix: {CONVERT_HINT}.")
            before = getattr(original_module, param).detach().float().cpu().numpy() + offset
            stored = decode(src.data, src.tensor_type).reshape(before.shape) if src.n_elements == before.size else None
            if stored is None or not np.allclose(stored, before, rtol=1e-5, atol=1e-6):
                raise MiPrunError(f"the tensor {src_name} of {source.path} does not hold the model's {hf_name}: the "
                                  "file is not the one the model was read from. Fix: export the model loaded from "
                                  f"this file, or {CONVERT_HINT}.")
            values = value.detach().float().cpu().numpy() + offset
            data, ggml_type = _encode(values, fold_type)
            new_name = re.sub(r"^blk\.\d+\.", f"blk.{new_index}.", src_name)
            out.append(FoldedTensor(name=new_name, source_name=src_name, data=data, ggml_type=ggml_type,
                                    source_type=src.tensor_type.name))
    return out


# ----------------------------------------------------------------------------------------------
# writing


@dataclass
class GGUFWritten:
    """What `write_pruned_gguf` wrote, for `mi_prun.json`."""

    source: str
    source_bytes: int
    bytes: int
    source_block_bytes: int
    block_bytes: int
    other_bytes: int
    n_tensors: int
    copied_tensors: int
    trimmed_keys: list[str]
    folded: list[dict[str, str]] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _copy_field(writer: GGUFWriter, key: str, f: Any, kept: Sequence[int] | None) -> None:
    """Copy one metadata field; `kept`: cut an array to these indices (a per-layer array)."""
    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if len(f.types) > 2:
            raise MiPrunError(f"the GGUF key {key} is an array of arrays, which mi-prun cannot copy. "
                              f"Fix: {CONVERT_HINT}.")
        values = f.contents()
        if kept is not None:
            values = [values[i] for i in kept]
        writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=sub)
    else:
        writer.add_key_value(key, f.contents(), main)


def write_pruned_gguf(source: GGUFSource, dest: str | os.PathLike, kept: Sequence[int], *,
                      folded: Sequence[FoldedTensor] = (), provenance: Mapping[str, Any] | None = None) -> GGUFWritten:
    """Write `source` without the blocks not in `kept` (original numbering, from 0) to `dest`.

    Kept blocks' tensors are copied byte for byte and renumbered; `folded` tensors replace the
    source's tensor of the same (pruned-numbering) name. `provenance`: extra `mi_prun.*` keys
    (strings, ints or lists of them). Not atomic on its own: `write_gguf_export` runs it inside
    `mi_prun.files.write_folder`.
    """
    kept = [int(b) for b in kept]
    if not kept or sorted(set(kept)) != kept or kept[-1] >= source.n_blocks:
        raise MiPrunError(f"kept blocks {kept} are not increasing block numbers below {source.n_blocks}.")
    check_kept(source, kept)
    reader, arch = source.reader, source.arch
    new_index = {old: new for new, old in enumerate(kept)}
    replaced = {t.name: t for t in folded}
    writer = GGUFWriter(os.fspath(dest), arch)
    if reader.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        writer.data_alignment = reader.alignment
    trimmed: list[str] = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not f.types:
            continue  # the header's counts and the architecture: the writer writes its own
        if key == f"{arch}.block_count":
            writer.add_key_value(key, len(kept), f.types[0])
            continue
        per_layer = (key.startswith(f"{arch}.") and f.types[0] == GGUFValueType.ARRAY
                     and len(f.data) == source.n_blocks)
        if per_layer:
            trimmed.append(key)
        _copy_field(writer, key, f, kept if per_layer else None)
    writer.add_string("mi_prun.version", _version())
    writer.add_uint32("mi_prun.source_block_count", source.n_blocks)
    removed = [b for b in range(source.n_blocks) if b not in new_index]
    if removed:
        writer.add_array("mi_prun.removed_blocks", removed)
    if folded:
        writer.add_array("mi_prun.healed_tensors", [t.name for t in folded])
    for key, value in (provenance or {}).items():
        if isinstance(value, str):
            writer.add_string(f"mi_prun.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"mi_prun.{key}", value)
        elif isinstance(value, (list, tuple)) and value:
            writer.add_array(f"mi_prun.{key}", list(value))
    block_bytes = other_bytes = copied = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        match = _BLOCK_TENSOR.match(t.name)
        if match:
            old = int(match.group(1))
            if old not in new_index:
                continue
            name = f"blk.{new_index[old]}.{match.group(2)}"
        else:
            name = t.name
        if name in replaced:
            ft = replaced.pop(name)
            writer.add_tensor(name, ft.data, raw_dtype=ft.ggml_type)
            nbytes, ggml_type = int(ft.data.nbytes), ft.ggml_type
        else:
            writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)  # the file's bytes, as they are
            nbytes, ggml_type = int(t.n_bytes), t.tensor_type
            copied += 1
        types[ggml_type.name] = types.get(ggml_type.name, 0) + 1
        if match:
            block_bytes += nbytes
        else:
            other_bytes += nbytes
    if replaced:
        raise MiPrunError(f"internal: healed tensors {sorted(replaced)} have no place in the pruned GGUF.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dest = Path(dest)
    return GGUFWritten(source=str(source.path), source_bytes=source.path.stat().st_size, bytes=dest.stat().st_size,
                       source_block_bytes=source.block_bytes, block_bytes=block_bytes, other_bytes=other_bytes,
                       n_tensors=sum(types.values()), copied_tensors=copied, trimmed_keys=trimmed,
                       folded=[{"tensor": t.name, "source_tensor": t.source_name, "source_type": t.source_type,
                                "type": t.ggml_type.name} for t in folded],
                       tensor_types=types)


def _version() -> str:
    try:
        return version("mi-prun")
    except PackageNotFoundError:  # not installed as a distribution (a source checkout)
        return "unknown"


def write_gguf_export(tmp: Path, loaded: Any, pruned: nn.Module, kept: Sequence[int], healing: Any,
                      fold_type: str, source: GGUFSource | None = None) -> dict[str, Any]:
    """Write `GGUF_FILE` into the temporary export folder `tmp` (see `mi_prun.export.export`) and
    return its record for `mi_prun.json`. `source`: the file as `check_gguf_export` read it (read
    again when not given: reading a large vocabulary's metadata takes seconds)."""
    source = source if source is not None else check_gguf_export(loaded, kept)
    folded: list[FoldedTensor] = []
    if healing is not None:
        folded = folded_tensors(source, loaded.model, pruned, healing, kept, fold_type)
    written = write_pruned_gguf(source, tmp / GGUF_FILE, kept, folded=folded)
    log.info("wrote %s: %d of %d blocks, %d tensors copied as they were, %d healed", GGUF_FILE, len(kept),
             source.n_blocks, written.copied_tensors, len(folded))
    return {"file": GGUF_FILE, "fold_type": fold_type if folded else None, **written.to_dict()}


def check_gguf_export(loaded: Any, kept: Sequence[int]) -> GGUFSource:
    """The refusals of a GGUF export that need no writing, for a command to run before slow work;
    returns the source file, read and checked."""
    path = gguf_source_of(loaded)
    if path is None:
        raise MiPrunError(f"--format gguf copies the blocks of the GGUF file the model was read from, and "
                          f"{getattr(loaded, 'spec', 'this model')} did not come from one. Fix: {CONVERT_HINT}.")
    if not path.is_file():
        raise MiPrunError(f"the GGUF file the model was read from, {path}, is gone. Fix: put it back (for the "
                          "built-in model: delete its folder under the mi-prun cache and load it again).")
    source = read_source(path)
    check_kept(source, kept)
    return source


__all__ = ["CONVERT_HINT", "FOLD_TYPES", "GGUF_FILE", "LAYOUTS", "FoldedTensor", "GGUFLayout", "GGUFSource",
           "GGUFWritten", "check_gguf_export", "check_gguf_spec", "check_kept", "decode", "folded_tensors",
           "gguf_source_of", "read_source", "write_gguf_export", "write_pruned_gguf"]
