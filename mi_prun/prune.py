"""Remove decoder blocks without touching the shared model, and export the result.

`pruned_view(model, remove)` is a structural copy that shares every weight tensor with `model` and
lacks the removed blocks: cheap enough to evaluate many candidate sets. `prune(model, remove)` is
the same with weights of its own (safe to fine-tune or export independently). Both fix everything
that depends on the block count, the omission behind most peers' bugs:

- the config's layer count (`num_hidden_layers`, `n_layer`, ...), also in text sub-configs;
- per-layer config lists (`layer_types`, sliding-window patterns, any list as long as the old
  block count), filtered to the kept blocks;
- every int `layer_idx` inside a kept block, renumbered to its new position, so that a KV cache
  indexes the right layer (transformers #30508).

`export(...)` writes a folder that plain `transformers` loads (safetensors, config, tokenizer),
plus `mi_prun.json` (what was removed and why) and `mergekit.yaml` (a passthrough merge that
rebuilds the same model from the original). Writing is atomic.

Blocks are numbered from 0 everywhere.
"""

from __future__ import annotations

import copy
import datetime as _dt
import errno
import json
import logging
import numbers
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models import NUM_LAYER_KEYS, drop_quantization_marker, find_blocks, num_layers_of

log = logging.getLogger(__name__)

# The attribute a pruned model carries so that `export` knows what it was cut from.
PRUNE_INFO_ATTR = "_mi_prun_pruning"

# Config lists that are never per-layer even when their length happens to equal the block count.
_NOT_PER_LAYER = frozenset({
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids",
    "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "task_specific_params",
})

# Sub-configs that hold the decoder stack of a composite model. Vision / audio towers have blocks
# of their own that must keep their count, so only these names are followed.
_TEXT_SUBCONFIGS = ("text_config", "language_config", "llm_config", "decoder_config")

# PyTorch hook dicts a copy must not inherit: a capture context may have hooks on the shared model
# at the moment it is copied, and they belong to that run, not to the new model.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


@dataclass(frozen=True)
class PruneInfo:
    """What a pruned model was cut from: block numbers of the original model, from 0."""

    n_blocks: int
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    block_path: str


# ----------------------------------------------------------------------------------------------
# validation and config


def _validate_remove(remove: Iterable[Any], n_blocks: int) -> tuple[int, ...]:
    """Sorted unique block numbers, or MiPrunError naming the problem and the fix."""
    if isinstance(remove, (str, bytes)) or not isinstance(remove, Iterable):
        raise MiPrunError(f"blocks to remove must be a list of block numbers, got {remove!r}. "
                          f"Fix: pass e.g. [1, 3] (blocks are numbered from 0 to {n_blocks - 1}).")
    items = list(remove)
    bad = [r for r in items if isinstance(r, bool) or not isinstance(r, numbers.Integral)]
    if bad:
        raise MiPrunError(f"blocks to remove must be integers, got {bad!r}. "
                          f"Fix: pass block numbers 0..{n_blocks - 1}.")
    values = [int(r) for r in items]
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise MiPrunError(f"block(s) {dupes} listed more than once in the blocks to remove. "
                          "Fix: list each block once.")
    out_of_range = [v for v in values if not 0 <= v < n_blocks]
    if out_of_range:
        raise MiPrunError(f"block(s) {out_of_range} out of range: this model has {n_blocks} blocks, "
                          f"numbered from 0 to {n_blocks - 1}. Fix: use numbers in that range "
                          "(mi-prun numbers blocks from 0, not 1).")
    if len(values) >= n_blocks:
        raise MiPrunError(f"cannot remove all {n_blocks} blocks. Fix: keep at least one block.")
    return tuple(sorted(values))


