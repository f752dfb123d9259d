"""Block-streaming execution: run a model larger than the compute device one block at a time.

SparseGPT / SLEB style. The weights stay where they are (safetensors files on disk, read one
block's tensors at a time; or the CPU) and only one decoder block at a time is materialised on the
compute device; the hidden states of all tokens stay on the device between blocks. Everything
that is not a block (embeddings, rotary embeddings, final norm, LM head) is materialised once.

- `open_streamed(folder, device, dtype)`: the model skeleton built on the `meta` device from the
  config (accelerate's `init_empty_weights`), its non-block modules loaded, a `Stream` attached.
- `offload_to_cpu(model, device)`: the same for a model already in CPU memory.
- `BlockRunner(model, input_ids, attention_mask)`: the one runner capture, verification, healing
  and perplexity use. `runner.h0` (h_0 per batch), `runner.run_blocks(hidden, start, stop, skip)`
  (yields the output of every block run), `runner.nll(hidden)` (final norm, LM head, NLL).

How it stays generic across families: the model's own forward computes everything a block needs
(rotary position embeddings, causal / sliding-window masks, ALiBi, position ids). The runner runs
that forward once per batch on a private structural copy whose blocks are *slots*: a slot records
the (args, kwargs) its block would have been called with and hands the hidden states through, so
no block weight is touched. Blocks are then called directly with the recorded arguments, block by
block over all batches. The tail (final norm, LM head, logit soft-capping) is the same forward with
slot 0 handing in the last hidden state. A family whose forward does anything between blocks other
than pass the hidden state on cannot stream; it fails in one line naming it.

Memory: one block's weights on the device (plus the non-block modules), N x T x d hidden states,
and the recorded block arguments (masks and position embeddings, shared across blocks). Weights
read from disk are copied out of the file and the file is closed per block, so the process RSS
stays bounded by one block, not the model (file-backed pages count in RSS while mapped).
Blocks are numbered from 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import find_blocks
from mi_prun.models.hooks import hidden_of, output_hooks
from mi_prun.models.surgery import pruned_view

try:  # transformers' checkpoint renamings (5.x; private): older versions read plain names only
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings
except ImportError:
    get_model_conversion_mapping = WeightRenaming = apply_renamings = None

log = logging.getLogger(__name__)

# The attribute of a streamed model (and of every pruned view of it) holding its `Stream`.
STREAM_ATTR = "_mi_prun_stream"


# ---------------------------------------------------------------------------------------- stores


class SafetensorsStore:
    """The tensors of a folder of safetensors files, read on demand, one group at a time.

    Only the headers are read at construction. `get(keys)` opens each file it needs, copies the
    tensors out and closes it again, so no mapping outlives the call.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise MiPrunError(f"cannot stream {self.folder}: no .safetensors weights in it. Fix: offload needs "
                              "safetensors files (save the model with save_pretrained(safe_serialization=True)).")
        self.file_of: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for key in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        self.file_of[key] = f
            except Exception as exc:  # SafetensorError on a truncated or corrupt file
                raise MiPrunError(f"cannot read the weights file {f}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                                  "Fix: the file may be truncated or corrupt; download or export it again.") from exc

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def values(self, key: str, flat_index: torch.Tensor) -> torch.Tensor:
        """tensor.reshape(-1)[flat_index] of tensor `key`, reading only the rows it needs."""
        with safe_open(str(self.file_of[key]), framework="pt", device="cpu") as fh:
            part = fh.get_slice(key)
            shape = part.get_shape()
            row = 1
            for n in shape[1:]:
                row *= int(n)
            out = []
            for i in flat_index.tolist():
                r, c = divmod(int(i), row)
                out.append(part[r:r + 1].reshape(-1)[c].clone())
        return torch.stack(out)

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """CPU tensors of `keys`, copies owning their memory (the files are closed on return)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in names:
                    out[key] = fh.get_tensor(key).clone()  # own memory: no view of the mapping survives
        return out


class TensorStore:
    """Tensors already in CPU memory, by name (a model offloaded to the CPU, or a benchmark's)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in keys}


# ---------------------------------------------------------------------------------------- stream


class Stream:
    """Where a streamed model's meta tensors really are, and where its blocks run.

    `keys` maps id(meta tensor) -> its name in `store`; pruned views share the tensors, so the map
    holds for them too. A deepcopy (pruned_view copies the model) returns the same object.
    """

    def __init__(self, store: Any, keys: dict[int, str], device: torch.device, dtype: torch.dtype,
                 source: str) -> None:
        self.store, self.keys, self.device, self.dtype, self.source = store, keys, device, dtype, source
        self.blocks_loaded = 0  # how many block materialisations happened (tests, benchmarks)

    def __deepcopy__(self, memo: dict) -> Stream:
        return self

    def real(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        """The real CPU value of one of the model's tensors (itself when not on `meta`)."""
        if not tensor.is_meta:
            return tensor
        key = self.keys.get(id(tensor))
        if key is None:
            raise MiPrunError(f"no stored value for the tensor {name or '?'} of the streamed model.")
        return self.store.get([key])[key]

    def materialize(self, module: nn.Module) -> nn.Module:
        """A copy of `module` with every tensor real, on `device`, floating weights in `dtype`."""
        named = list(_named_tensors(module))
        real = [t for _, t, _ in named if not t.is_meta]
        new = copy.deepcopy(module, {id(t): t for t in real})  # meta tensors copy for free; real ones are shared
        need = sorted({self.keys[id(t)] for _, t, _ in named if t.is_meta and id(t) in self.keys})
        missing = [n for n, t, _ in named if t.is_meta and id(t) not in self.keys]
        if missing:
            raise MiPrunError(f"the streamed model has no stored weights for {', '.join(missing[:3])}. Fix: the "
                              "weights files lack tensors the config needs; export or download the model again.")
        loaded = self.store.get(need) if need else {}
        done: dict[int, torch.Tensor] = {}
        for name, t, is_param in named:
            if id(t) not in done:
                value = loaded[self.keys[id(t)]] if t.is_meta else t
                done[id(t)] = _to(value, self.device, self.dtype if is_param or t.is_meta else None)
            _set_tensor(new, name, done[id(t)], is_param)
        self.blocks_loaded += 1
        return new


# ---------------------------------------------------------------------------------------- accelerate


def _offload_hooks(hook: Any) -> list[Any]:
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def offload_hook(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """(accelerate hook, key in its weights_map) of a tensor accelerate offloaded (to the CPU or
    disk) with a device map, from the innermost module holding such a hook; None if not offloaded."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:k]))
        for hook in _offload_hooks(getattr(module, "_hf_hook", None)):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                return hook, ".".join(parts[k:])
    return None


class _Overlay(dict):
    """A weights_map with some entries replaced (a healed weight of an offloaded block)."""

    def __init__(self, base: Any, new: dict[str, torch.Tensor]) -> None:
        super().__init__(new)
        self.base = base

    def __missing__(self, key: str) -> torch.Tensor:
        return self.base[key]

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.base

    def keys(self):
        return list(dict.fromkeys([*self.base.keys(), *dict.keys(self)]))

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def real_value(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The value of `model`'s tensor `name`: itself, or (when it is on `meta`) its streamed or
    accelerate-offloaded value, on the CPU."""
    if not tensor.is_meta:
        return tensor
    stream = stream_of(model)
    if stream is not None:
        return stream.real(tensor, name)
    found = offload_hook(model, name)
    if found is None:
        raise MiPrunError(f"{name} is on the meta device and neither streamed nor offloaded by accelerate.")
    hook, key = found
    return hook.weights_map[key]


def real_values(model: nn.Module, name: str, tensor: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """tensor.reshape(-1)[flat_index] of one of `model`'s tensors; for a streamed one read from the
    files row by row (identity samples a few values: never a whole LM head in memory)."""
    stream = stream_of(model)
    if tensor.is_meta and stream is not None and isinstance(stream.store, SafetensorsStore) \
            and id(tensor) in stream.keys and tensor.dim() >= 1:
        return stream.store.values(stream.keys[id(tensor)], flat_index)
    flat = real_value(model, name, tensor).detach().reshape(-1)
    return flat[flat_index.to(flat.device)]


def replace_offloaded(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Make accelerate's offload hook of `name` serve `value` (healing an offloaded block); False
    when `name` is not offloaded. Only `model`'s own hook objects change (a view has copies)."""
    found = offload_hook(model, name)
    if found is None:
        return False
    hook, key = found
    base = hook.weights_map
    # the overlay's own entries, not the base's (dict(base) would go through the overridden keys())
    own = {k: dict.__getitem__(base, k) for k in dict.keys(base)} if isinstance(base, _Overlay) else {}
    hook.weights_map = _Overlay(base.base if isinstance(base, _Overlay) else base, {**own, key: value.detach().cpu()})
    return True


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in module.named_buffers(remove_duplicate=False):
        if b is not None:
            yield name, b, False


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.detach().to(device=device, dtype=dtype)
    return t.detach().to(device=device)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if is_param:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def stream_of(model: Any) -> Stream | None:
    """The `Stream` of a streamed model (or of a view of one), else None."""
    found = getattr(model, STREAM_ATTR, None)
    return found if isinstance(found, Stream) else None


def is_streamed(model: Any) -> bool:
    return stream_of(model) is not None


def _block_prefixes(model: nn.Module) -> tuple[str, int]:
    blocks = find_blocks(model)
    return blocks.path + ".", len(blocks)


def _in_block(name: str, prefix: str) -> bool:
    return name.startswith(prefix)


def _renamed_keys(model: nn.Module, store: Any) -> dict[str, str]:
    """model tensor name -> store key, for checkpoints whose names transformers renames on load
    (its own table, e.g. GPT-NeoX's `embed_out` -> `lm_head`)."""
    if get_model_conversion_mapping is None:
        return {}
    try:
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception as exc:  # noqa: BLE001 (transformers' private table: plain names when it fails)
        log.debug("no weight renamings: %s", exc)
        return {}
    if not renamings:
        return {}
    out = {}
    for key in store.keys():  # noqa: SIM118 (a store, not a dict)
        new = apply_renamings(key, renamings)
        if new != key:
            out[new] = key
    return out


def _store_key(name: str, store: Any, base_prefix: str, renamed: dict[str, str] | None = None) -> str | None:
    """The name of `name` in the store: itself, renamed, or without / with the base model's prefix."""
    if name in store:
        return name
    if renamed and name in renamed:
        return renamed[name]
    if base_prefix and name.startswith(base_prefix + ".") and name[len(base_prefix) + 1:] in store:
        return name[len(base_prefix) + 1:]
    if base_prefix and f"{base_prefix}.{name}" in store:
        return f"{base_prefix}.{name}"
    return None


def _attach(model: nn.Module, store: Any, device: torch.device, dtype: torch.dtype, source: str) -> nn.Module:
    """Map every meta tensor of `model` to its store key, load the non-block ones onto `device`."""
    prefix, _ = _block_prefixes(model)
    base = getattr(model, "base_model_prefix", "") or ""
    keys: dict[int, str] = {}
    missing: list[str] = []
    renamed = _renamed_keys(model, store)
    for name, t, _ in _named_tensors(model):
        if not t.is_meta or id(t) in keys:
            continue
        key = _store_key(name, store, base, renamed)
        if key is not None:
            keys[id(t)] = key
        elif not _in_block(name, prefix) and _is_tied_output(model, name):
            continue  # tied to the input embeddings: tie_weights below
        else:
            missing.append(name)
    if missing:
        raise MiPrunError(f"cannot stream {source}: {len(missing)} tensor(s) the config needs are not in the "
                          f"weights files ({', '.join(missing[:3])}). Fix: the files are damaged or belong to "
                          "another model; export or download it again.")
    stream = Stream(store, keys, device, dtype, source)
    # Non-block modules: loaded once onto the device, in place (the skeleton is ours); an untied LM
    # head only when logits are first needed (capture never needs it: `BlockRunner.logits`).
    head = _lazy_head(model, keys)
    rest = [(n, t, p) for n, t, p in _named_tensors(model) if not _in_block(n, prefix) and t is not head]
    need = sorted({keys[id(t)] for _, t, _ in rest if t.is_meta and id(t) in keys})
    loaded = store.get(need) if need else {}
    done: dict[int, torch.Tensor] = {}
    for name, t, is_param in rest:
        if t.is_meta and id(t) not in keys:
            continue
        if id(t) not in done:
            value = loaded[keys[id(t)]] if t.is_meta else t
            done[id(t)] = _to(value, device, dtype if is_param or t.is_meta else None)
        _set_tensor(model, name, done[id(t)], is_param)
    _retie(model)
    still = [n for n, t, _ in _named_tensors(model) if t.is_meta and not _in_block(n, prefix) and t is not head]
    if still:
        raise MiPrunError(f"cannot stream {source}: no weights for {', '.join(still[:3])}. Fix: the files are "
                          "damaged; export or download the model again.")
    setattr(model, STREAM_ATTR, stream)
    model.eval()
    model.requires_grad_(False)
    return model


def _lazy_head(model: nn.Module, keys: dict[int, str]) -> torch.Tensor | None:
    """The output embeddings' weight when it is stored on its own (not tied), else None."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    w = getattr(out, "weight", None)
    if w is None or w is getattr(inp, "weight", None) or id(w) not in keys:
        return None
    return w


def _is_tied_output(model: nn.Module, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if out is None or not tied:
        return False
    return any(p is out.weight for n, p in model.named_parameters(remove_duplicate=False) if n == name)


def _retie(model: nn.Module) -> None:
    if not bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)):
        return
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and out is not None and out.weight.is_meta:
        out.weight = inp.weight


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every weight on the `meta` device (no memory), buffers real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def open_streamed(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                  config: Any = None) -> nn.Module:
    """The model in `folder` (safetensors) as a streamed model: skeleton on meta, non-block modules
    on `device`, blocks read from the files one at a time while running."""
    folder = Path(folder)
    store = SafetensorsStore(folder)
    if config is None:
        config = AutoConfig.from_pretrained(folder)
    model = skeleton(config, dtype)
    return _attach(model, store, torch.device(device), dtype, str(folder))


def from_store(config: Any, store: Any, device: torch.device, dtype: torch.dtype, source: str = "store") -> nn.Module:
    """A streamed model of `config` whose tensors come from `store` (any object with `get`)."""
    return _attach(skeleton(config, dtype), store, torch.device(device), dtype, source)


def offload_to_cpu(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """A streamed model whose weights are `model`'s, left in CPU memory: blocks move to `device` one
    at a time. `model` itself is unchanged (its tensors are only read)."""
    dtype = dtype or next(model.parameters()).dtype
    store = TensorStore({k: v.detach() for k, v in model.state_dict().items()})
    return from_store(model.config, store, torch.device(device), dtype, source=type(model).__name__)


def streamed_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, real CPU tensor) of every entry of `model.state_dict()`, one block's worth in memory at a
    time (for export). Tensors the model holds for real are given as they are."""
    stream = stream_of(model)
    state = model.state_dict(keep_vars=True)
    by_key: dict[str, list[str]] = {}
    for name, t in state.items():
        if t.is_meta:
            key = stream.keys.get(id(t)) if stream is not None else None
            if key is None:
                raise MiPrunError(f"no stored value for {name} of the streamed model.")
            by_key.setdefault(key, []).append(name)
    # Group reads by block (one get per block) in state-dict order.
    group: list[str] = []
    group_id: str | None = None

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        if not group:
            return
        values = stream.store.get(sorted({stream.keys[id(state[n])] for n in group}))
        for n in group:
            yield n, values[stream.keys[id(state[n])]]

    for name, t in state.items():
        gid = _group_of(name)
        if not t.is_meta:
            yield from flush()
            group.clear()
            yield name, t.detach().cpu()
            continue
        if gid != group_id:
            yield from flush()
            group.clear()
            group_id = gid
        group.append(name)
    yield from flush()


def _group_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


# ---------------------------------------------------------------------------------------- runner


class _Stop(Exception):
    """Raised by a slot when the recording pass has what it needs."""


class _Slot(nn.Module):
    """Stands in for block `index` in the runner's private copy: records the call, passes through."""

    def __init__(self, index: int, block: nn.Module, runner: BlockRunner) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "_block", block)  # not a submodule: attributes only
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # The model's forward may read a block's attributes (Gemma's attention_type).
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_runner"]._slot(self.index, args, kwargs)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise MiPrunError("cannot find the hidden states a block is called with; this family cannot stream.")
    return h


def nll_rows(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ids (B, T): the summed next-token NLL (float64, on the CPU) of logits (B, T, V)
    and the tokens scored, positions t >= 1 whose token and predecessor are both unmasked.
    Log-softmax in float32."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                          ids[:, 1:].reshape(-1).to(logits.device), reduction="none").view(ids.shape[0], -1)
    if mask is None:
        valid = torch.ones_like(nll, dtype=torch.bool)
    else:
        valid = ((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).to(nll.device)
    sums = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).double().sum(dim=1)
    return sums.cpu(), valid.sum(dim=1).cpu()


def nll_sums(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Summed next-token NLL (float64) of logits (B, T, V) for ids (B, T), and the tokens scored
    (`nll_rows` summed over the rows)."""
    sums, counts = nll_rows(logits, ids, mask)
    return float(sums.sum()), int(counts.sum())


class BlockRunner:
    """Run `model` block by block over the tokens (input_ids (N, T), attention_mask (N, T) or None).

    `h0`: h_0 (the input of block 0) per batch of `batch_size` rows, on the compute device.
    `run_blocks(hidden, start, stop, skip)`: runs blocks start..stop-1 except `skip` over every
    batch, yielding (b, hidden after block b) after each block run; `hidden` is never changed in
    place. `nll(hidden)`: the summed NLL and the count of scored tokens (as `nll_sums`) of the last
    hidden state. For a streamed model each block run is read from its store once per call;
    for a model in memory the blocks are its own. `model` is never modified.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 8) -> None:
        if input_ids.dim() != 2:
            raise MiPrunError(f"input_ids must be (samples, tokens), got shape {tuple(input_ids.shape)}")
        self.model = model
        self.stream = stream_of(model)
        blocks = find_blocks(model)
        self.blocks = blocks.blocks
        self.n_blocks = len(self.blocks)
        self.shell = pruned_view(model, [])  # private copy: its block list becomes slots
        sb = find_blocks(self.shell)
        setattr(sb.parent, sb.attr, nn.ModuleList([_Slot(i, sb.blocks[i], self) for i in range(self.n_blocks)]))
        try:
            self.device = self.shell.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            self.device = next(p for p in self.shell.parameters() if not p.is_meta).device
        bs = max(1, int(batch_size))
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None]] = [
            (input_ids[s:s + bs].to(self.device),
             None if attention_mask is None else attention_mask[s:s + bs].to(self.device))
            for s in range(0, input_ids.shape[0], bs)]
        self.fmt: int | None = None  # 0: blocks return a tensor; k: a tuple of length k
        self._cached: tuple[int, nn.Module] | None = None
        self._mode = "probe"
        self._record: list[tuple[tuple, dict] | None] = []
        self._inject: torch.Tensor | None = None
        self.calls: list[list[tuple[tuple, dict]]] = []  # per batch, per block: (args, kwargs) without the hidden
        self.h0: list[torch.Tensor] = []
        self.tapped: dict[int, list[torch.Tensor]] = {}
        self._record_calls()

    # -- the recording pass
    def _shell_forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
        with torch.inference_mode():
            return self.shell(input_ids=ids, attention_mask=mask, use_cache=False)

    def _slot(self, i: int, args: tuple, kwargs: dict) -> Any:
        h = _hidden_arg(args, kwargs)
        if self._mode == "inject":
            return self._wrap(self._inject if i == 0 else h)
        if i == 0:
            self._h = h.clone()
        rest_args = (None,) + tuple(args[1:]) if args else ()
        rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self._record.append((rest_args, rest_kwargs))
        if self._mode == "probe" or i == self.n_blocks - 1:
            raise _Stop
        return self._wrap(h)

    def _wrap(self, h: torch.Tensor) -> Any:
        return h if not self.fmt else (h,) + (None,) * (self.fmt - 1)

    def _record_calls(self) -> None:
        # Probe on the first batch: block 0's arguments, then block 0 itself tells the output format.
        ids, mask = self.batches[0]
        self._mode, self._record = "probe", []
        try:
            self._shell_forward(ids, mask)
        except _Stop:
            pass
        if not self._record:
            raise MiPrunError(f"{type(self.model).__name__} never called its first block; this family cannot stream.")
        out = self._call(0, self._h, *self._record[0])
        self.fmt = len(out) if isinstance(out, (tuple, list)) else 0
        self._mode = "record"
        for ids, mask in self.batches:
            self._record = []
            try:
                self._shell_forward(ids, mask)
            except _Stop:
                pass
            if len(self._record) != self.n_blocks:
                raise MiPrunError(f"{type(self.model).__name__} called {len(self._record)} of its "
                                  f"{self.n_blocks} blocks in one forward pass; this family cannot stream.")
            self.calls.append(self._record)
            self.h0.append(self._h)
        self._record, self._mode = [], "inject"

    # -- blocks
    @contextlib.contextmanager
    def _block(self, b: int) -> Iterator[nn.Module]:
        if self.stream is None:
            yield self.blocks[b]
            return
        if self._cached is None or self._cached[0] != b:
            self._cached = None  # drop the previous block before reading the next
            self._cached = (b, self.stream.materialize(self.blocks[b]))
        yield self._cached[1]

    @contextlib.contextmanager
    def _tap(self, b: int, path: str | None) -> Iterator[None]:
        if path is None:
            yield
            return
        got: list[torch.Tensor] = []
        self.tapped[b] = got
        with self._block(b) as block, output_hooks({path: block.get_submodule(path)},
                                                   lambda name, output: got.append(hidden_of(output).clone())):
            yield

    def _call(self, b: int, h: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        with self._block(b) as block, torch.inference_mode():
            if args:
                return block(h, *args[1:], **kwargs)
            return block(hidden_states=h, **kwargs)

    def run_blocks(self, hidden: Sequence[torch.Tensor], start: int = 0, stop: int | None = None,
                   skip: Iterable[int] = (), taps: dict[int, str] | None = None
                   ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Blocks start..stop-1 except `skip`, over every batch; yields (b, outputs of block b).

        taps: {block: dotted path of a submodule}: that submodule's output per batch is kept in
        `self.tapped[block]` (healing reads the MLP output projection this way)."""
        stop = self.n_blocks if stop is None else stop
        if not 0 <= start <= stop <= self.n_blocks:
            raise MiPrunError(f"blocks {start}..{stop - 1} out of range (the model has {self.n_blocks}).")
        skip = {int(s) for s in skip}
        taps = dict(taps or {})
        current = list(hidden)
        for b in range(start, stop):
            if b in skip:
                continue
            out = []
            with self._tap(b, taps.get(b)):
                for k, h in enumerate(current):
                    y = self._call(b, h, *self.calls[k][b])
                    out.append(hidden_of(y))
            current = out
            yield b, current
        if self.stream is not None:
            self._cached = None

    def last(self, hidden: Sequence[torch.Tensor], start: int = 0, skip: Iterable[int] = (), stop: int | None = None,
             taps: dict[int, str] | None = None) -> list[torch.Tensor]:
        """The hidden states after block stop-1 (default: the last), running blocks start.. except `skip`."""
        out = list(hidden)
        for _, result in self.run_blocks(hidden, start, stop, skip, taps):
            out = result
        return out

    def _ensure_head(self) -> None:
        """Read a streamed model's LM head (left on `meta` until logits are needed) into the copy."""
        if self.stream is None:
            return
        try:
            head = self.shell.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return
        w = getattr(head, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_meta:
            head.weight = nn.Parameter(_to(self.stream.real(w, "lm_head"), self.stream.device, self.stream.dtype),
                                       requires_grad=False)

    def logits(self, hidden: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits (B, T, V) per batch from the last hidden state (final norm and head of the family)."""
        self._ensure_head()
        for (ids, mask), h in zip(self.batches, hidden):
            self._inject = h
            try:
                yield self._shell_forward(ids, mask).logits
            finally:
                self._inject = None

    def nll_rows(self, hidden: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: summed next-token NLL and tokens scored (`nll_rows`), from the last hidden
        state of every batch."""
        sums, counts = [], []
        for (ids, mask), logits in zip(self.batches, self.logits(hidden)):
            s, c = nll_rows(logits, ids, mask)
            sums.append(s)
            counts.append(c)
        return torch.cat(sums), torch.cat(counts)

    def nll(self, hidden: Sequence[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token NLL and tokens scored, from the last hidden state of every batch."""
        sums, counts = self.nll_rows(hidden)
        return float(sums.sum()), int(counts.sum())


__all__ = ["STREAM_ATTR", "BlockRunner", "SafetensorsStore", "Stream", "TensorStore", "from_store", "is_streamed",
           "nll_rows", "nll_sums", "offload_hook", "offload_to_cpu", "open_streamed", "real_value", "real_values",
           "replace_offloaded", "skeleton", "stream_of", "streamed_state_dict"]
