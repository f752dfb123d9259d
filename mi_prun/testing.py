"""Tiny random models of every supported family, built offline from configs (no download).

Used by the tests, the benchmarks' quick modes and the app's test mode (`tiny-<family>` as a model
spec, e.g. `MI_PRUN_TEST_MODEL=tiny-llama`). The tokenizer is byte-level (256 byte tokens plus
`<bos>`, `<eos>`, `<pad>`), adds `<bos>` in front of every text, and saves and reloads with
`AutoTokenizer` like any other.
"""

from __future__ import annotations

from typing import Any

import torch

from mi_prun.errors import MiPrunError

VOCAB = 320  # 256 bytes + 3 specials, rounded up

_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=6, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, pad_token_id=258)

# family -> (model_type, config overrides). Families differ in names, so each states its own.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 64}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma": ("gemma", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8}),
    "gemma3": ("gemma3_text", {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8}),
    "phi3": ("phi3", {"pad_token_id": 258}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 6, "n_head": 4, "n_positions": 256}),
    "gpt_neox": ("gpt_neox", {}),
    "opt": ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "falcon": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "alibi": False,
                          "parallel_attn": True, "num_kv_heads": 1}),
}


def tiny_config(family: str, n_layers: int = 6, **overrides: Any):
    """The config of a tiny model of `family` with `n_layers` blocks."""
    from transformers import AutoConfig

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, n_layers=n_layers, **overrides)
    config.initializer_range = 0.2
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, byte_tokenizer()


# ---------------------------------------------------------------------------------------- any shape


def _init_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, seed: int,
                std: float) -> torch.Tensor:
    """A seeded random value for one tensor, from its name (the same whatever the order):
    normal(0, std) for matrices, ones for norm weights, zeros for biases."""
    import zlib

    leaf = name.rsplit(".", 1)[-1]
    if len(shape) <= 1:
        return (torch.zeros if leaf == "bias" else torch.ones)(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, std, generator=gen)
    return out.to(dtype)


def random_tensors(config: Any, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   seed: int = 0, names: Any = None):
    """(name, tensor) of a randomly initialised model of `config`, one tensor at a time: nothing
    but the tensor being yielded exists (the model is built on `meta`). `names` limits the tensors
    (default: every parameter, tied ones once)."""
    from mi_prun.models.stream import skeleton

    model = skeleton(config, dtype)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    wanted = None if names is None else set(names)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or (wanted is not None and name not in wanted):
            continue
        seen.add(id(p))
        yield name, _init_value(name, tuple(p.shape), dtype, device, seed, std)


def write_random_model(config: Any, folder: Any, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       shard_bytes: int = 2 * 2**30) -> Any:
    """Write a randomly initialised model of `config` as safetensors shards (plus config, index and
    the byte tokenizer) to `folder`, shard by shard: memory stays at one shard whatever the model's
    size. Returns the folder. Loads with `from_pretrained` or `mi_prun.models.load_model`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    shards: list[tuple[str, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            tmp = f".part-{len(shards):05d}.safetensors"
            save_file(current, str(folder / tmp), metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for name, value in random_tensors(config, dtype, "cpu", seed):
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = value
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for k, (tmp, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / tmp).rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1), encoding="utf-8")
    return folder


def random_model(config: Any, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 seed: int = 0):
    """A randomly initialised model of `config` built directly on `device` (no float32 copy, no
    CPU copy first), in eval mode; the same values as `write_random_model` writes."""
    from mi_prun.models.stream import _retie, _set_tensor, skeleton

    model = skeleton(config, dtype)
    values = dict(random_tensors(config, dtype, device, seed))
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name in values:
            _set_tensor(model, name, values[name], True)
    _retie(model)
    for name, b in list(model.named_buffers()):
        _set_tensor(model, name, b.to(device), False)
    model.eval()
    model.requires_grad_(False)
    return model
