"""The one block runner behind every forward pass: embeddings -> blocks start..stop skipping a set -> head.

Capture, perplexity, the verified search's prefix-cached scoring, the task scorer, healing
statistics, zero-shot evaluation and export's checks all run a model through `BlockRunner`, whichever
weight source holds the weights (`mi_prun.runtime.sources`): the runner asks the source for a ready
block (`source.block`), and a streamed block is read from its store once per call over all batches.

How it stays generic across families: the model's own forward computes everything a block needs
(rotary position embeddings, causal / sliding-window masks, ALiBi, position ids). The runner runs
that forward once per batch on a private structural copy whose blocks are *slots*: a slot records
the (args, kwargs) its block would have been called with and hands the hidden states through, so
no block weight is touched. Blocks are then called directly with the recorded arguments, block by
block over the batches. The tail (final norm, LM head, logit soft-capping) is the same forward with
slot 0 handing in the last hidden state. A family whose forward does anything between blocks other
than pass the hidden state on fails in one line naming it.

- `BlockRunner(model, input_ids, attention_mask, batch_size)`: `h0` (h_0 per batch),
  `run_blocks(hidden, start, stop, skip, taps, batches)` (yields the output of every block run),
  `logits` / `nll_rows` (final norm, LM head, next-token NLL), `load(ids, mask)` (new tokens, same
  private copy);
- `PrefixStates` / `runner.prefix(starts)`: one dense pass keeps h_b at every block a removed set may
  start at; `runner.rows_without(removed, prefix, batches)` starts there (the prefix cache), or
  further on from a partial run that removed the same blocks so far (`RunStates`, below);
- `token_nll_rows(model, ids, mask, ...)`: per-row NLL over any number of rows, in chunks the
  weight source chooses (a batch at a time in memory; all rows per block when streamed);
- `logits_fn(model)`: a function (ids, mask) -> logits for callers that bring their own batches.

Memory: the hidden states of the rows in flight (N x T x d) and the recorded block arguments
(masks and position embeddings, shared across blocks), plus one materialised block when streamed,
plus the logits of the rows scored at once (at most `BlockRunner.HEAD_BYTES` where a row fits).
Blocks are numbered from 0. The model is never modified.
"""

from __future__ import annotations

import contextlib

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import find_blocks
from mi_prun.models.hooks import hidden_of, output_hooks
from mi_prun.models.surgery import pruned_view
from mi_prun.progress import Progress
from mi_prun.runtime.loss import nll_rows
from mi_prun.runtime.sources import WeightSource, require_whole_model, weight_source


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
        raise MiPrunError("cannot find the hidden states a block is called with; this family cannot run "
                          "block by block.")
    return h


