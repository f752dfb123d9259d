"""Capture the hidden states h_0..h_L of every block on calibration tokens, in bounded memory.

h_0 is the input of block 0 (the embeddings), h_{b+1} the output of block b, h_L the output of the
last block before the final norm. Every token position is one sample of the random vector h_b.
Before any forward pass a seeded subsample of m positions is drawn (padding excluded, the first
position optionally dropped); only those rows are copied, the same rows in every layer, so any
two layers form paired samples and the capture holds (L+1, m, d) floats whatever the calibration
size. The pass stops after the last block (final norm and LM head are skipped).

The blocks run through the one block runner (`mi_prun.runtime.runner`) on its private structural
copy, so no hook is ever put on the caller's (possibly shared) model, whichever weight source holds
the weights (in memory a batch at a time; streamed, every batch through one block at a time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from mi_prun.errors import MiPrunError, NonFiniteError
from mi_prun.models.accept import as_module, check_token_ids
from mi_prun.models.blocks import find_blocks
from mi_prun.progress import Progress
from mi_prun.runtime.runner import chunks

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
    isolate: kept for callers of earlier versions; the runner always works on a private
    weight-sharing copy, so other threads running the same model are never disturbed.
    """
    model = as_module(model)
    input_ids = check_token_ids(input_ids, model)
    if input_ids.dim() != 2:
        raise MiPrunError(f"input_ids must be (samples, tokens), got shape {tuple(input_ids.shape)}")
    if max_positions <= 0 or batch_size <= 0:
        raise MiPrunError(f"max_positions and batch_size must be positive (got {max_positions}, {batch_size}).")
    if model.training:
        log.warning("capturing from a model in training mode: dropout makes the capture noisy")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n_samples, seq_len = input_ids.shape
    n_layers = len(find_blocks(model).blocks)
    rows = choose_positions(attention_mask, max_positions, drop_first, seed)
    m = rows.shape[0]
    store: torch.Tensor | None = None  # (L+1, m, d), allocated on the first block output
    store_device = torch.device(storage_device) if storage_device is not None else None

    def put(layer: int, hs: torch.Tensor, where: dict[str, torch.Tensor]) -> None:
        nonlocal store
        if check_finite and not torch.isfinite(hs).all():
            at = "the embeddings (input of block 0)" if layer == 0 else f"block {layer - 1}"
            raise NonFiniteError(
                f"NaN or inf in the hidden states after {at} (dtype {hs.dtype}). Fix: retry with "
                "dtype float32 (--dtype float32); half precision overflows in some models.",
                block=None if layer == 0 else layer - 1)
        if store is None:
            dev = store_device or hs.device
            store = torch.empty((n_layers + 1, m, hs.shape[-1]), dtype=torch.float32, device=dev)
        sel = hs[where["local_sample"].to(hs.device), where["local_pos"].to(hs.device)]
        store[layer, where["dst"].to(store.device)] = sel.to(device=store.device, dtype=torch.float32)

    t0 = time.perf_counter()
    # The runner's chunks (`mi_prun.runtime`): a batch at a time through every block when the blocks
    # are at hand, every batch through one block at a time when they stream from a store.
    for first, runner in chunks(model, input_ids, attention_mask, batch_size):
        per_batch = []
        for group in runner.groups:
            lo, hi = first + group[0], first + group[-1] + 1
            dst = ((rows[:, 0] >= lo) & (rows[:, 0] < hi)).nonzero().squeeze(1)
            per_batch.append({"dst": dst, "local_sample": rows[dst, 0] - lo, "local_pos": rows[dst, 1]})
        keep = [k for k, where in enumerate(per_batch) if where["dst"].numel()]
        if not keep:
            continue

        hidden = [runner.h0[k] for k in keep]
        for k, hs in zip(keep, hidden):
            put(0, hs, per_batch[k])
        chunk_end = first + sum(len(g) for g in runner.groups)
        for b, hidden in runner.run_blocks(hidden, batches=keep):
            for k, hs in zip(keep, hidden):
                put(b + 1, hs, per_batch[k])
            if progress:
                done = (first + (chunk_end - first) * (b + 1) / n_layers) / n_samples
                progress("capture", done, f"block {b + 1}/{n_layers}, sample {chunk_end}/{n_samples}")
    tokens_seen = int(attention_mask.sum())
    assert store is not None
    return Capture(hidden=store, sample_index=rows[:, 0].clone(), position=rows[:, 1].clone(),
                   n_samples=n_samples, seq_len=seq_len, drop_first=drop_first, seed=seed,
                   seconds=time.perf_counter() - t0, tokens_seen=tokens_seen)
