"""ksg: Kraskov-Stoegbauer-Grassberger k-nearest-neighbour MI on a whitened PCA subspace."""

from __future__ import annotations

import logging
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
    _whitened_pca,
    register,
)

log = logging.getLogger(__name__)


@register
class KSG(Estimator):
    """Kraskov-Stoegbauer-Grassberger MI estimator (algorithm 1), max-norm, on a reduced dimension.

    Each layer is projected on its top-`k` principal components (at most min(k, d, m - 1), so a
    large k costs no memory), whitened, and `max_samples` positions are kept (the same seeded subset
    for every layer). A seeded jitter of 1e-6 (in units of the whitened scale) breaks ties between
    duplicated positions. With eps_a the max-norm distance to the `k_neighbors`-th neighbour in the
    joint space, n_x(a) and n_y(a) the counts of points strictly closer than eps_a in each marginal
    space:
        I = psi(k_neighbors) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >,
    clipped at 0 (the raw estimate scatters around 0 for independent inputs). A constant layer
    gives 0. No normalised variant (nmi is None). Needs max(4, k_neighbors + 2) paired samples at
    least (every point needs k_neighbors neighbours), so k_neighbors + 2 <= max_samples.
    """

    name = "ksg"
    promises_dpi = True
    has_norm = False
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "rms", "k": 8, "k_neighbors": 3, "max_samples": 1024, "seed": 0}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP,
                   "k": "principal components per layer (at most width and positions - 1)",
                   "k_neighbors": "neighbours in the joint space (KSG's k); needs max(4, k_neighbors + 2) positions",
                   "max_samples": "positions used per layer (memory grows as its square), >= k_neighbors + 2",
                   "seed": "seed of the position subset and of the tie-breaking jitter, >= 0"}

    def _validate(self) -> None:
        self._int_option("k", 1, fix="pass the number of principal components, e.g. k=8 (the default)")
        self._int_option("max_samples", 4, fix="pass an integer >= 4, e.g. 1024 (the default)")
        kn = self._int_option("k_neighbors", 1, fix="pass a small positive integer, e.g. 3 (the default)")
        if kn + 2 > self.options["max_samples"]:
            raise self._bad("k_neighbors", f"leaves too few points: max_samples={self.options['max_samples']} "
                            "must be at least k_neighbors + 2",
                            "lower k_neighbors (3 is usual) or raise max_samples")
        self._int_option("seed", 0, 2**64 - 1)

    def min_samples(self, dim: int) -> int:
        return max(4, int(self.options["k_neighbors"]) + 2)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """-> max-norm distances D (n, n) with +inf on the diagonal, D with each row sorted (for
        neighbour counts by binary search), and whether x is constant."""
        if x.shape[0] < self.min_samples(x.shape[1]):  # block_mi does not run check_samples
            raise MiPrunError(f"{self.name} needs more than k_neighbors + 1 paired samples, "
                              f"got {x.shape[0]}. Fix: {SAMPLES_FIX}.")
        w, rank = _whitened_pca(x, int(self.options["k"]), 0.0)  # (m, kk)
        idx = _subsample_index(w.shape[0], int(self.options["max_samples"]), int(self.options["seed"]),
                               w.device)
        if idx is not None:
            w = w[idx]
        w = w[:, :max(rank, 1)]
        g = torch.Generator(device="cpu").manual_seed(int(self.options["seed"]))
        w = w + 1e-6 * torch.randn(w.shape, generator=g).to(w.device)
        D = torch.cdist(w, w, p=float("inf"))  # (n, n)
        D.fill_diagonal_(float("inf"))  # a point is not its own neighbour
        if rank == 0:
            log.warning("%s: a constant layer (rank 0) carries no information; its MI is 0.", self.name)
        return D, D.sort(dim=1).values, rank == 0

    def _ksg(self, px: tuple, pys: list[tuple]) -> torch.Tensor:
        """One prepared layer against P others -> (P,) KSG estimates (float64)."""
        kn = int(self.options["k_neighbors"])
        Dx, Sx, _ = px
        Dy = torch.stack([p[0] for p in pys])  # (P, n, n)
        Sy = torch.stack([p[1] for p in pys])
        n = Dx.shape[-1]
        eps = torch.maximum(Dx, Dy).topk(kn, dim=-1, largest=False).values[..., -1]  # (P, n) joint
        # Counts of points strictly closer than eps (searchsorted's left side = "<"), per marginal.
        nx = torch.searchsorted(Sx, eps.T.contiguous()).T.double()  # (P, n)
        ny = torch.searchsorted(Sy, eps[..., None].contiguous()).squeeze(-1).double()
        dg = torch.special.digamma
        const = dg(torch.tensor([float(kn), float(n)], dtype=torch.float64)).sum().item()
        return (const - (dg(nx + 1) + dg(ny + 1)).mean(-1)).clamp_min(0)

    def _pair(self, px, py) -> tuple[float, None]:
        if px[0].shape != py[0].shape:
            raise MiPrunError("x and y must have the same number of paired samples.")
        if px[2] or py[2]:
            return 0.0, None
        return float(self._ksg(px, [py])[0]), None

    def _span(self, preps, progress):
        const = [p[2] for p in preps]
        n_layers, n = len(preps), preps[0][0].shape[0]
        per = max(1, _MEM_BUDGET // (4 * 4 * n * n))
        span = np.full((n_layers, n_layers), np.nan)
        for i in range(n_layers - 1):
            for j0 in range(i + 1, n_layers, per):
                js = list(range(j0, min(n_layers, j0 + per)))
                span[i, js] = self._ksg(preps[i], [preps[j] for j in js]).cpu().numpy()
            for j in range(i + 1, n_layers):
                if const[i] or const[j]:
                    span[i, j] = 0.0
            if progress:
                progress((i + 1) / (n_layers - 1))
        return _sym(span, np.nan), None
