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
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mi_prun.config import ExportConfig, expect_config
from mi_prun.errors import MiPrunError
from mi_prun.files import EXPORT, check_output, dump_json, folder_files, write_folder
from mi_prun.gguf_export import check_gguf_export, write_gguf_export
from mi_prun.models.accept import as_module, is_loaded
from mi_prun.heal import healing_of
from mi_prun.models.blocks import find_blocks, num_layers_of
from mi_prun.runtime.sources import check_runnable
from mi_prun.models.memory import peak_memory
from mi_prun.runtime.sources import weight_source
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
    """The model the export was cut from, as mergekit's source: its hub id; else its local folder
    (mergekit reads one; never a cache path when a hub id is known); else the name it was loaded
    by, with a note saying why mergekit cannot rebuild from it. Never a placeholder when anything
    is known."""
    if source_model:
        return str(source_model), None
    hub = getattr(loaded, "hub_id", None) if loaded is not None else None
    meta = (getattr(analysis, "model", None) or {}) if analysis is not None else {}
    if hub is None:
        hub = meta.get("hub_id")
    name = getattr(pruned.config, "_name_or_path", None)
    if hub is None:
        hub = hub_id(name) if isinstance(name, str) and name else None
    if hub:
        return hub, None
    spec = getattr(loaded, "spec", None) if loaded is not None else meta.get("spec")
    folder = getattr(loaded, "source", None) if loaded is not None else meta.get("source")
    for cand in (folder, name):
        if isinstance(cand, str) and cand and Path(cand).is_dir() and not str(spec or "").lower().endswith(".gguf") \
                and (Path(cand) / "config.json").is_file():
            return str(Path(cand).resolve()), None
    if isinstance(spec, str) and spec:
        kind = ("a GGUF file (quantised)" if spec.lower().endswith(".gguf") else
                "a built-in random model" if spec.startswith("tiny-") else "not a local safetensors folder")
        return spec, (f"the original model {spec} is {kind}, which mergekit cannot read: replace source_model "
                      "with the id or folder of the unpruned safetensors model")
    return "<original model id>", ("the original model is not known (export was given neither the loaded model "
                                   "nor its analysis): replace the placeholder with the id or folder of the "
                                   "unpruned safetensors model, or pass source_model=")


def _chosen_by(sel: dict[str, Any]) -> str | None:
    """What chose the removed set, in words: a verified search names the criterion whose proposal
    won (the method only proposed candidates; forward passes chose), a one-pass method itself."""
    method = sel.get("method")
    if method is None:
        return None
    if sel.get("verified"):
        v = sel.get("verification") if isinstance(sel.get("verification"), dict) else {}
        scored = v.get("sets_scored")
        return (f"verified search ({method}'s candidates and others{f', {scored} sets' if scored else ''} scored by "
                f"forward passes): the winning set was proposed by {sel.get('winner_source') or 'unknown'}")
    return f"{method} (one pass, not verified)"


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
    `mergekit.yaml` (rebuilds the same model from the original's hub id, else its local folder, with
    a passthrough merge). `chosen_by` in `mi_prun.json` says what chose the removed set.

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
    expect_config(cfg, ExportConfig)
    if tokenizer is None and is_loaded(pruned):
        tokenizer = pruned.tokenizer
    pruned = as_module(pruned, "the pruned model")
    check_runnable(pruned, "the pruned model")  # an empty skeleton would export no weights
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
        "chosen_by": _chosen_by(sel),
        "estimator": provenance.get("estimator"),
        "estimator_options": provenance.get("estimator_options"),
        "run_cost": sel.get("run_cost"),
        "objective": sel.get("objective"),
        "calibration": provenance.get("calibration"),
        "selection": sel_record,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output_id": uuid.uuid4().hex,  # tells this export from one written later at the same path
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
            # the weight source writes it (a streamed model block by block, never all in memory)
            weight_source(to_save).save(to_save, tmp, cfg.max_shard_size)
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
