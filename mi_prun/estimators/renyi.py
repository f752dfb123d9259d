"""renyi-kernel: matrix-based Renyi alpha-entropy MI on Gaussian-kernel Gram matrices."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators.base import (
    _MEM_BUDGET,
    PREPROCESS_HELP,
    SAMPLES_FIX,
    Estimator,
    _subsample_index,
    _sym,
    register,
)

log = logging.getLogger(__name__)

BANDWIDTH_RULES = ("median", "scott", "silverman")
METHODS = ("auto", "eigen")


def matrix_renyi_entropy(gram: torch.Tensor, alpha: float, closed_form: bool = True) -> float:
    """S_alpha(A) in nats of A = gram / trace(gram) (Sanchez Giraldo et al.):
    1/(1-alpha) ln sum_i lambda_i^alpha; alpha = 1 is the von Neumann limit -sum lambda ln lambda.
    alpha = 2 with `closed_form` uses sum lambda^2 = ||A||_F^2 (no eigendecomposition)."""
    a = gram.double() / gram.double().diagonal().sum()
    if alpha == 2 and closed_form:
        return float(-torch.log(a.pow(2).sum()))
    lam = torch.linalg.eigvalsh(a).clamp_min(0)
    return float(_entropy_from_eigs(lam, alpha))


def _entropy_from_eigs(lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """lam (..., n) eigenvalues summing to 1 -> S_alpha (...) nats."""
    lam = lam.clamp_min(0)
    if alpha == 1:
        return -(torch.where(lam > 0, lam * torch.log(lam.clamp_min(1e-300)), torch.zeros_like(lam))).sum(-1)
    return torch.log(lam.pow(alpha).sum(-1)) / (1.0 - alpha)


@register
class RenyiKernel(Estimator):
    """Matrix-based Renyi alpha-entropy MI on Gaussian-kernel Gram matrices (Sanchez Giraldo et al.).

    Per layer: K = exp(-||x_a - x_b||^2 / (2 sigma^2)) on up to `max_samples` positions (the same
    seeded subset for every layer), A = K / trace(K). Joint: A o B / trace(A o B) (Hadamard).
    I = S(A) + S(B) - S(A, B), in nats. alpha > 0; alpha = 1 is the von Neumann (Shannon) limit.
    alpha = 2 uses the closed form sum lambda^2 = ||.||_F^2 (method "auto"); other alpha, or method
    "eigen", use float64 eigenvalues.

    Bandwidth: "median" (median pairwise distance), "scott" = n^(-1/(d+4)) s and "silverman" =
    (4/(d+2))^(1/(d+4)) n^(-1/(d+4)) s with s = sqrt(total variance), i.e. the rules applied to the
    overall scale of the vectors (with the per-dimension std they make K = I in high dimension),
    or a fixed positive float (a numeric string such as "2.5" is read as one).

    Normalised variant: I / sqrt(S(A) S(B)), clipped to [0, 1] (S(A o B) >= max(S(A), S(B)),
    so I <= min(S(A), S(B))). Note that identical inputs do not give I = S(A): A o A is the Gram
    of a narrower kernel, with more entropy than A. They do when K is a 0/1 block matrix
    (well-separated clusters), the case the tests use. Needs 3 paired samples at least.
    """

    name = "renyi-kernel"
    promises_dpi = False  # matrix-based Renyi MI has no DPI guarantee for arbitrary kernels
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "rms", "alpha": 2.0, "bandwidth": "median", "max_samples": 1024, "seed": 0,
                "method": "auto"}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP,
                   "alpha": "Renyi order, > 0 (2: closed form; 1: von Neumann limit)",
                   "bandwidth": "kernel width: median, scott, silverman or a number > 0",
                   "max_samples": "positions used per layer (memory grows as its square), >= 3",
                   "seed": "seed of the position subset, >= 0",
                   "method": "auto (closed form at alpha 2) or eigen (eigenvalues always)"}

    def _validate(self) -> None:
        self._float_option("alpha", 0.0, low_open=True,
                           fix="pass alpha > 0, e.g. 2.0 (closed form, the default) or 1.0 (von Neumann)")
        bw = self.options["bandwidth"]
        if isinstance(bw, str) and bw not in BANDWIDTH_RULES:
            try:
                self.options["bandwidth"] = float(bw)
            except ValueError:
                raise self._bad("bandwidth", f"is not one of {', '.join(map(repr, BANDWIDTH_RULES))} "
                                "nor a positive number",
                                f"choose one of {', '.join(BANDWIDTH_RULES)} or pass a float > 0") from None
        if not isinstance(self.options["bandwidth"], str):
            self._float_option("bandwidth", 0.0, low_open=True,
                               fix=f"choose one of {', '.join(BANDWIDTH_RULES)} or pass a float > 0")
        self._int_option("max_samples", 3, fix="pass an integer >= 3, e.g. 1024 (the default)")
        self._int_option("seed", 0, 2**64 - 1)
        self._choice_option("method", METHODS)

    @property
    def _closed(self) -> bool:
        return float(self.options["alpha"]) == 2.0 and self.options["method"] == "auto"

    def _sigma(self, d2: torch.Tensor, x: torch.Tensor) -> float:
        n, d = x.shape
        bw = self.options["bandwidth"]
        if not isinstance(bw, str):
            return float(bw)
        if bw == "median":
            iu = torch.triu_indices(n, n, 1, device=d2.device)
            return float(d2[iu[0], iu[1]].sqrt().median())
        s = float(x.double().var(0, unbiased=True).sum().sqrt())
        factor = n ** (-1.0 / (d + 4))
        if bw == "silverman":
            factor *= (4.0 / (d + 2)) ** (1.0 / (d + 4))
        return factor * s

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        idx = _subsample_index(x.shape[0], int(self.options["max_samples"]), int(self.options["seed"]),
                               x.device)
        if idx is not None:
            x = x[idx]
        if x.shape[0] < 3:  # block_mi does not run check_samples; this is its last guard
            raise MiPrunError(f"{self.name} needs at least 3 paired samples, got {x.shape[0]}. "
                              f"Fix: {SAMPLES_FIX}.")
        d2 = torch.cdist(x, x).pow(2)  # (n, n) squared distances
        sigma = self._sigma(d2, x)
        if not sigma > 0:
            # All points equal (constant layer): K is all ones whatever sigma is, S(A) = 0.
            log.warning("%s: zero bandwidth (constant layer); it carries no information.", self.name)
            sigma = 1.0
        K = torch.exp(-d2 / (2 * sigma * sigma))
        K.fill_diagonal_(1.0)
        alpha = float(self.options["alpha"])
        s = matrix_renyi_entropy(K, alpha, closed_form=self._closed)
        return K, s

    def _joint_entropy(self, Ka: torch.Tensor, Kb: torch.Tensor) -> torch.Tensor:
        """S of (Ka o Kb) / trace for a batch: Ka, Kb (..., n, n) -> (...,) float64."""
        J = (Ka * Kb).double()
        J = J / J.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        alpha = float(self.options["alpha"])
        if self._closed:
            return -torch.log(J.pow(2).sum((-2, -1)))
        return _entropy_from_eigs(torch.linalg.eigvalsh(J), alpha)

    def _combine(self, sa, sb, sab):
        mi = max(sa + sb - sab, 0.0)  # >= 0 up to rounding since S(A o B) <= S(A) + S(B)
        den = math.sqrt(max(sa, 0.0) * max(sb, 0.0))  # entropies of a constant layer are 0 +- rounding
        return mi, (min(mi / den, 1.0) if den > 0 else 0.0)

    def _pair(self, px, py) -> tuple[float, float]:
        (Ka, sa), (Kb, sb) = px, py
        if Ka.shape != Kb.shape:
            raise MiPrunError("x and y must have the same number of paired samples.")
        return self._combine(sa, sb, float(self._joint_entropy(Ka, Kb)))

    def _span(self, preps, progress):
        K = torch.stack([k for k, _ in preps])  # (L+1, n, n)
        S = [s for _, s in preps]
        n_layers, n, _ = K.shape
        iu = torch.triu_indices(n_layers, n_layers, 1)
        sab = torch.empty(iu.shape[1], dtype=torch.float64)
        if self._closed:
            # ||K_i o K_j||_F^2 = <K_i^2, K_j^2> for all pairs: one (L+1, n^2) x (n^2, L+1) product,
            # in column chunks so the float64 copy stays within the memory budget.
            Q = K.reshape(n_layers, -1)
            F = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=K.device)
            step = max(1, _MEM_BUDGET // (8 * n_layers))
            for c0 in range(0, Q.shape[1], step):
                q = Q[:, c0:c0 + step].double().pow(2)
                F += q @ q.T
            # trace(K_i o K_j) = n (unit diagonal), so S2 = -ln(F_ij / n^2).
            sab = -torch.log(F[iu[0], iu[1]] / (n * n)).cpu()
        else:
            chunk = max(1, _MEM_BUDGET // (8 * n * n))
            for p0 in range(0, iu.shape[1], chunk):
                a, b = iu[0, p0:p0 + chunk], iu[1, p0:p0 + chunk]
                sab[p0:p0 + chunk] = self._joint_entropy(K[a.to(K.device)], K[b.to(K.device)]).cpu()
                if progress:
                    progress(min(1.0, (p0 + chunk) / iu.shape[1]))
        span = np.full((n_layers, n_layers), np.nan)
        norm = np.full((n_layers, n_layers), np.nan)
        for t, (i, j) in enumerate(iu.T.tolist()):
            span[i, j], norm[i, j] = self._combine(S[i], S[j], float(sab[t]))
        return _sym(span, np.nan), _sym(norm, 1.0)
