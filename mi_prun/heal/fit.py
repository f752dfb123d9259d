"""The closed-form bridge: streaming least-squares sums and the ridge solve, in float64.

Per calibration token (a row): m, the output of the module the bridge folds into (d,), and r, what
that output should have been for the block to emit the target h_j (d,). The bridge is
r ~ m T + c with T (d, d) (or a diagonal T, for a per-channel fold) and an intercept c only where
the fold has a bias to absorb it. `BridgeStats` keeps sums only (memory O(d^2), whatever the
calibration size); `solve` minimises ||M T + c - R||^2 + lambda ||T||^2 with lambda relative to the
mean diagonal of the (centred) Gram matrix M^T M; `sse` evaluates any (T, c) on a set of sums, so a
held-out set scores candidate lambdas without another forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mi_prun.config import MAX_RIDGE
from mi_prun.errors import MiPrunError


class BridgeStats:
    """Sums over rows of (m, r, t) for one bridge: m the fold module's output, r its target, t the
    target hidden state h_j (only for reporting the residual as a fraction of h_j's variance)."""

    def __init__(self, d: int, diagonal: bool, device: torch.device | str = "cpu"):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.diagonal = diagonal
        self.n = 0
        self.sm, self.sr, self.st = z(d), z(d), z(d)
        self.mm = z(d) if diagonal else z(d, d)  # sum m m^T (its diagonal when diagonal)
        self.mr = z(d) if diagonal else z(d, d)  # sum m r^T (its diagonal when diagonal)
        self.rr = z(())  # sum |r|^2
        self.tt = z(())  # sum |t|^2
        self.dd = z(())  # sum |m - r|^2: the error of the pruned model without a bridge (T = I)

    def add(self, m: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> None:
        """Add rows m, r, t: (k, d) each, any float dtype."""
        m, r, t = (x.to(device=self.sm.device, dtype=torch.float64) for x in (m, r, t))
        self.n += m.shape[0]
        self.sm += m.sum(0)
        self.sr += r.sum(0)
        self.st += t.sum(0)
        if self.diagonal:
            self.mm += (m * m).sum(0)
            self.mr += (m * r).sum(0)
        else:
            self.mm += m.T @ m
            self.mr += m.T @ r
        self.rr += (r * r).sum()
        self.tt += (t * t).sum()
        self.dd += ((m - r) ** 2).sum()

    def __add__(self, other: "BridgeStats") -> "BridgeStats":
        out = BridgeStats(self.sm.shape[0], self.diagonal, self.sm.device)
        out.n = self.n + other.n
        for name in ("sm", "sr", "st", "mm", "mr", "rr", "tt", "dd"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def target_variance(self) -> float:
        """sum over rows of |t - mean t|^2: the total variance of h_j on these rows."""
        if self.n == 0:
            return 0.0
        return float(self.tt - (self.st @ self.st) / self.n)


@dataclass(frozen=True)
class Bridge:
    """r ~ m T + c. T: (d, d), or (d,) for a diagonal bridge; c: (d,) (zero without intercept)."""

    T: torch.Tensor
    c: torch.Tensor
    ridge: float  # relative lambda
    ridge_abs: float  # lambda itself


def solve(stats: BridgeStats, ridge: float, intercept: bool) -> Bridge:
    """The ridge least-squares bridge of `stats`; lambda = ridge x mean diagonal of the Gram matrix
    (centred when there is an intercept, and the intercept is not penalised).

    Without a ridge the fit must be determined: a full bridge needs at least d + 1 rows (d with no
    intercept), a diagonal one 2 (1); fewer rows fit the calibration tokens exactly and heal to a
    worse model (issue 23 reported 607 against 558 held-out perplexity), so they are refused with
    the fix named."""
    d = int(stats.sm.shape[0])
    need = (1 if stats.diagonal else d) + int(intercept)
    if float(ridge) == 0.0 and stats.n < need:
        raise MiPrunError(f"a bridge without ridge needs at least {need} calibration rows (tokens) for its "
                          f"{need} unknowns per channel, but has {stats.n}: the fit would be under-determined. "
                          "Fix: more or longer healing samples (--heal-samples), or a ridge above 0 "
                          "(--heal-ridge, or leave it unset to choose one).")
    n = max(stats.n, 1)
    mu_m, mu_r = stats.sm / n, stats.sr / n
    A, B = stats.mm, stats.mr
    if intercept:
        if stats.diagonal:
            A, B = A - n * mu_m * mu_m, B - n * mu_m * mu_r
        else:
            A, B = A - n * torch.outer(mu_m, mu_m), B - n * torch.outer(mu_m, mu_r)
    diag = A if stats.diagonal else torch.diagonal(A)
    lam = float(ridge) * float(diag.mean().clamp_min(0.0))
    if not math.isfinite(lam):
        raise MiPrunError(f"ridge {ridge:g} times the Gram matrix's mean diagonal overflows. Fix: a relative "
                          f"ridge of at most {MAX_RIDGE:g} (--heal-ridge).")
    if stats.diagonal:
        T = torch.where(A + lam > 0, B / (A + lam).clamp_min(torch.finfo(torch.float64).tiny),
                        torch.ones_like(A))
    else:
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        # Cholesky fails only on a singular Gram matrix with lambda = 0: least-norm solution then.
        L, info = torch.linalg.cholesky_ex(A + lam * eye)
        T = torch.cholesky_solve(B, L) if int(info) == 0 else torch.linalg.lstsq(A + lam * eye, B).solution
    c = mu_r - (mu_m * T if stats.diagonal else mu_m @ T) if intercept else torch.zeros_like(mu_r)
    return Bridge(T=T, c=c, ridge=float(ridge), ridge_abs=lam)


def sse(stats: BridgeStats, bridge: Bridge) -> float:
    """sum over the rows of `stats` of |m T + c - r|^2, from the sums alone."""
    T, c = bridge.T, bridge.c
    if stats.diagonal:
        quad = (T * T * stats.mm).sum() - 2 * (T * stats.mr).sum()
        lin = 2 * c @ (T * stats.sm)
    else:
        quad = ((stats.mm @ T) * T).sum() - 2 * (T * stats.mr).sum()
        lin = 2 * c @ (stats.sm @ T)
    value = quad + lin - 2 * c @ stats.sr + stats.n * (c @ c) + stats.rr
    return max(float(value), 0.0)


def unexplained(stats: BridgeStats, bridge: Bridge | None) -> float:
    """Residual as a fraction of h_j's variance on these rows (None: the pruned model, no bridge)."""
    var = stats.target_variance()
    err = float(stats.dd) if bridge is None else sse(stats, bridge)
    return err / var if var > 0 else float("nan")