class RunStates:
    """Hidden states of earlier runs with blocks removed, for later sets that remove the same blocks
    up to a point: the input of block b in batch k of a run that removed `pattern` (the removed
    blocks below b) is the input of block b of *every* set whose removed blocks below b are
    `pattern`, so such a set starts at b instead of at its first removed block. The verified search
    proposes exactly such sets: an exchange's trials are one base set plus one block each, its
    put-back sets and the swaps are the best set with one block changed. The states are the same
    tensors a fresh run would compute (same batch, same calls), so an NLL never depends on them;
    only the work does.

    Kept most recently used first within `max_bytes` (0: nothing is kept); `find` returns the
    deepest state a set can start from. `hits` counts the batches that started from one,
    `blocks_saved` the block calls (per batch) they skipped.
    """

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.hits = 0
        self.blocks_saved = 0
        self._states: OrderedDict[tuple[tuple[int, ...], int, int], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def find(self, removed: Sequence[int], first: int, stop: int, k: int) -> tuple[int, torch.Tensor] | None:
        """(b, input of block b in batch k) for the deepest b in first+1..stop-1 a kept run shares
        with `removed` (sorted), or None."""
        for b in range(stop - 1, first, -1):
            key = (tuple(r for r in removed if r < b), b, k)
            h = self._states.get(key)
            if h is not None:
                self._states.move_to_end(key)
                self.hits += 1
                self.blocks_saved += sum(1 for x in range(first, b) if x not in removed)
                return b, h
        return None

    def put(self, removed: Sequence[int], b: int, k: int, h: torch.Tensor) -> None:
        """Keep `h`, the input of block b in batch k of a run without `removed` (sorted)."""
        if self.max_bytes <= 0:
            return
        key = (tuple(r for r in removed if r < b), b, k)
        if key in self._states:
            self._states.move_to_end(key)
            return
        size = h.numel() * h.element_size()
        if size > self.max_bytes:
            return
        self._states[key] = h
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


@dataclass
class PrefixStates:
    """The dense model's hidden states at the blocks a removed set may start at: {b: [h_b per batch]}
    (h_b is the input of block b), and the dense model's per-sample NLL. A set whose first removed
    block is b runs from h_b; blocks before b are never run again. `runs` keeps states of the
    removed sets' own runs (`RunStates`), within as many bytes as the dense states take (so the
    cache at most doubles), unless the runner was asked for none."""

    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    dense_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    runs: RunStates = field(default_factory=RunStates)
    want: set[int] = field(default_factory=set)  # the blocks whose states it keeps (or will, when lazy)
    # a lazy prefix (`BlockRunner.prefix(dense=False)`): the dense pass so far, (block, its input per
    # batch); `rows_without` runs it on to the first removed block a set needs, never further
    reached: tuple[int, list[torch.Tensor]] | None = None


class BlockRunner:
    """Run `model` block by block over tokens (input_ids (N, T), attention_mask (N, T) or None).

    `h0`: h_0 (the input of block 0) per batch of `batch_size` rows, on the compute device.
    `run_blocks(hidden, start, stop, skip)`: runs blocks start..stop-1 except `skip` over the
    batches, yielding (b, hidden after block b) after each block run; `hidden` is never changed in
    place. `batches` (indices into the batch list) restricts a call to some batches; `hidden` then
    holds those batches' states in that order. `model` is never modified.
    """

    # the logits of one head call (rows scored together) stay within this many bytes (`nll_rows`)
    HEAD_BYTES = 256 << 20

    def __init__(self, model: nn.Module, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, batch_size: int = 8) -> None:
        self.model = model
        self.source: WeightSource = weight_source(model)
        self.device = self.source.device
        self.blocks = find_blocks(model).blocks
        self.n_blocks = len(self.blocks)
        self.batch_size = max(1, int(batch_size))
        self.shell = pruned_view(model, [])  # private copy: its block list becomes slots
        sb = find_blocks(self.shell)
        setattr(sb.parent, sb.attr, nn.ModuleList([_Slot(i, sb.blocks[i], self) for i in range(self.n_blocks)]))
        self.fmt: int | None = None  # 0: blocks return a tensor; k: a tuple of length k
        self._mode = "probe"
        self._record: list[tuple[tuple, dict]] = []
        self._inject: torch.Tensor | None = None
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.calls: list[list[tuple[tuple, dict]]] = []  # per batch, per block: (args, kwargs) without the hidden
        self.h0: list[torch.Tensor] = []
        self.tapped: dict[int, list[torch.Tensor]] = {}
        self.work = 0  # token-block units `rows_without` really ran (tokens x (blocks run + the head))
        if input_ids is not None:
            self.load(input_ids, attention_mask)

    # -- tokens and the recording pass
    def load(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BlockRunner:
        """Record the block calls of new tokens (the private copy is kept); returns self."""
        if input_ids.dim() != 2:
            raise MiPrunError(f"input_ids must be (samples, tokens), got shape {tuple(input_ids.shape)}")
        bs = self.batch_size
        self.batches = [(input_ids[s:s + bs].to(self.device),
                         None if attention_mask is None else attention_mask[s:s + bs].to(self.device))
                        for s in range(0, input_ids.shape[0], bs)]
        self.calls, self.h0, self.tapped = [], [], {}
        self._record_calls()
        return self

    @property
    def groups(self) -> list[list[int]]:
        """The row indices of each batch."""
        out, start = [], 0
        for ids, _ in self.batches:
            out.append(list(range(start, start + ids.shape[0])))
            start += ids.shape[0]
        return out

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
        if self.fmt is None:  # probe on the first batch: block 0's arguments, then its output format
            ids, mask = self.batches[0]
            self._mode, self._record = "probe", []
            try:
                self._shell_forward(ids, mask)
            except _Stop:
                pass
            if not self._record:
                raise MiPrunError(f"{type(self.model).__name__} never called its first block; this family cannot "
                                  "run block by block.")
            out = self._call(0, self._h, *self._record[0])
            self.fmt = len(out) if isinstance(out, (tuple, list)) else 0
        self._mode = "record"
        try:
            for ids, mask in self.batches:
                self._record = []
                try:
                    self._shell_forward(ids, mask)
                except _Stop:
                    pass
                if len(self._record) != self.n_blocks:
                    raise MiPrunError(f"{type(self.model).__name__} called {len(self._record)} of its "
                                      f"{self.n_blocks} blocks in one forward pass; this family cannot run block "
                                      "by block.")
                self.calls.append(self._record)
                self.h0.append(self._h)
        finally:
            self._record, self._mode = [], "inject"

    # -- blocks
    def _tap(self, block: nn.Module, b: int, path: str | None) -> Any:
        if path is None:
            return contextlib.nullcontext()
        got: list[torch.Tensor] = []
        self.tapped[b] = got
        return output_hooks({path: block.get_submodule(path)}, lambda name, output: got.append(hidden_of(output).clone()))

    def _call(self, b: int, h: torch.Tensor, args: tuple, kwargs: dict, block: nn.Module | None = None) -> Any:
        with torch.inference_mode():
            if block is None:
                with self.source.block(self.blocks[b]) as ready:
                    return self._call(b, h, args, kwargs, ready)
            if args:
                return block(h, *args[1:], **kwargs)
            return block(hidden_states=h, **kwargs)

    def _which(self, batches: Sequence[int] | None) -> list[int]:
        return list(range(len(self.batches))) if batches is None else [int(k) for k in batches]

    def run_blocks(self, hidden: Sequence[torch.Tensor], start: int = 0, stop: int | None = None,
                   skip: Iterable[int] = (), taps: dict[int, str] | None = None,
                   batches: Sequence[int] | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Blocks start..stop-1 except `skip`, over the batches; yields (b, outputs of block b).

        taps: {block: dotted path of a submodule}: that submodule's output per batch is kept in
        `self.tapped[block]` (healing reads the MLP output projection this way)."""
        stop = self.n_blocks if stop is None else stop
        if not 0 <= start <= stop <= self.n_blocks:
            raise MiPrunError(f"blocks {start}..{stop - 1} out of range (the model has {self.n_blocks}).")
        which = self._which(batches)
        if len(hidden) != len(which):
            raise MiPrunError(f"{len(hidden)} hidden states for {len(which)} batches.")
        skip = {int(s) for s in skip}
        taps = dict(taps or {})
        current = list(hidden)
        try:
            for b in range(start, stop):
                if b in skip:
                    continue
                out = []
                with self.source.block(self.blocks[b]) as block, self._tap(block, b, taps.get(b)):
                    for k, h in zip(which, current):
                        out.append(hidden_of(self._call(b, h, *self.calls[k][b], block=block)))
                current = out
                yield b, current
        finally:
            self.source.drop_cached()

    def last(self, hidden: Sequence[torch.Tensor], start: int = 0, skip: Iterable[int] = (), stop: int | None = None,
             taps: dict[int, str] | None = None, batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The hidden states after block stop-1 (default: the last), running blocks start.. except `skip`."""
        out = list(hidden)
        for _, result in self.run_blocks(hidden, start, stop, skip, taps, batches):
            out = result
        return out

    def _ensure_head(self) -> None:
        """Give the private copy a real LM head where the source left it on `meta` until logits are needed."""
        try:
            head = self.shell.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return
        w = getattr(head, "weight", None)
        value = self.source.head_weight(self.model, w) if isinstance(w, torch.Tensor) and w.is_meta else None
        if value is not None:
            head.weight = nn.Parameter(value, requires_grad=False)

    def logits(self, hidden: Sequence[torch.Tensor], batches: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Logits (B, T, V) per batch from the last hidden state (final norm and head of the family)."""
        self._ensure_head()
        for k, h in zip(self._which(batches), hidden):
            yield self._head(h, *self.batches[k])

    def _head(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self._inject = h
        try:
            return self._shell_forward(ids, mask).logits
        finally:
            self._inject = None

    def _head_rows(self, tokens: int) -> int:
        """Rows whose logits (tokens x vocabulary float32 values each) fit in HEAD_BYTES, at least 1."""
        vocab = getattr(self.shell.config, "vocab_size", None)
        try:
            head = self.shell.get_output_embeddings()
            vocab = int(getattr(head, "out_features", None) or vocab)
        except (AttributeError, NotImplementedError, TypeError):
            pass
        if not vocab:
            return 1 << 30
        return max(1, self.HEAD_BYTES // (int(tokens) * int(vocab) * 4))

    def nll_rows(self, hidden: Sequence[torch.Tensor], batches: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed next-token NLL (float64) and tokens scored (`loss.nll_rows`), from the last
        hidden state of the batches. The head runs on as many rows at a time as keep their logits within
        HEAD_BYTES (a 262,144-word head's logits are 268 MB per row of 256 tokens), so scoring never
        holds a whole batch's logits and their log-softmax; the per-row numbers are the same."""
        self._ensure_head()
        sums, counts = [], []
        for k, h in zip(self._which(batches), hidden):
            ids, mask = self.batches[k]
            step = self._head_rows(ids.shape[1])
            for r in range(0, int(ids.shape[0]), step):
                part = slice(r, r + step)
                m = None if mask is None else mask[part]
                s, c = nll_rows(self._head(h[part], ids[part], m), ids[part], m)
                sums.append(s)
                counts.append(c)
        return torch.cat(sums), torch.cat(counts)

    def nll(self, hidden: Sequence[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token NLL and tokens scored, from the last hidden state of every batch."""
        sums, counts = self.nll_rows(hidden)
        return float(sums.sum()), int(counts.sum())

    # -- the prefix cache
    def prefix(self, starts: Iterable[int], keep_runs: bool = True, dense: bool = True) -> PrefixStates:
        """One dense pass over every batch keeping h_b for each b in `starts` (and the dense NLL);
        with `keep_runs`, `rows_without` keeps its own runs' states too (`RunStates`). With `dense`
        False the prefix is lazy: no block runs here and no dense NLL is computed; `rows_without`
        runs the dense blocks on demand, only as deep as the first removed block of a set it scores
        (the confirmation's draw B needs the states at its few finalists' first blocks, not a whole
        dense pass and its head)."""
        want = {int(b) for b in starts if 1 <= int(b) < self.n_blocks}
        pre = PrefixStates(want=want)
        if dense:
            hidden = self.h0
            for b, hidden in self.run_blocks(self.h0):
                if b + 1 in want:
                    pre.states[b + 1] = hidden
            pre.dense_rows = self.nll_rows(hidden)
            size = sum(h.numel() * h.element_size() for hs in pre.states.values() for h in hs)
        else:
            pre.reached = (0, list(self.h0))
            size = len(want) * sum(h.numel() * h.element_size() for h in self.h0)
        if keep_runs:
            pre.runs = RunStates(size)
        return pre

    def _reach(self, prefix: PrefixStates, block: int) -> None:
        """Run a lazy prefix's dense pass on to `block` (keeping the states it wants on the way)."""
        if prefix.reached is None or block <= prefix.reached[0]:
            return
        at, hidden = prefix.reached
        for b, hidden in self.run_blocks(hidden, at, block):
            if b + 1 in prefix.want:
                prefix.states[b + 1] = hidden
        prefix.reached = (block, hidden)

    def rows_without(self, removed: Iterable[int], prefix: PrefixStates | None = None,
                     batches: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row NLL (as `nll_rows`) of the model with blocks `removed` skipped, started from the
        prefix state at the first removed block when `prefix` holds it (else from h_0), or from a
        deeper state of an earlier run that removed the same blocks so far (`prefix.runs`). Adds
        the token-block units really run to `self.work`."""
        rem = sorted({int(b) for b in removed})
        which = self._which(batches)
        first = rem[0] if rem else self.n_blocks
        if prefix is not None and first in prefix.want:
            self._reach(prefix, first)
        if prefix is None or first not in prefix.states:
            finals = self.last([self.h0[k] for k in which], 0, skip=rem, batches=which)
            self._count(which, 0, rem)
            return self.nll_rows(finals, which)
        runs = prefix.runs
        starts: dict[int, list[tuple[int, torch.Tensor]]] = {}  # start block -> (batch, its state there)
        for k in which:
            start, h = runs.find(rem, first, self.n_blocks, k) or (first, prefix.states[first][k])
            starts.setdefault(start, []).append((k, h))
        final: dict[int, torch.Tensor] = {}
        for start, items in sorted(starts.items()):  # batches that start at the same block run together
            ks = [k for k, _ in items]
            hidden = [h for _, h in items]
            for b, hidden in self.run_blocks(hidden, start, skip=rem, batches=ks):
                if b + 1 < self.n_blocks:
                    for k, h in zip(ks, hidden):
                        runs.put(rem, b + 1, k, h)
            final.update(zip(ks, hidden))
            self._count(ks, start, rem)
        return self.nll_rows([final[k] for k in which], which)

    def _count(self, batches: Sequence[int], start: int, removed: Sequence[int]) -> None:
        self.work += self._units(batches, start, removed)

    def _units(self, batches: Sequence[int], start: int, removed: Sequence[int]) -> int:
        """Tokens in the batches x (blocks start.. not removed + 1 for the head)."""
        run = sum(1 for b in range(start, self.n_blocks) if b not in removed)
        return sum(int(self.batches[k][0].numel()) for k in batches) * (run + 1)

    def units(self, removed: Iterable[int], prefix: PrefixStates | None = None,
              batches: Sequence[int] | None = None) -> int:
        """Token-block units `rows_without` spends from the dense prefix alone: tokens in the batches x
        (blocks run + 1 for the head). What a race charges, so that no charge depends on which runs'
        states happen to be kept; `work` counts what really ran."""
        rem = sorted({int(b) for b in removed})
        first = rem[0] if rem else self.n_blocks
        start = first if prefix is not None and first in prefix.want else 0  # kept now, or on demand (lazy)
        return self._units(self._which(batches), start, rem)


def chunks(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int
           ) -> Iterator[tuple[int, BlockRunner]]:
    """(first row, runner loaded with the rows of one chunk) over all rows: the weight source chooses
    the chunk (one batch when the blocks are at hand; every row when a block must be read from a store,
    so each block is read once). One private copy serves every chunk."""
    runner = BlockRunner(model, batch_size=batch_size)
    rows = runner.source.chunk_rows(int(input_ids.shape[0]), runner.batch_size)
    for s in range(0, int(input_ids.shape[0]), rows):
        mask = None if attention_mask is None else attention_mask[s:s + rows]
        yield s, runner.load(input_ids[s:s + rows], mask)


def token_nll_rows(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   batch_size: int = 8, progress: Progress | None = None, stage: str = "nll"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `input_ids` (N, T): summed next-token NLL (float64) and tokens scored, through the
    runner in the source's chunks. `progress(stage, fraction, message)` after every block of a chunk."""
    n = int(input_ids.shape[0])
    sums, counts = [], []
    if progress is not None:
        progress(stage, 0.0, f"0 of {n} sequences")
    for s, runner in chunks(model, input_ids, attention_mask, batch_size):
        rows = sum(int(ids.shape[0]) for ids, _ in runner.batches)
        hidden = runner.h0
        for b, hidden in runner.run_blocks(runner.h0):
            if progress is not None and rows == n:  # one chunk (a streamed model): progress by block
                progress(stage, (b + 1) / (runner.n_blocks + 1), f"block {b + 1}/{runner.n_blocks}")
        got = runner.nll_rows(hidden)
        sums.append(got[0])
        counts.append(got[1])
        if progress is not None:
            done = s + rows
            progress(stage, done / n, f"{done} of {n} sequences")
    return torch.cat(sums), torch.cat(counts)


def logits_fn(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A function (input_ids (B, T), attention_mask or None) -> logits (B, T, V) of `model` through the
    runner (one private copy for every call), for callers that bring their own batches (the task
    scorer, lm-eval)."""
    runner = BlockRunner(model, batch_size=1 << 30)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        runner.load(input_ids, attention_mask)
        return next(iter(runner.logits(runner.last(runner.h0))))

    return forward


def runner_model(model: nn.Module) -> nn.Module:
    """A weight-sharing view of `model` whose forward computes logits through the runner, for a
    library that calls the model itself (lm-eval's HF wrapper): it runs whatever holds the weights.
    A call with a KV cache (generation) goes to the model's own forward, which a streamed model
    refuses in one line."""
    view = pruned_view(model, [])
    own = view.forward
    forward = logits_fn(model)

    def run(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if input_ids is None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            require_whole_model(model, "generation (a task that generates text)")
            return own(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return CausalLMOutputWithPast(logits=forward(input_ids, attention_mask))

    view.forward = run
    return view


__all__ = ["BlockRunner", "PrefixStates", "RunStates", "chunks", "logits_fn", "runner_model", "token_nll_rows"]
