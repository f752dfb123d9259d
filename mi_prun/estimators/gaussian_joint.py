"""gaussian-joint: joint Gaussian MI through canonical correlations on a whitened PCA subspace."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators.base import (
    PREPROCESS_HELP,
    RHO_MAX,
    SAMPLES_FIX,
    Estimator,
    _sym,
    _whitened_pca,
    register,
)

log = logging.getLogger(__name__)


@register
class GaussianJoint(Estimator):
    """Joint Gaussian MI through canonical correlations on a PCA subspace.

    Each layer is projected on its top-`k` principal components (at most min(k, d, m - 1)) and
    whitened (with optional covariance shrinkage towards mu I, `shrinkage` in [0, 1]); the canonical
    correlations p_i are the singular values of the whitened cross-covariance, and
    I = -1/2 sum_i log(1 - p_i^2) (p clipped to 1 - 1e-6). Normalised variant: mean over the
    min(rank_x, rank_y) canonical pairs of p_i^2 (Pillai's trace / k), in [0, 1]; 0 when a layer is
    constant.

    Samples: with r = min(k, d) components per layer, m paired samples span an (m - 1)-dimensional
    centred space, so m - 1 < 2 r forces canonical correlations of 1 (MI at the clipping ceiling):
    the hard minimum is 2 r + 2. Expect a positive small-sample bias of about r^2 / (2m) nats:
    keep m >> r^2 or compare only estimates made with the same k and m.
    """

    name = "gaussian-joint"
    promises_dpi = True
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "rms", "k": 64, "shrinkage": 0.0}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP,
                   "k": "principal components per layer (at most width and positions - 1); "
                        "needs 2 min(k, width) + 2 positions",
                   "shrinkage": "covariance shrinkage towards a multiple of I, in [0, 1]"}

    def _validate(self) -> None:
        self._int_option("k", 1, fix="pass the number of principal components, e.g. k=64 (the default)")
        self._float_option("shrinkage", 0.0, 1.0)

    def min_samples(self, dim: int) -> int:
        return 2 * min(int(self.options["k"]), max(int(dim), 1)) + 2

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.shape[0] < 3:  # block_mi does not run check_samples; this is its last guard
            raise MiPrunError(f"{self.name} needs at least 3 paired samples, got {x.shape[0]}. "
                              f"Fix: {SAMPLES_FIX}.")
        w, rank = _whitened_pca(x, int(self.options["k"]), float(self.options["shrinkage"]))
        if rank == 0:
            log.warning("%s: a constant layer (rank 0) carries no information; its MI is 0.", self.name)
        return w, rank

    @staticmethod
    def _from_p(p: torch.Tensor, kpair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical correlations p (..., k) float64 -> (MI, mean p^2 over kpair pairs)."""
        p = p.clamp(0, RHO_MAX)
        mi = (-0.5 * torch.log1p(-p * p)).sum(-1)
        nmi = torch.where(kpair > 0, (p * p).sum(-1) / kpair.clamp_min(1), torch.zeros_like(mi))
        return mi, nmi.clamp(0, 1)

    def _pair(self, px, py) -> tuple[float, float]:
        (wx, rx), (wy, ry) = px, py
        c = (wx.T @ wy).double() / (wx.shape[0] - 1)  # (kx, ky) whitened cross-covariance
        p = torch.linalg.svdvals(c)
        mi, nmi = self._from_p(p, torch.tensor(float(min(rx, ry)), dtype=torch.float64, device=p.device))
        return float(mi), float(nmi)

    def _span(self, preps, progress):
        W = torch.stack([w for w, _ in preps])  # (L+1, m, kk)
        ranks = torch.tensor([r for _, r in preps], dtype=torch.float64, device=W.device)
        n, m, k = W.shape
        # Cross-covariances of all pairs in one GEMM: (m, (L+1) k)^T (m, (L+1) k) -> (L+1, L+1, k, k).
        Wf = W.permute(1, 0, 2).reshape(m, n * k)
        C = (Wf.T @ Wf).reshape(n, k, n, k).permute(0, 2, 1, 3).double() / (m - 1)
        iu = torch.triu_indices(n, n, 1, device=W.device)
        p = torch.linalg.svdvals(C[iu[0], iu[1]])  # (pairs, k)
        mi, nmi = self._from_p(p, torch.minimum(ranks[iu[0]], ranks[iu[1]]))
        span = np.full((n, n), np.nan)
        norm = np.full((n, n), np.nan)
        ii, jj = iu.cpu().numpy()
        span[ii, jj] = mi.cpu().numpy()
        norm[ii, jj] = nmi.cpu().numpy()
        return _sym(span, np.nan), _sym(norm, 1.0)
