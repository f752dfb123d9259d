"""What a search that runs the model asks of its scorer: the two interfaces, and nothing else.

`SetScorer` is the call every pass-based search makes (verified, MI-guided, SLEB-style):
`score(removed) -> (value, cached)`, lower is better, with the facts a result records about the
scoring (`provenance`, `dense_passes`) and the `NLLCache` it fills. `PrefixScorer` (next-token NLL
on verification tokens) and `TaskScorer` (choice NLL on multiple-choice items) implement it, and
`Problem.scorer` is typed by it.

`RowScorer` adds what racing needs (`mi_prun.select.race`): the verification samples split into
groups (one batch each), the summed NLL and token count of each sample of some groups only, and
the work such a call costs in token-block units (tokens x blocks run, the head counted as one
block). Only a scorer whose value is a mean over samples can race; `TaskScorer` cannot, and the
verified search then runs unraced. Formats, for `removed` a set of block indices:

    scorer.groups                       -> [[0, 1, 2, 3], [4, 5, 6, 7], ...]  sample indices per group
    scorer.rows((3, 4), groups=[1, 0])  -> (sums float64 (8,), counts int (8,))  samples 4..7 then 0..3
    scorer.units((3, 4), groups=[1])    -> 4 samples x T tokens x (blocks run from block 3, + head)

Structural (`typing.Protocol`): a class implements them by having the members, as the tests'
synthetic scorers do.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class SetScorer(Protocol):
    """`score(removed) -> (mean loss, whether it came from the cache)`; lower is better."""

    cache: Any  # the NLLCache the scores go to (bound to the model and the tokens or items)
    provenance: dict[str, Any]  # what was scored on (tokens' source, or the task's items)
    dense_passes: int  # passes of the unpruned model this scorer ran (the prefix cache's)
    progress: Any  # the caller's progress callback (None: none), for the search that uses the scorer

    def score(self, removed: Iterable[int]) -> tuple[float, bool]: ...


@runtime_checkable
class RowScorer(SetScorer, Protocol):
    """A `SetScorer` whose score is the token-weighted mean over samples, computable group by group."""

    groups: list[list[int]]  # the sample indices of each group (one batch of rows)

    def rows(self, removed: Iterable[int], groups: Sequence[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def units(self, removed: Iterable[int], groups: Sequence[int] | None = None) -> int: ...


def can_race(scorer: Any) -> bool:
    """Whether `scorer` can be scored group by group (implements `RowScorer`)."""
    return isinstance(scorer, RowScorer)


__all__ = ["RowScorer", "SetScorer", "can_race"]
