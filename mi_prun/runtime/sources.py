"""Weight sources: where a model's weights live, behind one interface that every forward pass uses.

A model's weights are in one of three places, chosen once by `load_model` and never asked about
outside this package:
- `ResidentSource`: every tensor is real, on the compute device (or the CPU): a block is ready as it is;
- `StreamedSource`: the model is a skeleton on the `meta` device; block weights stay in safetensors
  files (`SafetensorsStore`) or in CPU memory (`TensorStore`) and one block at a time is materialised
  on the compute device while it runs (SparseGPT / SLEB style, models larger than the device);
- `DispatchedSource`: accelerate placed the model with a device map; its hooks move (or read from an
  offload folder) each module's weights when it runs, so a block is ready as it is too.

`weight_source(model)` gives the source of a model or of any pruned view of it (views share the
tensors, and a streamed model's `Stream` travels with its views). Each source answers: a ready block
for block b (`block`), a tensor's real value (`value`, `values`), giving a module real tensors before
healing folds into it and serving the folded ones afterwards (`materialize`, `replaced`), the state dict
for export one block at a time (`state_items`), and writing the model (`save`). `describe()` is what
results record of where the weights really were.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from mi_prun.errors import MiPrunError
from mi_prun.models.accept import as_module
from mi_prun.models.blocks import find_blocks, num_layers_of
from mi_prun.runtime.saving import save_items
from mi_prun.models.skeleton import is_tied_output, moved, named_tensors, retie, set_tensor, skeleton

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
        named = list(named_tensors(module))
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
                done[id(t)] = moved(value, self.device, self.dtype if is_param or t.is_meta else None)
            set_tensor(new, name, done[id(t)], is_param)
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


def _stream_of(model: Any) -> Stream | None:
    """The `Stream` of a streamed model (or of a view of one), else None."""
    found = getattr(model, STREAM_ATTR, None)
    return found if isinstance(found, Stream) else None


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
    for name, t, _ in named_tensors(model):
        if not t.is_meta or id(t) in keys:
            continue
        key = _store_key(name, store, base, renamed)
        if key is not None:
            keys[id(t)] = key
        elif not _in_block(name, prefix) and is_tied_output(model, name):
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
    rest = [(n, t, p) for n, t, p in named_tensors(model) if not _in_block(n, prefix) and t is not head]
    need = sorted({keys[id(t)] for _, t, _ in rest if t.is_meta and id(t) in keys})
    loaded = store.get(need) if need else {}
    done: dict[int, torch.Tensor] = {}
    for name, t, is_param in rest:
        if t.is_meta and id(t) not in keys:
            continue
        if id(t) not in done:
            value = loaded[keys[id(t)]] if t.is_meta else t
            done[id(t)] = moved(value, device, dtype if is_param or t.is_meta else None)
        set_tensor(model, name, done[id(t)], is_param)
    retie(model)
    still = [n for n, t, _ in named_tensors(model) if t.is_meta and not _in_block(n, prefix) and t is not head]
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
    stream = _stream_of(model)
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




# ---------------------------------------------------------------------------------------- sources


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` with a device map (its modules carry accelerate's hooks)."""
    return bool(getattr(model, "hf_device_map", None)) or any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules())