def _fix_config_inplace(config: Any, kept: Sequence[int], n_old: int, where: str = "config") -> None:
    """Shrink every block-count-dependent field of `config` (and its text sub-configs) in place."""
    from transformers import PretrainedConfig

    n_new = len(kept)
    if num_layers_of(config) == n_old:
        for key in NUM_LAYER_KEYS:
            if isinstance(getattr(config, key, None), int) and getattr(config, key) == n_old:
                setattr(config, key, n_new)
        for name, value in list(vars(config).items()):
            if name.startswith("_") or name in _NOT_PER_LAYER:
                continue
            if isinstance(value, (list, tuple)) and len(value) == n_old:
                setattr(config, name, type(value)(value[i] for i in kept))
                log.debug("%s.%s: kept entries %s", where, name, list(kept))
        # GPT-Neo stores its layer pattern twice; its __init__ refuses a mismatch on reload.
        if getattr(config, "model_type", None) == "gpt_neo" and hasattr(config, "attention_layers"):
            config.attention_types = [[[t], 1] for t in config.attention_layers]
    for name in _TEXT_SUBCONFIGS:
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            _fix_config_inplace(sub, kept, n_old, where=f"{where}.{name}")


def remove_blocks_config(config: Any, remove: Iterable[int]) -> Any:
    """A copy of `config` describing the model without blocks `remove` (numbered from 0).

    The input config is not changed. Raises MiPrunError when the config declares no block count
    or `remove` is invalid for it.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_old = num_layers_of(text)
    if n_old is None:
        n_old = num_layers_of(config)
    if n_old is None:
        raise MiPrunError(f"{type(config).__name__} declares no block count "
                          f"({', '.join(NUM_LAYER_KEYS)}); cannot derive the pruned config.")
    removed = _validate_remove(remove, n_old)
    kept = [i for i in range(n_old) if i not in removed]
    new = copy.deepcopy(config)
    _fix_config_inplace(new, kept, n_old)
    return new


# ----------------------------------------------------------------------------------------------
# the copy


def _structural_copy(model: nn.Module, share: Iterable[Any]) -> nn.Module:
    """deepcopy of `model` in which every object of `share` stays the same object."""
    memo: dict[int, Any] = {}
    for obj in share:
        memo[id(obj)] = obj
    # Another thread may add or remove a hook on the shared model while it is copied; the dict
    # iteration then fails. Retrying is safe because deepcopy only reads the original.
    for attempt in range(5):
        try:
            return copy.deepcopy(model, dict(memo))
        except RuntimeError as exc:
            if "changed size during iteration" not in str(exc) or attempt == 4:
                raise
    raise AssertionError("unreachable")


def _pruned_copy(model: nn.Module, remove: Iterable[Any]) -> nn.Module:
    blocks = find_blocks(model)
    n_old = len(blocks)
    removed = _validate_remove(remove, n_old)
    kept = tuple(i for i in range(n_old) if i not in removed)
    # Share tensors (the point of a view) and the removed blocks (never needed in the copy, so
    # never worth copying); modules, configs and the kept blocks become new objects.
    share: list[Any] = [t for t in model.parameters(recurse=True)]
    share += [t for t in model.buffers(recurse=True)]
    share += [blocks.blocks[i] for i in removed]
    new = _structural_copy(model, share)
    new_blocks = find_blocks(new)
    kept_modules = [new_blocks.blocks[i] for i in kept]
    setattr(new_blocks.parent, new_blocks.attr, nn.ModuleList(kept_modules))
    for new_idx, block in enumerate(kept_modules):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and \
                    not isinstance(module.layer_idx, bool):
                module.layer_idx = new_idx
    for module in new.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                log.debug("dropping %d %s of %s in the pruned copy", len(hooks), name,
                          type(module).__name__)
                setattr(module, name, type(hooks)())
    _fix_config_inplace(new.config, kept, n_old)
    # Pruning a pruned model: remember the blocks in the numbering of the first original, so
    # that export and mergekit.yaml refer to the model the user started from.
    earlier = prune_info(model)
    if earlier is not None:
        kept = tuple(earlier.kept[i] for i in kept)
        n_old = earlier.n_blocks
        removed = tuple(i for i in range(n_old) if i not in kept)
    setattr(new, PRUNE_INFO_ATTR, PruneInfo(n_blocks=n_old, removed=removed, kept=kept,
                                            block_path=blocks.path))
    return new


def pruned_view(model: nn.Module, remove: Iterable[int]) -> nn.Module:
    """`model` without blocks `remove` (numbered from 0), sharing every weight tensor with it.

    Costs no weight copy: the returned model's parameters and buffers are the very tensors of
    `model`, so writing into one writes into the other. Use it to evaluate candidate sets; use
    `prune` for a model of its own. `model` is only read (safe while other threads run it), and
    stays exactly as it was, also when this raises. Forward/backward hooks present on `model` are
    not carried over.
    """
    return _pruned_copy(model, remove)


def prune(model: nn.Module, remove: Iterable[int], copy_weights: bool = True) -> nn.Module:
    """`model` without blocks `remove` (numbered from 0), with weights of its own.

    With `copy_weights=False` this is `pruned_view`. Tied weights (e.g. input embeddings and LM
    head) stay tied in the copy: each shared tensor is cloned once.
    """
    new = _pruned_copy(model, remove)
    if not copy_weights:
        return new
    clones: dict[int, Any] = {}
    with torch.no_grad():
        for module in new.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in clones:
                    clones[id(param)] = nn.Parameter(param.detach().clone(),
                                                     requires_grad=param.requires_grad)
                module._parameters[name] = clones[id(param)]
            for name, buf in list(module._buffers.items()):
                if buf is None:
                    continue
                if id(buf) not in clones:
                    clones[id(buf)] = buf.detach().clone()
                module._buffers[name] = clones[id(buf)]
    return new


def prune_info(model: nn.Module) -> PruneInfo | None:
    """What `model` was cut from, when it was made by `pruned_view` / `prune`."""
    info = getattr(model, PRUNE_INFO_ATTR, None)
    return info if isinstance(info, PruneInfo) else None


# ----------------------------------------------------------------------------------------------
# export


def kept_ranges(kept: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive kept blocks as half-open ranges: [0,1,2,5,6] -> [(0,3), (5,7)]."""
    ranges: list[tuple[int, int]] = []
    for b in sorted(kept):
        if ranges and ranges[-1][1] == b:
            ranges[-1] = (ranges[-1][0], b + 1)
        else:
            ranges.append((b, b + 1))
    return ranges


