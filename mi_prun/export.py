"""Export a pruned model.

Removing blocks from a model object (`pruned_view`, `prune`, `prune_info`, config fixing) is
`mi_prun.models.surgery`; this module writes the result to disk.

`export(...)` writes a folder that plain `transformers` loads (safetensors, config, tokenizer),
plus `mi_prun.json` (what was removed and why) and `mergekit.yaml` (a passthrough merge that
rebuilds the same model from the original). Writing is atomic. With `ExportConfig(format="gguf")`
the folder holds `model.gguf` instead, made from the GGUF file the model was read from with its
quantisation kept (`mi_prun.gguf_export`), beside the same `mi_prun.json`.

Blocks are numbered from 0 everywhere.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from mi_prun.config import ExportConfig
from mi_prun.errors import MiPrunError
from mi_prun.files import EXPORT, check_output, dump_json, folder_files, write_folder
from mi_prun.gguf_export import check_gguf_export, write_gguf_export
from mi_prun.models.accept import as_module, is_loaded
from mi_prun.heal import healing_of
from mi_prun.models.blocks import find_blocks, num_layers_of
from mi_prun.models.memory import peak_memory
from mi_prun.models.stream import is_streamed, stream_of, streamed_state_dict
from mi_prun.models.surgery import (
    PRUNE_INFO_ATTR,
    PruneInfo,
    _structural_copy,
    _validate_remove,
    prune_info,
)
from mi_prun.models.zoo import drop_quantization_marker, hub_id
from mi_prun.results import library_versions
from mi_prun.select.costs import runs_of

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# export


def mergekit_yaml(source_model: str, kept: Sequence[int], dtype: str = "float32",
                  note: str | None = None) -> str:
    """A mergekit passthrough config that rebuilds the pruned model from `source_model`.

    mergekit's `layer_range: [start, end]` is half-open (end excluded) and 0-based, like Python.
    """
    recipe = {"slices": [{"sources": [{"model": source_model, "layer_range": [int(s), int(e)]}]}
                         for s, e in runs_of(kept)],
              "merge_method": "passthrough", "dtype": dtype}
    header = ["# mi-prun: passthrough merge keeping the listed block ranges of the original model.",
              "# layer_range is [start, end): 0-based, end excluded."]
    if note:
        header.append(f"# NOTE: {note}")
    return "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _shard_bytes(size: str) -> int:
    text = size.strip().upper()
    for unit, scale in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise MiPrunError(f"max_shard_size {size!r} is not a size. Fix: write it as e.g. '5GB'.") from None


def save_streamed(model: nn.Module, folder: Path, max_shard_size: str = "5GB") -> None:
    """Write a streamed model (or a pruned / healed view of one) as safetensors shards that plain
    `from_pretrained` loads, reading one block from the store at a time. Tied tensors are written once;
    floating tensors in the model's compute dtype, as `save_pretrained` does for a loaded model."""
    stream = stream_of(model)
    dtype = stream.dtype if stream is not None else None
    limit = _shard_bytes(max_shard_size)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    seen: dict[int, str] = {}
    state = model.state_dict(keep_vars=True)
    skip = set()
    for name, t in state.items():  # tied entries (an LM head sharing the embeddings): the first name only
        if id(t) in seen:
            skip.add(name)
        else:
            seen[id(t)] = name
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = folder / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    for name, value in streamed_state_dict(model):
        if name in skip:
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.contiguous()
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > limit:
            flush()
        current[name] = value
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, (path, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update({n: final for n in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")


def _as_dict(selection: Any) -> dict[str, Any]:
    if selection is None:
        return {}
    if isinstance(selection, dict):
        return dict(selection)
    to_dict = getattr(selection, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if isinstance(out, dict):
            return dict(out)
    raise MiPrunError(f"selection must be a dict or have to_dict(), got {type(selection).__name__}.")


def _resolve_blocks(pruned: nn.Module, sel: dict[str, Any]) -> PruneInfo:
    """Removed/kept blocks from the selection and the model, checked against each other."""
    info = prune_info(pruned)
    n_now = len(find_blocks(pruned))
    if "removed" in sel and sel["removed"] is not None:
        n_blocks = sel.get("n_blocks") or (info.n_blocks if info else n_now + len(sel["removed"]))
        removed = _validate_remove(sel["removed"], int(n_blocks))
        if info is not None and (info.n_blocks, info.removed) != (int(n_blocks), removed):
            raise MiPrunError(
                f"the selection removes blocks {list(removed)} of {n_blocks}, but the model was pruned "
                f"by removing {list(info.removed)} of {info.n_blocks}. Fix: export the model made "
                "from this selection.")
        info = PruneInfo(int(n_blocks), removed, tuple(i for i in range(int(n_blocks))
                                                      if i not in removed),
                         info.block_path if info else find_blocks(pruned).path)
    if info is None:
        raise MiPrunError("cannot tell which blocks were removed: the model was not made by "
                          "mi_prun.models.prune and the selection lists no 'removed'. Fix: pass the "
                          "selection, or prune with mi_prun.models.prune().")
    if len(info.kept) != n_now:
        raise MiPrunError(f"the model has {n_now} blocks, but keeping {list(info.kept)} of "
                          f"{info.n_blocks} leaves {len(info.kept)}. Fix: export the model made "
                          "from this selection.")
    return info


def _source(loaded: Any, analysis: Any, pruned: nn.Module, source_model: str | None) -> tuple[str, str | None]:
    """The mergekit source (a hub id, never a local cache path) and a note when there is none."""
    if source_model:
        return str(source_model), None
    hub = getattr(loaded, "hub_id", None) if loaded is not None else None
    if hub is None and analysis is not None:
        hub = (getattr(analysis, "model", None) or {}).get("hub_id")
    if hub is None:

        name = getattr(pruned.config, "_name_or_path", None)
        hub = hub_id(name) if isinstance(name, str) and name else None
    if hub:
        return hub, None
    return "<original model id>", ("the original model has no known Hugging Face id: replace the "
                                   "placeholder with the id or folder of the unpruned safetensors model")


def export(
    pruned: nn.Module,
    tokenizer: Any,
    selection: Any,
    out_dir: str | os.PathLike,
    *,
    analysis: Any = None,
    loaded: Any = None,
    config: Any = None,
    overwrite: bool | None = None,
    source_model: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    healing: Any = None,
) -> Path:
    """Write `pruned` as a folder that plain transformers loads; return its path.

    Contents: `model.safetensors` (+ index when sharded), `config.json`, generation config,
    tokenizer files, `mi_prun.json` (removed and kept blocks numbered from 0, method, estimator,
    run cost, objective, calibration provenance, library versions, the files written) and
    `mergekit.yaml` (rebuilds the same model from the original's hub id with a passthrough merge).

    `selection`: a `Selection` (or its dict), or None when `pruned` came from `prune` /
    `pruned_view` (it remembers its removed blocks). Provenance is filled from `analysis` (an
    `Analysis`; else the selection's own record of it) and `loaded` (the `LoadedModel` pruned: its
    hub id is the mergekit source; `source_model` overrides it). `config`: an `ExportConfig`
    (`overwrite` overrides its field). `inputs`: paths that must survive (the model folder, the
    analysis), refused as targets. `healing`: the `mi_prun.heal.Healing` record of a healed model
    (default: the record `heal` attached to `pruned`), written to `mi_prun.json` as "healing".

    Atomic and exclusive (see `mi_prun.files.write_folder`): an interrupted export leaves no folder
    that looks complete, and `overwrite` replaces only an earlier mi-prun export. `pruned` is not
    changed: a copy sharing its tensors is saved (a GGUF-loaded model's quantisation marker is
    dropped on that copy).
    """
    cfg = config if config is not None else ExportConfig()
    if not isinstance(cfg, ExportConfig):
        raise MiPrunError(f"config must be an ExportConfig, got {type(cfg).__name__}.")
    if tokenizer is None and is_loaded(pruned):
        tokenizer = pruned.tokenizer
    pruned = as_module(pruned, "the pruned model")
    if overwrite is not None:
        cfg = replace(cfg, overwrite=overwrite)
    inputs = [*inputs, getattr(loaded, "source", None) if loaded is not None else None]
    check_output(out_dir, EXPORT, cfg.overwrite, inputs)  # before any work
    sel = _as_dict(selection)
    info = _resolve_blocks(pruned, sel)
    if loaded is not None and analysis is not None:  # never export one model's analysis on another
        analysis.check_model(loaded.model, force=cfg.force)
    elif loaded is not None and hasattr(selection, "check_model"):
        selection.check_model(loaded.model, force=cfg.force)
    provenance = sel.get("provenance") if isinstance(sel.get("provenance"), dict) else {}
    if analysis is not None:
        provenance = {"model": analysis.model, "estimator": analysis.estimator,
                      "estimator_options": analysis.estimator_options, "calibration": analysis.calibration}
    model_meta = dict(provenance.get("model") or {})
    if loaded is not None:
        model_meta = {k: v for k, v in loaded.describe().items() if k != "identity"}
    model_meta.pop("identity", None)
    source, source_note = _source(loaded, analysis, pruned, source_model)

    # Save a structural copy sharing the tensors: dropping the GGUF marker or the pruning
    # attribute must not touch the caller's model.
    to_save = _structural_copy(pruned, list(pruned.parameters()) + list(pruned.buffers()))
    drop_quantization_marker(to_save)
    if hasattr(to_save, PRUNE_INFO_ATTR):
        delattr(to_save, PRUNE_INFO_ATTR)
    n_blocks_cfg = num_layers_of(to_save.config.get_text_config()
                                 if hasattr(to_save.config, "get_text_config") else to_save.config)
    if n_blocks_cfg is not None and n_blocks_cfg != len(info.kept):
        raise MiPrunError(f"the model's config says {n_blocks_cfg} blocks but it has "
                          f"{len(info.kept)}. Fix: prune with mi_prun.models.prune(), which fixes "
                          "the config.")
    dtype = str(next(to_save.parameters()).dtype).replace("torch.", "")
    sel_record = {k: v for k, v in sel.items() if k != "provenance"}
    record = {
        "format": EXPORT.format,
        "format_version": 1,
        "block_numbering": "0-based: block 0 is the first decoder block of the original model",
        "original_n_blocks": info.n_blocks,
        "n_blocks": len(info.kept),
        "removed": list(info.removed),
        "kept": list(info.kept),
        "kept_ranges": [list(r) for r in runs_of(info.kept)],
        "block_path": info.block_path,
        "source_model": source,
        "model": model_meta,
        "method": sel.get("method"),
        "estimator": provenance.get("estimator"),
        "estimator_options": provenance.get("estimator_options"),
        "run_cost": sel.get("run_cost"),
        "objective": sel.get("objective"),
        "calibration": provenance.get("calibration"),
        "selection": sel_record,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype,
        "peak_memory": peak_memory(),  # of the process that exported, up to the export
    }
    if source_note:
        record["source_note"] = source_note

    heal_rec = healing if healing is not None else healing_of(pruned)
    mergekit_note = source_note
    if heal_rec is not None:
        heal_dict = heal_rec.to_dict() if hasattr(heal_rec, "to_dict") else dict(heal_rec)
        if list(heal_dict.get("removed", [])) != list(info.removed):
            raise MiPrunError(f"the healing record bridges removed blocks {heal_dict.get('removed')}, but the "
                              f"model lacks {list(info.removed)}. Fix: export the model `heal` returned.")
        record["healing"] = heal_dict
        heal_note = ("this export is healed (bridges folded into the weights, see mi_prun.json); a "
                     "passthrough merge rebuilds only the unhealed pruned model")
        mergekit_note = f"{source_note}; {heal_note}" if source_note else heal_note

    if cfg.format == "gguf":  # the source GGUF's blocks, copied: see mi_prun.gguf_export
        gguf_source = check_gguf_export(loaded, info.kept)

        def fill(tmp: Path) -> None:
            gguf_record = write_gguf_export(tmp, loaded, pruned, info.kept, heal_rec, cfg.gguf_fold_type,
                                            source=gguf_source)
            dump_json({**record, "dtype": "as in the source GGUF", "gguf": gguf_record,
                       "files": folder_files(tmp) + [EXPORT.marker]}, tmp / EXPORT.marker)

        out = write_folder(out_dir, EXPORT, fill, overwrite=cfg.overwrite, inputs=inputs)
        log.info("exported %d-block GGUF (removed %s) to %s", len(info.kept), list(info.removed), out)
        return out

    def fill(tmp: Path) -> None:
        try:
            if is_streamed(to_save):  # block weights on disk: written block by block, never all in memory
                save_streamed(to_save, tmp, cfg.max_shard_size)
            else:
                to_save.save_pretrained(tmp, safe_serialization=True, max_shard_size=cfg.max_shard_size)
        except Exception as exc:
            # safetensors reports I/O failures (full disk) as its own error type.
            if type(exc).__name__ == "SafetensorError":
                raise OSError(errno.EIO, str(exc)) from exc
            raise
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("export without a tokenizer: AutoTokenizer will not load %s", out_dir)
        (tmp / "mergekit.yaml").write_text(mergekit_yaml(source, info.kept, dtype, mergekit_note), encoding="utf-8")
        dump_json({**record, "files": folder_files(tmp) + [EXPORT.marker]}, tmp / EXPORT.marker)

    out = write_folder(out_dir, EXPORT, fill, overwrite=cfg.overwrite, inputs=inputs)
    log.info("exported %d-block model (removed %s) to %s", len(info.kept), list(info.removed), out)
    return out
