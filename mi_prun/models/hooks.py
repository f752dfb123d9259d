"""The one hook mechanism: every hook mi-prun puts on a model comes from here.

Blocks run through the block runner (`mi_prun.runtime.runner`), which calls them directly and so
needs no hook to see their outputs; the one place a hook remains is a tap inside a block (healing
reads the output of a block's MLP output projection):

- `output_hooks(modules, on_output)`: a forward hook on each named module calling
  `on_output(name, output)`, a context manager that removes them in `finally`: an exception or
  Ctrl-C leaves no hook behind (tests/test_capture.py proves it with `count_hooks`). The runner
  puts it on the block it is about to run, a private materialised copy when streamed;
- `hidden_of(output)`: the hidden state in a block's output (a tensor or a tuple).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import nn



def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a block's (or module's) output: decoder layers return a tensor
    (transformers >= 4.56 for most families) or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def output_hooks(modules: Mapping[Hashable, nn.Module], on_output: Callable[[Any, Any], None]) -> Iterator[None]:
    """A forward hook on every `modules[name]` calling `on_output(name, raw_output)`. Removed on exit."""
    handles = []

    def make(name: Hashable) -> Callable:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            on_output(name, output)
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def count_hooks(model: nn.Module) -> int:
    """Forward and pre-forward hooks on any module of `model` (tests use it to prove cleanup)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
