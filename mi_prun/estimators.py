"""Mutual-information estimators behind one interface, for hidden states of transformer blocks.

Input contract: a capture is a float tensor `H` of shape (L+1, m, d): `H[b]` holds m paired samples
(token positions) of the hidden state h_b (h_0 = input of block 0, h_{b+1} = output of block b).
Every estimator gives

  mi(x, y)        MI in nats between two (m, d) layers (positions are the paired samples)
  nmi(x, y)       a normalised variant in [0, 1], or None where the estimator defines none
  span_matrix(H)  (span, span_norm): span (L+1, L+1) symmetric with NaN on the diagonal,
                  span_norm likewise with 1 on the diagonal (or None)
  block_mi(H)     (L,) MI between consecutive layers, without the cost of the full span matrix

Every estimator works in two steps: `_prepare` turns one layer into what the estimator needs
(standardised channels, a whitened PCA basis, a Gram matrix, bin codes, ...), once per layer;
`_pair` / `_span` then combine prepared layers. `span_matrix` prepares each layer once and computes
all pairs as batched matrix products, so it costs little more than L+1 preparations.

Estimators (see each class for its normalised variant):

  gaussian-channel  mean over channels of -1/2 log(1 - rho_c^2) (per-channel Gaussian MI)
  gaussian-joint    -1/2 sum_i log(1 - p_i^2) over canonical correlations on a PCA subspace
  renyi-kernel      matrix-based Renyi alpha-entropy MI on Gaussian-kernel Gram matrices
  binning           per-channel plug-in MI on quantile bins, averaged over channels
  ksg               Kraskov-Stoegbauer-Grassberger (algorithm 1) on a whitened PCA subspace

`promises_dpi` says whether the quantity an estimator targets obeys the data processing
inequality for every Markov chain (Shannon MI between the two layers, or between fixed reductions
of them). Per-channel averages do not: a rotation between layers moves information across channels,
so mean_c I(x_c; z_c) can exceed mean_c I(y_c; z_c) although x -> y -> z. They still obey DPI on
chains whose channels evolve separately (as a residual stream roughly does); `scores.dpi_report`
checks it on the real span matrix either way.

Per-layer preprocessing (option `preprocess`): "none", "center", "standardize" (per channel),
"rms" (each token vector divided by its root mean square, the per-token normalisation LLM hidden
states need: a few huge channels and the attention-sink position dominate otherwise). Constant
channels never produce NaN: they are treated as carrying no information and logged as a warning.

Computation stays on H's device in float32; log-dets, eigen- and singular-value decompositions run
in float64.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

PREPROCESS = ("none", "center", "standardize", "rms")
RHO_MAX = 1.0 - 1e-6  # |correlation| clip: keeps -1/2 log(1 - rho^2) finite (<= 6.9 nats)
_CONST_REL = 1e-6  # a channel whose std <= _CONST_REL * |mean| (or exactly 0) is constant
_MEM_BUDGET = 256 * 2**20  # bytes for the largest temporary of a batched pair computation

Progress = Callable[[float], None]

# ----------------------------------------------------------------------------- registry

ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator adding an estimator under `cls.name`; refuses a name already taken."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise MiPrunError(f"{cls.__name__} has no `name`; an estimator needs one to be registered.")
    if name in ESTIMATORS:
        raise MiPrunError(f"estimator name {name!r} is already registered by "
                          f"{ESTIMATORS[name].__name__}; choose another name.")
    ESTIMATORS[name] = cls
    return cls


def list_estimators() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(ESTIMATORS)


def get_estimator(name: str, **options: Any) -> Estimator:
    """An estimator by registry name with `options`; unknown names or options raise MiPrunError."""
    if name not in ESTIMATORS:
        raise MiPrunError(f"unknown estimator {name!r}. Fix: choose one of {', '.join(list_estimators())}.")
    return ESTIMATORS[name](**options)


# ----------------------------------------------------------------------------- helpers

def _layer(x: Any, what: str = "x") -> torch.Tensor:
    """A (m, d) float32 tensor on its own device; 1-D input is one channel."""
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise MiPrunError(f"{what} must have shape (m, d), got {tuple(t.shape)}.")
    if not torch.is_floating_point(t):
        t = t.float()
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise MiPrunError(f"{what} contains NaN or inf. Fix: check the capture (a block overflowed?).")
    return t


def _check_capture(H: Any) -> torch.Tensor:
    t = torch.as_tensor(H)
    if t.ndim != 3 or t.shape[0] < 2:
        raise MiPrunError(f"a capture must have shape (L+1, m, d) with L >= 1, got {tuple(t.shape)}.")
    return t


def preprocess_layer(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-layer preprocessing of x (m, d): see the module docstring for the modes."""
    if mode == "none":
        return x
    if mode == "center":
        return x - x.mean(0, keepdim=True)
    if mode == "standardize":
        return standardize(x)[0]
    if mode == "rms":
        rms = x.pow(2).mean(1, keepdim=True).sqrt()  # (m, 1)
        # An all-zero token stays zero instead of becoming 0/0.
        return torch.where(rms > 0, x / rms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    raise MiPrunError(f"unknown preprocess {mode!r}; choose one of {', '.join(PREPROCESS)}.")


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Zero-mean, unit-variance (population) channels of x (m, d) and the number of constant channels.

    Constant channels become 0, so every correlation with them is 0 ("no information").
    Mean and std are computed in float64: a float32 sum of a constant would leave rounding noise
    that looks like signal after division by a tiny std.
    """
    x64 = x.double()
    mean = x64.mean(0, keepdim=True)  # (1, d)
    std = (x64 - mean).pow(2).mean(0, keepdim=True).sqrt()
    const = std <= _CONST_REL * mean.abs()  # includes std == 0
    z = torch.where(const, torch.zeros_like(x64), (x64 - mean) / torch.where(const, 1.0, std))
    return z.to(torch.float32), int(const.sum())


def _warn_constant(counts: dict[str, int], d: int, how: str) -> None:
    """One warning for all layers with constant channels (layer label -> count)."""
    bad = {k: v for k, v in counts.items() if v}
    if bad:
        where = ", ".join(f"{k}: {v}/{d}" for k, v in bad.items())
        log.warning("constant (zero-variance) channels treated as carrying no information (%s): %s",
                    how, where)


def _sym(upper: np.ndarray, diag: float) -> np.ndarray:
    """Symmetric matrix from its strict upper triangle, `diag` on the diagonal."""
    out = np.triu(upper, 1)
    out = out + out.T
    np.fill_diagonal(out, diag)
    return out


def _subsample_index(m: int, n: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """Sorted indices of n of m positions (None = all); depends only on (m, n, seed), so the
    same positions are taken from every layer and pairing is kept."""
    if m <= n:
        return None
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(m, generator=g)[:n].sort().values.to(device)


def _whitened_pca(x: torch.Tensor, k: int, shrinkage: float) -> tuple[torch.Tensor, int]:
    """Top-k principal components of x (m, d), each scaled to unit (shrunk) variance: (m, k), rank.

    Components beyond the numerical rank are zero columns, so every layer has exactly k columns and
    layers stack into one (L+1, m, k) tensor. Shrinkage s replaces eigenvalues lambda by
    (1 - s) lambda + s mu, mu = trace(cov) / d (Ledoit-Wolf-style target mu I; the eigenvectors of
    the shrunk covariance are the same, only the whitening changes).
    """
    m, d = x.shape
    xc = x - x.mean(0, keepdim=True)
    # Covariance from the smaller Gram: (d, d) when d <= m, else the (m, m) dual (same nonzero spectrum).
    if d <= m:
        cov = (xc.T @ xc).double() / max(m - 1, 1)  # (d, d)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)
        mu = float(cov.diagonal().mean())
    else:
        gram = (xc @ xc.T).double() / max(m - 1, 1)  # (m, m)
        evals, u = torch.linalg.eigh(gram)
        evals, u = evals.flip(0), u.flip(1)
        mu = float(gram.diagonal().sum()) / d
        evecs = None
    kk = min(k, d, m - 1)
    lam = evals[:kk].clamp_min(0)
    top = float(lam[0]) if kk > 0 else 0.0
    rank = int((lam > 1e-10 * top).sum()) if top > 0 else 0
    out = torch.zeros(m, k, dtype=torch.float32, device=x.device)
    if rank == 0:
        return out, 0
    lam_r = lam[:rank]
    lam_s = (1.0 - shrinkage) * lam_r + shrinkage * mu
    if evecs is not None:
        proj = xc.double() @ evecs[:, :rank]  # (m, rank), variance lam_r
    else:
        proj = u[:, :rank] * (lam_r * max(m - 1, 1)).sqrt()  # left singular vectors * singular values
    out[:, :rank] = (proj / lam_s.sqrt()).to(torch.float32)
    return out, rank


# ----------------------------------------------------------------------------- interface

class Estimator(ABC):
    """MI between two layers of paired samples.

    Subclasses set `name`, `promises_dpi`, `has_norm`, `defaults` (option -> default value, all
    JSON-serialisable) and implement `_prepare(x) -> prepared layer` and
    `_pair(px, py) -> (mi nats, nmi or None)`; they override `_span` with a batched computation.
    """

    name: ClassVar[str] = ""
    promises_dpi: ClassVar[bool] = False
    has_norm: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        for key in options:
            if key not in self.defaults:
                raise MiPrunError(f"estimator {self.name!r} has no option {key!r}. "
                                  f"Fix: use one of {', '.join(sorted(self.defaults)) or '(none)'}.")
        self.options: dict[str, Any] = {**self.defaults, **options}
        if "preprocess" in self.options and self.options["preprocess"] not in PREPROCESS:
            raise MiPrunError(f"estimator {self.name!r}: preprocess={self.options['preprocess']!r} is "
                              f"not one of {', '.join(PREPROCESS)}.")
        self._validate()

    def _validate(self) -> None:
        """Check option values; raise MiPrunError naming the bad option."""

    def _bad(self, option: str, why: str) -> MiPrunError:
        return MiPrunError(f"estimator {self.name!r}: option {option}={self.options[option]!r} {why}.")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # -- the two steps every estimator implements
    @abstractmethod
    def _prepare(self, x: torch.Tensor) -> Any:
        """One layer (m, d) float32 -> whatever `_pair` needs."""

    @abstractmethod
    def _pair(self, px: Any, py: Any) -> tuple[float, float | None]:
        """Two prepared layers -> (MI in nats, normalised MI in [0, 1] or None)."""

    def _span(self, preps: list[Any], progress: Progress | None) -> tuple[np.ndarray, np.ndarray | None]:
        """All pairs i < j of prepared layers; default: a loop over `_pair`."""
        n = len(preps)
        span = np.full((n, n), np.nan)
        norm = np.full((n, n), np.nan) if self.has_norm else None
        total, done = n * (n - 1) // 2, 0
        for i in range(n):
            for j in range(i + 1, n):
                span[i, j], v = self._pair(preps[i], preps[j])
                if norm is not None:
                    norm[i, j] = v
                done += 1
            if progress:
                progress(done / max(total, 1))
        return _sym(span, np.nan), (_sym(norm, 1.0) if norm is not None else None)

    def _prepare_all(self, H: torch.Tensor) -> list[Any]:
        return [self._prepare(self._pre(_layer(H[b], f"H[{b}]"))) for b in range(H.shape[0])]

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return preprocess_layer(x, self.options.get("preprocess", "none"))

    # -- public interface
    def mi(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """MI in nats between x and y, each (m, d) with rows paired."""
        px, py = self._prepare_pair(x, y)
        return float(self._pair(px, py)[0])

    def nmi(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Normalised MI in [0, 1], or None where this estimator defines none."""
        if not self.has_norm:
            return None
        px, py = self._prepare_pair(x, y)
        v = self._pair(px, py)[1]
        return None if v is None else float(v)

    def _prepare_pair(self, x: Any, y: Any) -> tuple[Any, Any]:
        x, y = _layer(x, "x"), _layer(y, "y")
        if x.shape[0] != y.shape[0]:
            raise MiPrunError(f"x and y must have the same number of paired samples, got "
                              f"{x.shape[0]} and {y.shape[0]}.")
        return self._prepare(self._pre(x)), self._prepare(self._pre(y))

    def span_matrix(self, H: torch.Tensor, progress: Progress | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """M[i, j] = I(h_i; h_j) for all layers of H (L+1, m, d): (span, span_norm), see module doc.

        `progress(fraction)` is called as the pairs are computed.
        """
        H = _check_capture(H)
        preps = self._prepare_all(H)
        span, norm = self._span(preps, progress)
        if progress:
            progress(1.0)
        return span, norm

    def block_mi(self, H: torch.Tensor) -> np.ndarray:
        """(L,) MI_b = I(h_b; h_{b+1}); prepares each layer once, keeps two at a time."""
        H = _check_capture(H)
        out = np.empty(H.shape[0] - 1)
        prev = self._prepare(self._pre(_layer(H[0], "H[0]")))
        for b in range(1, H.shape[0]):
            cur = self._prepare(self._pre(_layer(H[b], f"H[{b}]")))
            out[b - 1] = self._pair(prev, cur)[0]
            prev = cur
        return out


def _common_options(**extra: Any) -> dict[str, Any]:
    return {"preprocess": "rms", **extra}


# ----------------------------------------------------------------------------- gaussian-channel

@register
class GaussianChannel(Estimator):
    """Per-channel Gaussian MI: mean over channels c of -1/2 log(1 - rho_c^2), rho_c = corr(x_c, y_c).

    |rho| is clipped to 1 - 1e-6. Constant channels have rho = 0 (and still count in the mean).
    Normalised variant: mean over channels of rho_c^2 (= 1 - exp(-2 I_c), Linfoot's informational
    coefficient of correlation, squared), in [0, 1].
    Requires the same channel count in both layers.
    """

    name = "gaussian-channel"
    promises_dpi = False  # a mean of per-channel MIs, see the module docstring
    defaults = _common_options()

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

    def _span(self, preps: list[torch.Tensor], progress: Progress | None):
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


# ----------------------------------------------------------------------------- gaussian-joint

@register
class GaussianJoint(Estimator):
    """Joint Gaussian MI through canonical correlations on a PCA subspace.

    Each layer is projected on its top-`k` principal components and whitened (with optional
    covariance shrinkage towards mu I, `shrinkage` in [0, 1]); the canonical correlations p_i are the
    singular values of the whitened cross-covariance, and I = -1/2 sum_i log(1 - p_i^2)
    (p clipped to 1 - 1e-6). Normalised variant: mean over the min(rank_x, rank_y) canonical pairs
    of p_i^2 (Pillai's trace / k), in [0, 1]; 0 when a layer is constant.
    Expect a positive small-sample bias of about k^2 / (2m) nats: keep m >> k^2 or compare only
    estimates made with the same k and m.
    """

    name = "gaussian-joint"
    promises_dpi = True
    defaults = _common_options(k=64, shrinkage=0.0)

    def _validate(self) -> None:
        if not (isinstance(self.options["k"], int) and self.options["k"] >= 1):
            raise self._bad("k", "must be an integer >= 1")
        if not (0.0 <= float(self.options["shrinkage"]) <= 1.0):
            raise self._bad("shrinkage", "must be in [0, 1]")

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.shape[0] < 3:
            raise MiPrunError(f"{self.name} needs at least 3 paired samples, got {x.shape[0]}.")
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
        c = (wx.T @ wy).double() / (wx.shape[0] - 1)  # (k, k) whitened cross-covariance
        p = torch.linalg.svdvals(c)
        mi, nmi = self._from_p(p, torch.tensor(float(min(rx, ry)), dtype=torch.float64, device=p.device))
        return float(mi), float(nmi)

    def _span(self, preps, progress):
        W = torch.stack([w for w, _ in preps])  # (L+1, m, k)
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


# ----------------------------------------------------------------------------- renyi-kernel

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
    I = S(A) + S(B) - S(A, B), in nats. alpha = 2 uses the closed form sum lambda^2 = ||.||_F^2
    (method "auto"); other alpha, or method "eigen", use float64 eigenvalues.

    Bandwidth: "median" (median pairwise distance), "scott" = n^(-1/(d+4)) s and "silverman" =
    (4/(d+2))^(1/(d+4)) n^(-1/(d+4)) s with s = sqrt(total variance), i.e. the rules applied to the
    overall scale of the vectors (with the per-dimension std they make K = I in high dimension),
    or a fixed positive float.

    Normalised variant: I / sqrt(S(A) S(B)), clipped to [0, 1] (S(A o B) >= max(S(A), S(B)),
    so I <= min(S(A), S(B))). Note that identical inputs do not give I = S(A): A o A is the Gram
    of a narrower kernel, with more entropy than A. They do when K is a 0/1 block matrix
    (well-separated clusters), the case the tests use.
    """

    name = "renyi-kernel"
    promises_dpi = False  # matrix-based Renyi MI has no DPI guarantee for arbitrary kernels
    defaults = _common_options(alpha=2.0, bandwidth="median", max_samples=1024, seed=0, method="auto")

    def _validate(self) -> None:
        o = self.options
        if not (isinstance(o["alpha"], (int, float)) and o["alpha"] > 0):
            raise self._bad("alpha", "must be a number > 0")
        bw = o["bandwidth"]
        if not ((isinstance(bw, str) and bw in ("median", "scott", "silverman"))
                or (isinstance(bw, (int, float)) and not isinstance(bw, bool) and bw > 0)):
            raise self._bad("bandwidth", "must be 'median', 'scott', 'silverman' or a float > 0")
        if not (isinstance(o["max_samples"], int) and o["max_samples"] >= 3):
            raise self._bad("max_samples", "must be an integer >= 3")
        if o["method"] not in ("auto", "eigen"):
            raise self._bad("method", "must be 'auto' or 'eigen'")

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
        if x.shape[0] < 3:
            raise MiPrunError(f"{self.name} needs at least 3 paired samples, got {x.shape[0]}.")
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


# ----------------------------------------------------------------------------- binning

@register
class Binning(Estimator):
    """Per-channel plug-in MI on quantile bins, averaged over channels (comparable to gaussian-channel).

    Each channel is cut into `bins` equal-count bins (edges at its empirical quantiles; tied values
    share a bin, so a constant channel is one bin with zero entropy and zero MI). I_c is the plug-in
    MI of the (bins x bins) joint histogram; plug-in MI is biased up by about (bins-1)^2 / (2m) nats.
    Normalised variant: mean over channels of I_c / sqrt(H(x_c) H(y_c)) (0 where an entropy is 0),
    in [0, 1].
    """

    name = "binning"
    promises_dpi = False  # a mean of per-channel MIs, see the module docstring
    defaults = _common_options(bins=16)

    def _validate(self) -> None:
        b = self.options["bins"]
        if not (isinstance(b, int) and 2 <= b <= 256):
            raise self._bad("bins", "must be an integer in [2, 256]")

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


# ----------------------------------------------------------------------------- ksg

@register
class KSG(Estimator):
    """Kraskov-Stoegbauer-Grassberger MI estimator (algorithm 1), max-norm, on a reduced dimension.

    Each layer is projected on its top-`k` principal components, whitened, and `max_samples`
    positions are kept (the same seeded subset for every layer). A seeded jitter of 1e-6 (in units
    of the whitened scale) breaks ties between duplicated positions. With eps_a the max-norm distance
    to the `k_neighbors`-th neighbour in the joint space, n_x(a) and n_y(a) the counts of points
    strictly closer than eps_a in each marginal space:
        I = psi(k_neighbors) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >,
    clipped at 0 (the raw estimate scatters around 0 for independent inputs). A constant layer
    gives 0. No normalised variant (nmi is None).
    """

    name = "ksg"
    promises_dpi = True
    has_norm = False
    defaults = _common_options(k=8, k_neighbors=3, max_samples=1024, seed=0)

    def _validate(self) -> None:
        o = self.options
        for key, low in (("k", 1), ("k_neighbors", 1), ("max_samples", 4)):
            if not (isinstance(o[key], int) and o[key] >= low):
                raise self._bad(key, f"must be an integer >= {low}")

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """-> max-norm distances D (n, n) with +inf on the diagonal, D with each row sorted (for
        neighbour counts by binary search), and whether x is constant."""
        kn = int(self.options["k_neighbors"])
        if x.shape[0] < max(4, kn + 2):
            raise MiPrunError(f"{self.name} needs more than k_neighbors + 1 paired samples, "
                              f"got {x.shape[0]}.")
        w, rank = _whitened_pca(x, int(self.options["k"]), 0.0)  # (m, k)
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
