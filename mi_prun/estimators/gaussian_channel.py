"""gaussian-channel: per-channel Gaussian MI, mean over channels of -1/2 log(1 - rho_c^2)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators.base import (
    _MEM_BUDGET,
    PREPROCESS_HELP,
    RHO_MAX,
    Estimator,
    _layer,
    _sym,
    _warn_constant,
    register,
    standardize,
)
from mi_prun.progress import FractionProgress


@register
class GaussianChannel(Estimator):
    """Per-channel Gaussian MI: mean over channels c of -1/2 log(1 - rho_c^2), rho_c = corr(x_c, y_c).

    |rho| is clipped to 1 - 1e-6. Constant channels have rho = 0 (and still count in the mean).
    Normalised variant: mean over channels of rho_c^2 (= 1 - exp(-2 I_c), Linfoot's informational
    coefficient of correlation, squared), in [0, 1].
    Requires the same channel count in both layers. Needs 3 paired samples at least (with 1 every
    channel is constant and MI is 0, with 2 every |rho| is 1 and MI is the clipping ceiling).

    Default preprocess "none": a correlation ignores per-channel shift and scale, so "standardize"
    and "center" give the same values (up to float32 rounding); "rms" (per-token scaling) does not.
    """

    name = "gaussian-channel"
    promises_dpi = False  # a mean of per-channel MIs, see the package docstring
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "none"}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP + "; center and standardize give the same values as none here"}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        z, n_const = standardize(x)  # (m, d)
        _warn_constant({"input": n_const}, x.shape[1], self.name)
        return z

    @staticmethod
    def _from_rho(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rho (..., d) -> (MI (...), nmi (...)), averaged over the channel axis in float64."""
        r = rho.double().clamp(-RHO_MAX, RHO_MAX)
        return (-0.5 * torch.log1p(-r * r)).mean(-1), (r * r).mean(-1)

    def _pair(self, zx: torch.Tensor, zy: torch.Tensor) -> tuple[float, float]:
        if zx.shape[1] != zy.shape[1]:
            raise MiPrunError(f"{self.name} pairs channels, so x and y need the same width "
                              f"(got {zx.shape[1]} and {zy.shape[1]}). Fix: use gaussian-joint.")
        rho = (zx * zy).sum(0) / zx.shape[0]  # (d,)
        mi, nmi = self._from_rho(rho)
        return float(mi), float(nmi)

    def _prepare_all(self, H: torch.Tensor) -> list[torch.Tensor]:
        # Warn once for the whole capture instead of once per layer.
        counts, out = {}, []
        for b in range(H.shape[0]):
            z, counts[f"layer {b}"] = standardize(self._pre(_layer(H[b], f"H[{b}]")))
            out.append(z)
        _warn_constant(counts, H.shape[2], self.name)
        return out

    def _span(self, preps: list[torch.Tensor], progress: FractionProgress | None):
        Z = torch.stack(preps)  # (L+1, m, d)
        n, m, d = Z.shape
        mi = torch.zeros(n, n, dtype=torch.float64, device=Z.device)
        r2 = torch.zeros_like(mi)
        # rho[c, i, j] = sum_m Z[i, m, c] Z[j, m, c] / m: one batched product per channel chunk,
        # (c, L+1, m) @ (c, m, L+1); chunks keep the permuted copy within the memory budget.
        chunk = max(1, _MEM_BUDGET // max(1, 4 * n * m))
        for c0 in range(0, d, chunk):
            zc = Z[:, :, c0:c0 + chunk].permute(2, 0, 1).contiguous()  # (c, L+1, m)
            rho = torch.bmm(zc, zc.transpose(1, 2)) / m  # (c, L+1, L+1)
            r = rho.double().clamp(-RHO_MAX, RHO_MAX)
            mi += (-0.5 * torch.log1p(-r * r)).sum(0)
            r2 += (r * r).sum(0)
            if progress:
                progress(min(1.0, (c0 + chunk) / d))
        span = _sym((mi / d).cpu().numpy(), np.nan)
        norm = _sym((r2 / d).cpu().numpy(), 1.0)
        return span, norm
