"""Remove decoder blocks from a model object without touching the shared model.

`pruned_view(model, remove)` is a structural copy that shares every weight tensor with `model` and
lacks the removed blocks: cheap enough to evaluate many candidate sets. `prune(model, remove)` is
the same with weights of its own (safe to fine-tune or export independently). Both fix everything
that depends on the block count, the omission behind most peers' bugs:

- the config's layer count (`num_hidden_layers`, `n_layer`, ...), also in text sub-configs;
- per-layer config lists (`layer_types`, sliding-window patterns, any list as long as the old
  block count), filtered to the kept blocks;
- every int `layer_idx` inside a kept block, renumbered to its new position, so that a KV cache
  indexes the right layer (transformers #30508).

The result remembers what it was cut from (`prune_info`), in the numbering of the first original
also when a pruned model is pruned again. Writing it to disk is `mi_prun.export.export`.
Blocks are numbered from 0 everywhere.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import (
    NUM_LAYER_KEYS,
    TEXT_SUBCONFIGS,
    find_blocks,
    num_layers_of,
)

log = logging.getLogger(__name__)

# The attribute a pruned model carries so that `export` knows what it was cut from.
PRUNE_INFO_ATTR = "_mi_prun_pruning"

# Config lists that are never per-layer even when their length happens to equal the block count.
_NOT_PER_LAYER = frozenset({
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids",
    "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "task_specific_params",
})

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
    for name in TEXT_SUBCONFIGS:
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
