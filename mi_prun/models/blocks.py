"""Where a model keeps its decoder blocks, how many it declares, and how long an input it takes.

`find_blocks(model)` returns the ordered decoder blocks and their container, from one table keyed
by `model_type` (`BLOCK_PATHS`) with a generic fallback. `num_layers_of(config)` and
`context_length(config)` read the block count and the context window under whatever name a family
gives them. Blocks are numbered from 0 everywhere in mi-prun.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

# model_type -> dotted path from the *CausalLM model to its nn.ModuleList of decoder blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "stablelm": "model.layers",
    "cohere": "model.layers",
    "starcoder2": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_bigcode": "transformer.h",
    "gptj": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neo": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}

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
    """
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
        "mi-prun supports decoder-only causal LMs; add the block path to mi_prun.models.BLOCK_PATHS."
    )


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (with an accelerate device map,
    the first parameter can live elsewhere)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    hook = getattr(emb, "_hf_hook", None)  # accelerate: weights offloaded, run on execution_device
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in (emb.parameters() if emb is not None else ()):
        if p.device.type != "meta":
            return p.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
