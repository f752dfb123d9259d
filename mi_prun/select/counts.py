"""How many blocks to remove, and which blocks may be removed at all.

`resolve_n` turns `n` or `ratio` into a validated block count; `n_protected` reads `protect_ends`
as the number of blocks kept at each end; `allowed_blocks` lists the removable blocks.
"""

from __future__ import annotations

import math

import numpy as np

from mi_prun.errors import MiPrunError


def resolve_n(n_blocks: int, n: int | None = None, ratio: float | None = None,
              protect_ends: bool | int | float = False) -> int:
    """The number of blocks to remove: `n`, or round(ratio * n_blocks) (halves round up).

    Raises `MiPrunError` (saying how to fix it) when neither or both are given, ratio is outside
    (0, 1), the count is <= 0 or >= n_blocks (never remove every block), or exceeds the removable
    blocks when the ends are protected (see `n_protected`).
    """
    L = int(n_blocks)
    if L < 1:
        raise MiPrunError(f"the model has {L} blocks; nothing can be removed.")
    if (n is None) == (ratio is None):
        raise MiPrunError("give exactly one of n (number of blocks to remove) and ratio "
                          f"(fraction of the {L} blocks); got n={n!r}, ratio={ratio!r}.")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
            raise MiPrunError(f"ratio must be a number in (0, 1); got {ratio!r}.")
        r = float(ratio)
        if not (0.0 < r < 1.0):
            raise MiPrunError(f"ratio must lie strictly between 0 and 1; got {ratio!r}. "
                              f"Fix: e.g. ratio=0.25 removes {math.floor(0.25 * L + 0.5)} of {L} blocks.")
        # Round half up (Python's round() rounds 2.5 to 2); the epsilon absorbs 0.1 * 30 = 3.0000...4.
        count = math.floor(r * L + 0.5 + 1e-9)
        if count <= 0:
            raise MiPrunError(f"ratio {r} of {L} blocks rounds to 0 blocks. "
                              f"Fix: use ratio >= {1 / (2 * L):.3g} or give n.")
        source = f"ratio {r} (round({r} x {L}) = {count})"
    else:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise MiPrunError(f"n must be a whole number of blocks; got {n!r}.")
        count = int(n)
        source = f"n={count}"
        if count <= 0:
            raise MiPrunError(f"{source}: the number of blocks to remove must be at least 1.")
    if count >= L:
        raise MiPrunError(f"{source} would remove all {L} blocks (blocks are numbered 0..{L - 1}). "
                          f"Fix: remove at most {L - 1}.")
    k = n_protected(L, protect_ends)
    removable = max(L - 2 * k, 0) if k else L - 1
    if k and count > removable:
        raise MiPrunError(f"{source} exceeds the {removable} removable blocks when the first and last {k} "
                          f"block(s) are protected. Fix: remove at most {removable}, or protect fewer.")
    return count


def n_protected(n_blocks: int, protect_ends: bool | int | float) -> int:
    """Blocks protected at each end: False/0 none, True 1, an int k, or a fraction in (0, 0.5) of L
    (rounded, at least 1) — the first and last blocks of most LLMs do work the middle ones do not."""
    if isinstance(protect_ends, bool):
        return int(protect_ends)
    if isinstance(protect_ends, (int, np.integer)):
        k = int(protect_ends)
    elif isinstance(protect_ends, (float, np.floating)) and 0.0 < float(protect_ends) < 0.5:
        k = max(1, math.floor(float(protect_ends) * n_blocks + 0.5))
    else:
        raise MiPrunError(f"protect_ends must be a bool, a block count or a fraction in (0, 0.5); "
                          f"got {protect_ends!r}.")
    if k < 0 or 2 * k >= n_blocks:
        raise MiPrunError(f"cannot protect {k} block(s) at each end of a {n_blocks}-block model. "
                          f"Fix: protect at most {(n_blocks - 1) // 2}.")
    return k


def allowed_blocks(n_blocks: int, protect_ends: bool | int | float) -> list[int]:
    """Removable blocks in order: all of 0..n_blocks-1 except the protected ends."""
    k = n_protected(n_blocks, protect_ends)
    return [b for b in range(n_blocks) if k <= b < n_blocks - k]
