"""Capture the hidden states h_0..h_L of every block on calibration tokens, in bounded memory.

h_0 is the input of block 0 (the embeddings), h_{b+1} the output of block b, h_L the output of the
last block before the final norm. Every token position is one sample of the random vector h_b.
Before any forward pass a seeded subsample of m positions is drawn (padding excluded, the first
position optionally dropped); the hooks copy only those rows, the same rows in every layer, so any
two layers form paired samples and the capture holds (L+1, m, d) floats whatever the calibration
size. The forward pass stops after the last block (final norm and LM head are skipped).

Hooks come from `mi_prun.models.hooks.block_hooks`, a context manager that removes them in
`finally`: an exception or Ctrl-C leaves the model without hooks. By default they go on a weight-sharing
structural copy, never on the caller's (possibly shared) model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from mi_prun.errors import MiPrunError, NonFiniteError
from mi_prun.models.blocks import find_blocks, input_device
from mi_prun.models.hooks import block_hooks, run_until_stop
from mi_prun.models.surgery import pruned_view
from mi_prun.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """Paired samples of every layer's hidden state."""

    hidden: torch.Tensor  # (L+1, m, d) float32: hidden[b] are samples of h_b
    sample_index: torch.Tensor  # (m,) long: calibration sample each position came from
    position: torch.Tensor  # (m,) long: token position within its sample
    n_samples: int
    seq_len: int
    drop_first: bool
    seed: int
    seconds: float
    tokens_seen: int

    @property
    def n_blocks(self) -> int:
        return self.hidden.shape[0] - 1

    @property
    def m(self) -> int:
        return self.hidden.shape[1]

    def info(self) -> dict:
        return {"positions_kept": self.m, "drop_first": self.drop_first, "capture_seed": self.seed,
                "tokens_seen": self.tokens_seen, "hidden_size": int(self.hidden.shape[2])}


def choose_positions(attention_mask: torch.Tensor, m: int, drop_first: bool, seed: int) -> torch.Tensor:
    """(k, 2) long [sample, position] rows, k = min(m, valid positions), sorted, seeded.

    Padding (mask 0) is excluded; with `drop_first`, so is each sample's first real token, which
    carries the attention-sink activations of most LLMs.
    """
    valid = attention_mask.bool().clone()
    if drop_first:
        first = valid.int().argmax(dim=1)  # first real token per sample (left or right padding)
        valid[torch.arange(valid.shape[0]), first] = False
    rows = valid.nonzero()  # (K, 2), row-major order
    if rows.shape[0] == 0:
        raise MiPrunError("no token positions left to capture (samples too short). Fix: use longer samples.")
    if rows.shape[0] > m:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(rows.shape[0], generator=gen)[:m].sort().values
        rows = rows[pick]
    return rows


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            max_positions: int = 4096, drop_first: bool = True, seed: int = 0, batch_size: int = 8,
            storage_device: str | torch.device | None = None, progress: Progress | None = None,
            check_finite: bool = True, isolate: bool = True) -> Capture:
    """Run the calibration tokens through `model` and keep m paired samples of h_0..h_L.

    input_ids, attention_mask: (N, T). max_positions: m, the number of token positions kept
    (all valid ones if fewer). storage_device: where samples live (default: where each block's
    output is, i.e. the GPU when the model is on one). NaN/inf in a block's output raises
    `NonFiniteError` naming the block. The model is not modified; it must be in eval mode.
    isolate: hook a structural copy that shares the weights (`prune.pruned_view(model, [])`,
    about 0.2 s for a 135M model) instead of `model` itself, so that other threads running the
    same shared model (app sessions) never fire this capture's hooks.
    """
    if input_ids.dim() != 2:
        raise MiPrunError(f"input_ids must be (samples, tokens), got shape {tuple(input_ids.shape)}")
    if max_positions <= 0 or batch_size <= 0:
        raise MiPrunError(f"max_positions and batch_size must be positive (got {max_positions}, {batch_size}).")
    if model.training:
        log.warning("capturing from a model in training mode: dropout makes the capture noisy")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if isolate:
        model = pruned_view(model, [])
    n_samples, seq_len = input_ids.shape
    blocks = find_blocks(model).blocks
    n_layers = len(blocks)
    rows = choose_positions(attention_mask, max_positions, drop_first, seed)
    m = rows.shape[0]
    in_device = input_device(model)
    store: torch.Tensor | None = None  # (L+1, m, d), allocated on the first hook call
    store_device = torch.device(storage_device) if storage_device is not None else None
    # Per batch: which rows of the capture come from this batch, and where they sit in it.
    state: dict = {}

    def put(layer: int, hs: torch.Tensor) -> None:
        nonlocal store
        if check_finite and not torch.isfinite(hs).all():
            where = "the embeddings (input of block 0)" if layer == 0 else f"block {layer - 1}"
            raise NonFiniteError(
                f"NaN or inf in the hidden states after {where} (dtype {hs.dtype}). Fix: retry with "
                "dtype float32 (--dtype float32); half precision overflows in some models.",
                block=None if layer == 0 else layer - 1)
        if store is None:
            dev = store_device or hs.device
            store = torch.empty((n_layers + 1, m, hs.shape[-1]), dtype=torch.float32, device=dev)
        sel = hs[state["local_sample"].to(hs.device), state["local_pos"].to(hs.device)]
        store[layer, state["dst"].to(store.device)] = sel.to(device=store.device, dtype=torch.float32)

    t0 = time.perf_counter()
    tokens_seen = 0
    n_batches = (n_samples + batch_size - 1) // batch_size
    with block_hooks(model, on_input=lambda hs: put(0, hs), on_output=lambda b, hs: put(b + 1, hs)):
        for k, start in enumerate(range(0, n_samples, batch_size)):
            stop = min(start + batch_size, n_samples)
            in_batch = (rows[:, 0] >= start) & (rows[:, 0] < stop)
            dst = in_batch.nonzero().squeeze(1)
            if dst.numel() == 0:
                continue
            state.update(dst=dst, local_sample=rows[dst, 0] - start, local_pos=rows[dst, 1])
            ids = input_ids[start:stop].to(in_device)
            mask = attention_mask[start:stop].to(in_device)
            run_until_stop(model, input_ids=ids, attention_mask=mask, use_cache=False)
            tokens_seen += int(mask.sum())
            if progress:
                progress("capture", (k + 1) / n_batches, f"batch {k + 1}/{n_batches}")
    assert store is not None
    return Capture(hidden=store, sample_index=rows[:, 0].clone(), position=rows[:, 1].clone(),
                   n_samples=n_samples, seq_len=seq_len, drop_first=drop_first, seed=seed,
                   seconds=time.perf_counter() - t0, tokens_seen=tokens_seen)
