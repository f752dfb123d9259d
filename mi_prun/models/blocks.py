"""Where a model keeps its decoder blocks, how many it declares, and how long an input it takes.

`find_blocks(model)` returns the ordered decoder blocks and their container, from the family
table (`models.families`, keyed by `model_type`) with a generic fallback. `num_layers_of(config)` and
`context_length(config)` read the block count and the context window under whatever name a family
gives them. Blocks are numbered from 0 everywhere in mi-prun.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.accept import as_module
from mi_prun.models.families import BLOCK_PATHS

log = logging.getLogger(__name__)

# Config attribute names that hold the number of blocks, in the order they are looked for.
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Config attribute names that hold the longest input (in tokens), in the order they are looked for.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                "seq_length", "max_seq_len")

# Sub-configs that hold the decoder stack of a composite model. Vision / audio towers have blocks
# of their own (and context lengths of their own), so only these names are followed.
TEXT_SUBCONFIGS = ("text_config", "language_config", "llm_config", "decoder_config")


@dataclass(frozen=True)
class Blocks:
    """The decoder blocks of a model: `blocks[b]` is block b; `parent.<attr>` is the container."""

    blocks: nn.ModuleList
    parent: nn.Module
    attr: str
    path: str  # dotted path from the model root, e.g. "model.layers"

    def __len__(self) -> int:
        return len(self.blocks)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def num_layers_of(config: Any) -> int | None:
    """The block count a config declares, or None where it names none."""
    for key in NUM_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _text_configs(config: Any) -> list[Any]:
    """`config`'s decoder (text) sub-configs, most specific first, then `config` itself."""
    found: list[Any] = []
    if hasattr(config, "get_text_config"):
        try:
            found.append(config.get_text_config())
        except Exception as exc:  # a config class with an unusual layout: fall back to the names
            log.debug("get_text_config failed on %s: %s", type(config).__name__, exc)
    found += [getattr(config, name, None) for name in TEXT_SUBCONFIGS]
    found.append(config)
    out: list[Any] = []
    for cfg in found:
        if cfg is not None and all(cfg is not seen for seen in out):
            out.append(cfg)
    return out


def context_length(config: Any) -> int | None:
    """The longest input (in tokens) `config` allows, or None where it names none.

    Looks at the text sub-config of a composite model first (its vision tower has a context of
    its own), then the config itself, under every name in `CONTEXT_KEYS`.
    """
    if config is None:
        return None
    for cfg in _text_configs(config):
        for key in CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context(model: Any, seq_len: int, what: str = "tokens per sample", name: str | None = None) -> None:
    """Refuse (`MiPrunError`) sequences of `seq_len` tokens longer than the context of `model` (a
    module or a `LoadedModel`): the one check of analysis, healing and verification tokens, run
    before any text is read or any forward pass (past the context, GPT-2's position embedding is
    an IndexError and Llama's rotary positions extrapolate silently)."""
    spec = getattr(model, "spec", None)
    module = model if hasattr(model, "config") else getattr(model, "model", model)  # a module or a LoadedModel
    limit = context_length(getattr(module, "config", None))
    if isinstance(limit, int) and seq_len > limit:
        raise MiPrunError(f"{seq_len} {what} exceed the context of {name or spec or type(module).__name__} "
                          f"({limit} tokens). Fix: use at most {limit}.")


def _blocks_at(model: nn.Module, path: str) -> Blocks:
    parent_path, _, attr = path.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    return Blocks(blocks=blocks, parent=parent, attr=attr, path=path)


def find_blocks(model: nn.Module) -> Blocks:
    """The ordered decoder blocks of `model`.

    Looks up `BLOCK_PATHS[config.model_type]` first; otherwise takes the unique `nn.ModuleList`
    whose length equals the config's layer count (`num_hidden_layers`, `n_layer`, ...).
    Raises `MiPrunError` naming the model class and what was looked for when neither works.
    A `LoadedModel` stands for its model (`accept.as_module`).
    """
    model = as_module(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    n_layers = num_layers_of(config) if config is not None else None
    path = BLOCK_PATHS.get(model_type or "")
    if path is not None:
        try:
            found = _blocks_at(model, path)
            if isinstance(found.blocks, nn.ModuleList):
                return found
        except AttributeError:
            pass
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and n_layers is not None and len(module) == n_layers
        and name
    ]
    # Prefer the shortest path: vision towers or MoE expert lists nest deeper.
    candidates.sort(key=lambda name: (name.count("."), name))
    if candidates:
        if len(candidates) > 1:
            log.info("several block lists of length %d; using %s", n_layers, candidates[0])
        return _blocks_at(model, candidates[0])
    raise MiPrunError(
        f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}): "
        f"looked for {path or 'no known path'} and for an nn.ModuleList of length "
        f"{n_layers if n_layers is not None else '<no num_hidden_layers in config>'}. "
        "mi-prun supports decoder-only causal LMs; add the family to mi_prun.models.families.FAMILIES."
    )