def mergekit_yaml(source_model: str, kept: Sequence[int], dtype: str = "float32") -> str:
    """A mergekit passthrough config that rebuilds the pruned model from `source_model`.

    mergekit's `layer_range: [start, end]` is half-open (end excluded) and 0-based, like Python.
    """
    lines = [
        "# mi-prun: passthrough merge keeping the listed block ranges of the original model.",
        "# layer_range is [start, end): 0-based, end excluded.",
        "slices:",
    ]
    for start, end in kept_ranges(kept):
        lines += [
            "  - sources:",
            f"      - model: {json.dumps(source_model)}",
            f"        layer_range: [{start}, {end}]",
        ]
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)


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


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays, paths, dtypes, dataclass-like objects in selection or analysis metadata
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    return str(obj)


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
                          "mi_prun.prune and the selection lists no 'removed'. Fix: pass the "
                          "selection, or prune with mi_prun.prune.prune().")
    if len(info.kept) != n_now:
        raise MiPrunError(f"the model has {n_now} blocks, but keeping {list(info.kept)} of "
                          f"{info.n_blocks} leaves {len(info.kept)}. Fix: export the model made "
                          "from this selection.")
    return info


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _write_error(path: Path, exc: BaseException) -> MiPrunError:
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    hint = ("free disk space" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            else "choose a writable folder")
    return MiPrunError(f"cannot write the export to {path}: {reason}. Fix: {hint}; nothing was "
                       "left at the target.")


