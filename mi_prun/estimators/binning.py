"""binning: per-channel plug-in MI on quantile bins, averaged over channels."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.estimators.base import (
    _MEM_BUDGET,
    NOISY_FACTOR,
    PREPROCESS_HELP,
    Estimator,
    _layer,
    _sym,
    _warn_constant,
    register,
)


@register
class Binning(Estimator):
    """Per-channel plug-in MI on quantile bins, averaged over channels (comparable to gaussian-channel).

    Each channel is cut into `bins` equal-count bins (edges at its empirical quantiles; tied values
    share a bin, so a constant channel is one bin with zero entropy and zero MI). I_c is the plug-in
    MI of the (bins x bins) joint histogram; plug-in MI is biased up by about (bins-1)^2 / (2m) nats.
    Normalised variant: mean over channels of I_c / sqrt(H(x_c) H(y_c)) (0 where an entropy is 0),
    in [0, 1].

    Samples: at least 2 x bins (with m <= bins every sample gets a bin of its own and MI = ln m
    whatever the data); below max(10 x that, 4 x bins^2) the plug-in bias exceeds about 1/8 nat
    and the estimate is reported as noisy.
    """

    name = "binning"
    promises_dpi = False  # a mean of per-channel MIs, see the package docstring
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "rms", "bins": 16}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP,
                   "bins": "quantile bins per channel, in [2, 256]; needs 2 x bins positions"}

    def _validate(self) -> None:
        # Codes are stored as int16 and the joint histogram has d x bins^2 cells: 256 bins at most.
        self._int_option("bins", 2, 256, fix="pass an integer number of bins in [2, 256], e.g. 16 (the default)")

    def min_samples(self, dim: int) -> int:
        return 2 * int(self.options["bins"])

    def noisy_samples(self, dim: int) -> int:
        nb = int(self.options["bins"])
        return max(NOISY_FACTOR * self.min_samples(dim), 4 * nb * nb)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        out = self._codes(x)
        _warn_constant({"input": out[2]}, x.shape[1], self.name)
        return out

    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> codes (d, m) int16 in [0, bins), entropies (d,) float64, count of constant channels."""
        m, d = x.shape
        nb = int(self.options["bins"])
        xt = x.T.contiguous()  # (d, m)
        srt = xt.sort(dim=1).values
        pos = torch.tensor([(q * m) // nb for q in range(1, nb)], device=x.device)
        edges = srt[:, pos].contiguous()  # (d, bins-1), non-decreasing per channel
        codes = torch.searchsorted(edges, xt, right=True)  # (d, m) int64
        counts = torch.zeros(d, nb, dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
        p = counts / m
        ent = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)
        n_const = int((srt[:, 0] == srt[:, -1]).sum())
        return codes.to(torch.int16), ent, n_const

    def _prepare_all(self, H):
        out = [self._codes(self._pre(_layer(H[b], f"H[{b}]"))) for b in range(H.shape[0])]
        _warn_constant({f"layer {b}": p[2] for b, p in enumerate(out)}, H.shape[2], self.name)
        return out

    def _mi_from_joint(self, joint: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, m: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """joint (..., d, bins, bins) counts; hx, hy (..., d) entropies -> (MI (...), nmi (...))."""
        pxy = joint / m
        px = pxy.sum(-1, keepdim=True)
        py = pxy.sum(-2, keepdim=True)
        ratio = pxy / (px * py).clamp_min(1e-300)
        ic = torch.where(pxy > 0, pxy * torch.log(ratio.clamp_min(1e-300)), torch.zeros_like(pxy))
        ic = ic.sum((-2, -1)).clamp_min(0)  # (..., d)
        den = (hx * hy).sqrt()
        nc = torch.where(den > 0, ic / den.clamp_min(1e-300), torch.zeros_like(ic)).clamp(0, 1)
        return ic.mean(-1), nc.mean(-1)

    def _joint_counts(self, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        """cx (d, m), cy (P, d, m) int codes -> joint counts (P, d, bins, bins) via one bincount."""
        nb = int(self.options["bins"])
        P, d, _ = cy.shape
        base = (torch.arange(P, device=cy.device)[:, None, None] * d
                + torch.arange(d, device=cy.device)[None, :, None]) * (nb * nb)
        idx = base + cx.long()[None] * nb + cy.long()  # (P, d, m) flat cell index
        cnt = torch.bincount(idx.reshape(-1), minlength=P * d * nb * nb)
        return cnt.reshape(P, d, nb, nb).double()

    def _pair(self, px, py) -> tuple[float, float]:
        (cx, hx, _), (cy, hy, _) = px, py
        if cx.shape != cy.shape:
            raise MiPrunError(f"{self.name} pairs channels, so x and y need the same shape "
                              f"(got {tuple(cx.T.shape)} and {tuple(cy.T.shape)}).")
        joint = self._joint_counts(cx, cy[None])[0]
        mi, nmi = self._mi_from_joint(joint, hx, hy, cx.shape[1])
        return float(mi), float(nmi)

    def _span(self, preps, progress):
        n = len(preps)
        d, m = preps[0][0].shape
        # Batch all j > i for each i, in groups so the (P, d, m) int64 index fits the budget.
        per = max(1, _MEM_BUDGET // (8 * d * m))
        span = np.full((n, n), np.nan)
        norm = np.full((n, n), np.nan)
        for i in range(n - 1):
            cx, hx, _ = preps[i]
            for j0 in range(i + 1, n, per):
                js = list(range(j0, min(n, j0 + per)))
                cy = torch.stack([preps[j][0] for j in js])
                hy = torch.stack([preps[j][1] for j in js])
                mi, nmi = self._mi_from_joint(self._joint_counts(cx, cy), hx[None], hy, m)
                span[i, js] = mi.cpu().numpy()
                norm[i, js] = nmi.cpu().numpy()
            if progress:
                progress((i + 1) / (n - 1))
        return _sym(span, np.nan), _sym(norm, 1.0)
