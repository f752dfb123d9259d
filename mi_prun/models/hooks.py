"""The one hook mechanism: every hook mi-prun puts on a model comes from here.

Capture (h_0..h_L of every block), healing (a fold module's output and a target block's output)
and verification (the dense hidden states at block boundaries, and replaying them into a pruned
view) all need the same three things, so they share one implementation:

- `output_hooks(modules, on_output, stop=...)`: a forward hook on each named module calling
  `on_output(name, output)`; after the `stop` module's hook the pass is cut short by
  `StopForward` (nothing after it is needed). `run_until_stop` runs a model under such hooks.
- `block_hooks(model, on_input, on_output)`: the input of block 0 and the output of every block.
- `forward_overrides({module: fn})`: a module's `forward` replaced by `fn` on that instance only
  (the class and every other instance keep theirs), restored on exit.

Everything is a context manager that undoes itself in `finally`: an exception or Ctrl-C leaves no
hook and no override behind (tests/test_capture.py proves it with `count_hooks`). Callers put
hooks on a weight-sharing view (`models.surgery.pruned_view(model, [])`), never on a model other
threads may be running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mi_prun.errors import MiPrunError
from mi_prun.models.blocks import find_blocks


class StopForward(Exception):
    """Raised by the hook of the last module a pass needs: the rest of the forward is skipped."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a block's (or module's) output: decoder layers return a tensor
    (transformers >= 4.56 for most families) or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def output_hooks(modules: Mapping[Hashable, nn.Module], on_output: Callable[[Any, Any], None],
                 stop: nn.Module | None = None) -> Iterator[None]:
    """A forward hook on every `modules[name]` calling `on_output(name, raw_output)`.

    After the hook of `stop` (one of `modules`) runs, `StopForward` ends the pass. Removed on exit.
    """
    handles = []

    def make(name: Hashable, module: nn.Module) -> Callable:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            on_output(name, output)
            if module is stop:
                raise StopForward
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name, module)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def block_hooks(model: nn.Module, on_input: Callable[[torch.Tensor], None],
                on_output: Callable[[int, torch.Tensor], None], stop_after_last: bool = True) -> Iterator[None]:
    """`on_input(h_0)` before block 0 and `on_output(b, h_{b+1})` after every block b; with
    `stop_after_last` the pass ends after the last block (final norm and LM head skipped)."""
    blocks = find_blocks(model).blocks

    def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        hs = args[0] if args else kwargs.get("hidden_states")
        if hs is None:
            raise MiPrunError(f"cannot find the hidden states passed to block 0 of {type(model).__name__}")
        on_input(hs)

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with output_hooks(dict(enumerate(blocks)), lambda b, out: on_output(b, hidden_of(out)),
                          stop=blocks[-1] if stop_after_last else None):
            yield
    finally:
        handle.remove()


def run_until_stop(model: nn.Module, **inputs: Any) -> bool:
    """`model(**inputs)`; True when a `StopForward` hook cut the pass short."""
    try:
        model(**inputs)
    except StopForward:
        return True
    return False


@contextlib.contextmanager
def forward_overrides(overrides: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Each module's `forward` replaced by its function on that instance only; restored on exit."""
    done = []
    try:
        for module, fn in overrides.items():
            module.forward = fn  # an instance attribute shadows the class's forward
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward


def count_hooks(model: nn.Module) -> int:
    """Forward and pre-forward hooks on any module of `model` (tests use it to prove cleanup)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def count_overrides(model: nn.Module) -> int:
    """Modules of `model` whose `forward` is overridden on the instance (tests prove cleanup)."""
    return sum("forward" in vars(m) for m in model.modules())