def export(
    pruned: nn.Module,
    tokenizer: Any,
    selection: Any,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source_model: str | None = None,
    analysis_meta: dict[str, Any] | None = None,
) -> Path:
    """Write `pruned` as a folder that plain transformers loads; return its path.

    Contents: `model.safetensors` (+ index when sharded), `config.json`, generation config,
    tokenizer files, `mi_prun.json` (removed and kept blocks numbered from 0, method, estimator,
    run cost, objective, calibration provenance, library versions) and `mergekit.yaml` (rebuilds
    the same model from `source_model` with a passthrough merge).

    `selection`: a dict or an object with `to_dict()` (e.g. `mi_prun.select.Selection`), or None
    when `pruned` came from `prune`/`pruned_view` (it remembers its removed blocks).
    `source_model`: the original model id or path for mergekit; defaults to the config's
    `_name_or_path`. `analysis_meta`: provenance of the analysis (estimator, calibration, ...),
    copied into `mi_prun.json`.

    Atomic: everything is written into a temporary sibling folder that is renamed into place at
    the end, so an interrupted export leaves no folder that looks complete. A non-empty `out_dir`
    is refused unless `overwrite=True`, which replaces it only once the new folder is complete.
    `pruned` is not changed: a copy sharing its tensors is saved (a GGUF-loaded model's
    quantisation marker is dropped on that copy).
    """
    from mi_prun.report import library_versions

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MiPrunError(f"export target {out} is a file. Fix: give a folder path.")
    if _is_nonempty_dir(out) and not overwrite:
        raise MiPrunError(f"export target {out} is not empty. Fix: choose a new folder, or pass "
                          "overwrite=True (--overwrite) to replace it.")
    sel = _as_dict(selection)
    info = _resolve_blocks(pruned, sel)
    meta = dict(analysis_meta or {})
    if source_model is None:
        model_meta = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        source_model = model_meta.get("source") or getattr(pruned.config, "_name_or_path", None)
    source_note = None
    if not source_model:
        source_model = "<original model id>"
        source_note = "original model id unknown: replace the placeholder in mergekit.yaml"
    elif str(source_model).lower().endswith(".gguf") or (Path(str(source_model)).is_dir() and
                                                          any(Path(str(source_model)).glob("*.gguf"))):
        source_note = ("the original was a GGUF file, which mergekit does not read: point "
                       "mergekit.yaml at the safetensors release of the same model")

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
                          f"{len(info.kept)}. Fix: prune with mi_prun.prune.prune(), which fixes "
                          "the config.")
    dtype = str(next(to_save.parameters()).dtype).replace("torch.", "")
    record = {
        "format": "mi-prun-pruned-model",
        "format_version": 1,
        "block_numbering": "0-based: block 0 is the first decoder block of the original model",
        "original_n_blocks": info.n_blocks,
        "n_blocks": len(info.kept),
        "removed": list(info.removed),
        "kept": list(info.kept),
        "kept_ranges": [list(r) for r in kept_ranges(info.kept)],
        "block_path": info.block_path,
        "source_model": source_model,
        "method": sel.get("method"),
        "estimator": meta.get("estimator", sel.get("estimator")),
        "run_cost": sel.get("run_cost"),
        "objective": sel.get("objective"),
        "calibration": meta.get("calibration", sel.get("calibration")),
        "selection": sel,
        "analysis": meta,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype,
    }
    if source_note:
        record["source_note"] = source_note

    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # mkdir (not mkdtemp, whose 0700 would end up on the export) honours the umask.
        tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(out, exc) from exc
    old: Path | None = None
    try:
        try:
            to_save.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            else:
                log.warning("export without a tokenizer: AutoTokenizer will not load %s", out)
            (tmp / "mi_prun.json").write_text(json.dumps(record, indent=2, default=_json_default))
            (tmp / "mergekit.yaml").write_text(mergekit_yaml(str(source_model), info.kept, dtype))
        except OSError as exc:
            raise _write_error(out, exc) from exc
        except Exception as exc:
            # safetensors reports I/O failures (full disk) as its own error type.
            if type(exc).__name__ == "SafetensorError":
                raise _write_error(out, exc) from exc
            raise
        # The new folder is complete; only now is the old one moved aside.
        if out.exists():
            if any(out.iterdir()):
                old = parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
                old.mkdir()
                out.rename(old / out.name)
            else:
                out.rmdir()
        tmp.rename(out)
    except OSError as exc:
        if old is not None and not out.exists() and (old / out.name).exists():
            (old / out.name).rename(out)  # put the previous export back
            shutil.rmtree(old, ignore_errors=True)
            old = None
        raise _write_error(out, exc) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info("exported %d-block model (removed %s) to %s", len(info.kept), list(info.removed), out)
    return out