class ResidentSource:
    """Every weight is real, where the model put it: a block is ready as it is."""

    kind = "resident"

    def __init__(self, model: nn.Module) -> None:
        emb = _input_embeddings(model)
        params = list(emb.parameters()) if emb is not None else []
        params = params or [p for p in model.parameters() if not p.is_meta]
        self.device = params[0].device if params else torch.device("cpu")

    @contextlib.contextmanager
    def block(self, block: nn.Module) -> Iterator[nn.Module]:
        yield block

    def drop_cached(self) -> None:
        """Forget a materialised block (nothing to forget: the blocks are the model's own)."""

    def chunk_rows(self, n_rows: int, batch_size: int) -> int:
        """How many rows to run through all blocks at once: one batch (memory stays bounded)."""
        return batch_size

    @property
    def runs_whole_model(self) -> bool:
        """Whether the model's own forward (generation with a KV cache) can run."""
        return True

    def value(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            raise MiPrunError(f"{name} is on the meta device, and the model's weights are neither streamed nor "
                              "placed by accelerate. Fix: load the model with mi_prun.load_model.")
        return tensor

    def values(self, model: nn.Module, name: str, tensor: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        flat = self.value(model, name, tensor).detach().reshape(-1)
        return flat[flat_index.to(flat.device)]

    def head_weight(self, model: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """The real LM head weight for a runner whose head `weight` is on `meta`, on the compute
        device; None where the model's own forward serves it (real here; accelerate's hook brings
        a dispatched head's weight when the head runs)."""
        return None

    def materialize(self, model: nn.Module, module_name: str) -> list[str]:
        """Give `module_name`'s own parameters real tensors on the compute device before a fold;
        returns those it replaced (none here: they are real)."""
        return []

    def replaced(self, model: nn.Module, module_name: str, names: Iterable[str]) -> None:
        """Serve `module_name`'s new parameters `names` (set on the module by a fold) from now on."""

    def state_items(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, real tensor) of every entry of `model.state_dict()`."""
        for name, t in model.state_dict().items():
            yield name, t.detach()

    def save(self, model: nn.Module, folder: Path, max_shard_size: str) -> None:
        """Write `model` as a folder `from_pretrained` loads (safetensors shards, config)."""
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)

    def describe(self) -> dict[str, Any]:
        return {"weights": self.kind, "weights_at": self.device.type, "streamed": False}


class DispatchedSource(ResidentSource):
    """accelerate placed the model with a device map: its hooks bring each module's weights to the
    module's execution device (from the CPU or an offload folder on disk) when it runs."""

    kind = "dispatched"

    def __init__(self, model: nn.Module) -> None:
        emb = _input_embeddings(model)
        hook = getattr(emb, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is None:
            super().__init__(model)
        else:
            self.device = torch.device(device)
        self.device_map = dict(getattr(model, "hf_device_map", None) or {})

    def value(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor
        found = offload_hook(model, name)
        if found is None:
            raise MiPrunError(f"{name} is on the meta device and accelerate's device map does not serve it. Fix: "
                              "load the model again; a module without weights cannot run.")
        hook, key = found
        return hook.weights_map[key]

    def materialize(self, model: nn.Module, module_name: str) -> list[str]:
        module = model.get_submodule(module_name)
        done = []
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}"
            found = offload_hook(model, full) if p.is_meta else None
            if found is not None:
                value = self.value(model, full, p).to(getattr(found[0], "execution_device", None) or "cpu")
                module._parameters[pname] = nn.Parameter(value, requires_grad=False)
                done.append(pname)
        return done

    def replaced(self, model: nn.Module, module_name: str, names: Iterable[str]) -> None:
        # accelerate serves an offloaded module's weights from its map (and puts the module's tensors
        # back on `meta` after each forward): the map must hold the new ones
        module = model.get_submodule(module_name)
        for pname in names:
            replace_offloaded(model, f"{module_name}.{pname}", getattr(module, pname))

    def describe(self) -> dict[str, Any]:
        places = sorted({str(v) for v in self.device_map.values()})
        return {"weights": self.kind, "weights_at": ", ".join(places) or self.device.type,
                "streamed": False, "device_map": {k: str(v) for k, v in self.device_map.items()}}


class StreamedSource:
    """A skeleton on `meta` whose blocks are read from a store one at a time onto the compute device.

    `block(b)` materialises the block (the last one stays cached until another is asked for, or
    `drop_cached`), so running all batches through one block reads its weights once."""

    kind = "streamed"

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.device = stream.device
        self._cached: tuple[int, nn.Module] | None = None

    @contextlib.contextmanager
    def block(self, block: nn.Module) -> Iterator[nn.Module]:
        if self._cached is None or self._cached[0] != id(block):
            self._cached = None  # drop the previous block before reading the next
            self._cached = (id(block), self.stream.materialize(block))
        yield self._cached[1]

    def drop_cached(self) -> None:
        self._cached = None

    def chunk_rows(self, n_rows: int, batch_size: int) -> int:
        """Every row at once: each block is read from the store once per pass."""
        return max(n_rows, 1)

    runs_whole_model = False

    def value(self, model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.stream.real(tensor, name)

    def values(self, model: nn.Module, name: str, tensor: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Read only the values asked for (identity samples a few: never a whole LM head in memory)."""
        if tensor.is_meta and isinstance(self.stream.store, SafetensorsStore) and id(tensor) in self.stream.keys \
                and tensor.dim() >= 1:
            return self.stream.store.values(self.stream.keys[id(tensor)], flat_index)
        flat = self.value(model, name, tensor).detach().reshape(-1)
        return flat[flat_index.to(flat.device)]

    def head_weight(self, model: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """The head is read from the store once, when logits are first needed."""
        return self.value(model, "lm_head", weight).to(device=self.device, dtype=self.stream.dtype)

    def materialize(self, model: nn.Module, module_name: str) -> list[str]:
        module = model.get_submodule(module_name)
        done = []
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = self.stream.real(p, f"{module_name}.{pname}").to(device=self.device, dtype=self.stream.dtype)
                module._parameters[pname] = nn.Parameter(value, requires_grad=False)
                done.append(pname)
        return done

    def replaced(self, model: nn.Module, module_name: str, names: Iterable[str]) -> None:
        """Nothing to do: a block's real tensors are used as they are when it is materialised."""

    def state_items(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return streamed_state_dict(model)

    def save(self, model: nn.Module, folder: Path, max_shard_size: str) -> None:
        save_items(model, folder, self.state_items(model), self.stream.dtype, max_shard_size)

    def describe(self) -> dict[str, Any]:
        at = "disk" if isinstance(self.stream.store, SafetensorsStore) else "cpu"
        return {"weights": self.kind, "weights_at": at, "streamed": True, "compute_device": str(self.device)}


WeightSource = ResidentSource | DispatchedSource | StreamedSource


def weight_source(model: Any) -> WeightSource:
    """Where the weights of `model` (a module, or a pruned view of one) live: the one place that tells."""
    stream = _stream_of(model)
    if stream is not None:
        return StreamedSource(stream)
    if _dispatched(model):
        return DispatchedSource(model)
    return ResidentSource(model)


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device the input embeddings run on."""
    return weight_source(model).device


def check_runnable(model: Any, what: str = "the model") -> None:
    """Refuse, in one line naming the fix, a model a forward pass would not run as reported:
    weights on the `meta` device with no weight source to bring them in (an empty skeleton: neither
    streamed by mi-prun nor dispatched by accelerate), or a block list of another length than the
    config's block count (many families run `layers[:num_hidden_layers]`, so a config changed after
    loading would run fewer blocks, and report the others as MI 0)."""
    module = as_module(model, what)
    if weight_source(module).kind == "resident":
        meta = next((name for name, p in module.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise MiPrunError(f"{what} has its weights on the meta device ({meta}, ...): an empty skeleton with "
                              "nothing to run. Fix: load it with mi_prun.load_model(spec) (use stream=True or a "
                              "device_map for a model larger than memory).")
    config = getattr(module, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_config = num_layers_of(text) if text is not None else None
    n_config = n_config if n_config is not None or config is None else num_layers_of(config)
    if n_config is None:
        return
    n_blocks = len(find_blocks(module))
    if n_config != n_blocks:
        raise MiPrunError(f"{what} holds {n_blocks} blocks but its config says {n_config}: a forward pass would "
                          f"run {min(n_config, n_blocks)} of them, not what is reported (was the config changed "
                          "after loading?). Fix: change the blocks with mi_prun.prune / pruned_view, which keep "
                          "the config in step, or load the model again.")


def require_whole_model(model: nn.Module, what: str) -> None:
    """Refuse `what` (generation, speed) on a model whose blocks stream: it needs the whole model at hand."""
    if not weight_source(model).runs_whole_model:
        raise MiPrunError(f"{what} needs the model in memory, and this one streams its blocks from disk or the "
                          "CPU. Fix: load it without --stream (with --device-map to spread it over devices).")


__all__ = ["DispatchedSource", "ResidentSource", "SafetensorsStore", "Stream", "StreamedSource", "TensorStore",
           "WeightSource", "check_runnable", "from_store", "input_device", "offload_hook", "offload_to_cpu", "open_streamed",
           "replace_offloaded", "require_whole_model", "streamed_state_dict", "weight_source"]
