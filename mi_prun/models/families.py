"""The family table: every fact mi-prun knows about a model family, one entry per `model_type`.

Model-family differences are data here (as in mergekit), never code copied per family:
- `blocks`: the dotted path from the *CausalLM model to its `nn.ModuleList` of decoder blocks
  (`models.blocks.find_blocks`; a model_type not in the table falls back to the unique ModuleList
  whose length is the config's block count);
- `fold`: where a healing bridge folds into block b-1 (`mi_prun.heal`; None: healing is refused);
- `tiny`: the config overrides of the family's tiny random model (`tiny-<name>` model specs,
  `models.tiny`), for the tests and the app's test mode; `tiny_name` where it differs from the
  model_type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Fold:
    """Where block b's bridge goes: `path` inside the block, `kind` "linear" (the MLP's output
    projection: any d x d map folds exactly) or "norm" (a norm after the MLP: a per-channel
    scale), the norm's weight `offset` (1 for Gemma's (1 + w)), and `refuse(config)`: a reason
    the fold is not exact for this config, or None."""

    path: str
    kind: str = "linear"
    offset: float = 0.0
    refuse: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Family:
    """One model family: see the module docstring."""

    blocks: str
    fold: Fold | None = None
    tiny: dict[str, Any] | None = None
    tiny_name: str | None = None


def _opt_refuse(config: Any) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "OPT with do_layer_norm_before=False normalises after the residual sum, so no weight folds a bridge exactly"
    return None


def _bloom_refuse(config: Any) -> str | None:
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        return "BLOOM with slow_but_exact and pretraining_tp > 1 bypasses dense_4h_to_h's forward"
    return None


def _moe(config: Any) -> str | None:
    return ("mixture-of-experts MLP: an exact bridge would have to be folded into every expert "
            "(not supported)")


_LAYERS, _H = "model.layers", "transformer.h"
_DOWN = Fold("mlp.down_proj")
_POST_NORM = Fold("post_feedforward_layernorm", kind="norm", offset=1.0)
_GEMMA_TINY = {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8}

FAMILIES: dict[str, Family] = {
    "llama": Family(_LAYERS, _DOWN, tiny={}),
    "mistral": Family(_LAYERS, _DOWN, tiny={"sliding_window": 64}),
    "mixtral": Family(_LAYERS, Fold("block_sparse_moe", refuse=_moe)),
    "qwen2": Family(_LAYERS, _DOWN, tiny={}),
    "qwen3": Family(_LAYERS, _DOWN, tiny={"head_dim": 8}),
    "qwen3_moe": Family(_LAYERS, Fold("mlp", refuse=_moe)),
    "gemma": Family(_LAYERS, _DOWN, tiny={"head_dim": 8}),
    "gemma2": Family(_LAYERS, _POST_NORM, tiny=_GEMMA_TINY),
    "gemma3_text": Family(_LAYERS, _POST_NORM, tiny=_GEMMA_TINY, tiny_name="gemma3"),
    "phi": Family(_LAYERS, Fold("mlp.fc2")),
    "phi3": Family(_LAYERS, _DOWN, tiny={"pad_token_id": 258}),
    "olmo": Family(_LAYERS, _DOWN),
    "olmo2": Family(_LAYERS, Fold("post_feedforward_layernorm", kind="norm")),
    "granite": Family(_LAYERS, _DOWN),
    "stablelm": Family(_LAYERS, _DOWN),
    "cohere": Family(_LAYERS, _DOWN),
    "starcoder2": Family(_LAYERS, Fold("mlp.c_proj")),
    "smollm3": Family(_LAYERS, _DOWN),
    "gpt2": Family(_H, Fold("mlp.c_proj"), tiny={"n_embd": 32, "n_layer": 6, "n_head": 4, "n_positions": 256}),
    "gpt_bigcode": Family(_H, Fold("mlp.c_proj")),
    "gptj": Family(_H, Fold("mlp.fc_out")),
    "bloom": Family(_H, Fold("mlp.dense_4h_to_h", refuse=_bloom_refuse)),
    "falcon": Family(_H, Fold("mlp.dense_4h_to_h"), tiny={
        "new_decoder_architecture": False, "multi_query": True, "alibi": False, "parallel_attn": True,
        "num_kv_heads": 1}),
    "gpt_neo": Family(_H, Fold("mlp.c_proj")),
    "gpt_neox": Family("gpt_neox.layers", Fold("mlp.dense_4h_to_h"), tiny={}),
    "opt": Family("model.decoder.layers", Fold("fc2", refuse=_opt_refuse),
                  tiny={"ffn_dim": 64, "word_embed_proj_dim": 32}),
}

# Views of the table by the question asked.
BLOCK_PATHS: dict[str, str] = {t: f.blocks for t, f in FAMILIES.items()}
FOLDS: dict[str, Fold] = {t: f.fold for t, f in FAMILIES.items() if f.fold is not None}
# tiny name -> (model_type, config overrides), in table order
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    (f.tiny_name or t): (t, dict(f.tiny)) for t, f in FAMILIES.items() if f.tiny is not None}

__all__ = ["BLOCK_PATHS", "FAMILIES", "FOLDS", "TINY_FAMILIES", "Family", "Fold"]
