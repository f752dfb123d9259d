"""Tiny random models of every family of the family table, built offline from configs (no download).

`tiny-<family>` model specs (`load_model("tiny-llama")`, the app's test mode with
`MI_PRUN_TEST_MODEL=tiny-llama`, the tests and the benchmarks' quick modes). The config of each
comes from its `tiny` entry in `mi_prun.models.families`. The tokenizer is byte-level (256 byte tokens plus
`<bos>`, `<eos>`, `<pad>`), adds `<bos>` in front of every text, and saves and reloads with
`AutoTokenizer` like any other.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mi_prun.errors import MiPrunError
from mi_prun.models.families import TINY_FAMILIES

VOCAB = 320  # 256 bytes + 3 specials, rounded up

_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=6, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, pad_token_id=258)

# tiny name -> (model_type, config overrides), from the family table
FAMILIES = TINY_FAMILIES


def tiny_config(family: str, n_layers: int = 6, **overrides: Any):
    """The config of a tiny model of `family` with `n_layers` blocks."""
    if family not in FAMILIES:
        raise MiPrunError(f"unknown tiny family {family!r}: choose one of {', '.join(FAMILIES)}")
    model_type, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    if family == "gpt2":
        kwargs["n_layer"] = n_layers
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                    "intermediate_size", "max_position_embeddings"):
            kwargs.pop(key, None)
    else:
        kwargs["num_hidden_layers"] = n_layers
    return AutoConfig.for_model(model_type, **kwargs)


def byte_tokenizer(add_bos: bool = True):
    """A byte-level fast tokenizer: ids 0..255 are bytes, 256 `<bos>`, 257 `<eos>`, 258 `<pad>`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order them by byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", model_max_length=256)
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte -> printable character map that tokenizers' ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_model(family: str = "llama", n_layers: int = 6, seed: int = 0, **overrides: Any):
    """(model, tokenizer): a randomly initialised tiny causal LM of `family`, in eval mode.

    The random weights are scaled up (std 0.2) so that blocks really transform their input and
    pruning them changes the output measurably.
    """
    config = tiny_config(family, n_layers=n_layers, **overrides)
    config.initializer_range = 0.2
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, byte_tokenizer()


__all__ = ["FAMILIES", "VOCAB", "byte_tokenizer", "tiny_config", "tiny_model"]
