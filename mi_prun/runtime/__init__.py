"""The runtime: how a model is loaded and run, whatever holds its weights.

- `sources`: where the weights live (resident, streamed from safetensors or the CPU, dispatched by
  accelerate) behind one interface, chosen once by `load_model`;
- `runner`: the one block runner every forward pass goes through (capture, perplexity, the verified
  search's prefix cache, the task scorer, healing statistics, zero-shot evaluation);
- `loss`: the loss functions those passes end in;
- `loading`: `load_model(spec)` -> `LoadedModel`, which carries its weight source;
- `identity`: what identifies a model across loads, and the check that a result belongs to it;
- `saving`: the shard writer for a model whose tensors arrive block by block.

No module outside this package asks which way a model runs.
"""

from mi_prun.runtime.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from mi_prun.runtime.loss import nll_rows
from mi_prun.runtime.runner import BlockRunner, PrefixStates, logits_fn, token_nll_rows
from mi_prun.runtime.sources import WeightSource, input_device, require_whole_model, weight_source

__all__ = ["BlockRunner", "LoadedModel", "PrefixStates", "WeightSource", "input_device", "load_model", "logits_fn",
           "nll_rows", "require_whole_model", "resolve_device", "resolve_dtype", "token_nll_rows", "weight_source"]
