"""The estimator interface, per-layer preprocessing, option validation, shared helpers, registry.

See the package docstring (`mi_prun.estimators`) for the input contract and the families.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from mi_prun.errors import MiPrunError
from mi_prun.progress import FractionProgress

log = logging.getLogger(__name__)

PREPROCESS = ("none", "center", "standardize", "rms")
RHO_MAX = 1.0 - 1e-6  # |correlation| clip: keeps -1/2 log(1 - rho^2) finite (<= 6.9 nats)
_CONST_REL = 1e-6  # a channel whose std <= _CONST_REL * |mean| (or exactly 0) is constant
_MEM_BUDGET = 256 * 2**20  # bytes for the largest temporary of a batched pair computation
NOISY_FACTOR = 10  # below NOISY_FACTOR x the hard minimum of samples, an estimate is called noisy
SAMPLES_FIX = "capture more positions: raise --positions / --samples / --tokens"
PREPROCESS_HELP = "per-layer preprocessing: none, center, standardize (per channel) or rms (per token)"

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
    """An estimator by registry name; `options` override its own defaults (`default_options()`).

    Options are validated here, before any computation; unknown names, unknown options and bad
    values raise MiPrunError.
    """
    if name not in ESTIMATORS:
        raise MiPrunError(f"unknown estimator {name!r}. Fix: choose one of {', '.join(list_estimators())}.")
    return ESTIMATORS[name](**options)


def describe_estimators() -> list[dict[str, Any]]:
    """One row per registered estimator, sorted by name, for listings (CLI, app, config docs):
    {"name", "description" (first docstring line), "promises_dpi", "has_norm",
    "options": {option: (default, help line)}}."""
    rows = []
    for name in list_estimators():
        cls = ESTIMATORS[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"name": name, "description": doc[0] if doc else "", "promises_dpi": cls.promises_dpi,
                     "has_norm": cls.has_norm,
                     "options": {opt: (default, cls.option_help.get(opt, ""))
                                 for opt, default in cls.default_options().items()}})
    return rows


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
    """Per-layer preprocessing of x (m, d): see the package docstring for the modes."""
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
    z = x64 - mean  # a new (m, d) float64 buffer (never the caller's tensor), worked on in place
    std = (z * z).mean(0, keepdim=True).sqrt()
    const = std <= _CONST_REL * mean.abs()  # includes std == 0
    # In place, the same values as (x - mean) / std with constant channels set to 0.
    z.div_(torch.where(const, 1.0, std)).masked_fill_(const, 0.0)
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
    """Top principal components of x (m, d), each scaled to unit (shrunk) variance: (m, kk), rank.

    kk = min(k, d, m - 1) columns, so a k above the width or the sample count costs no more memory
    than kk; components beyond the numerical rank are zero columns, so every layer of one capture
    (same m and d) has exactly kk columns and layers stack into one (L+1, m, kk) tensor.
    Shrinkage s replaces eigenvalues lambda by (1 - s) lambda + s mu, mu = trace(cov) / d
    (Ledoit-Wolf-style target mu I; the eigenvectors of the shrunk covariance are the same, only
    the whitening changes).
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
    kk = max(0, min(k, d, m - 1))
    lam = evals[:kk].clamp_min(0)
    top = float(lam[0]) if kk > 0 else 0.0
    rank = int((lam > 1e-10 * top).sum()) if top > 0 else 0
    out = torch.zeros(m, kk, dtype=torch.float32, device=x.device)
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
    JSON-serialisable, always including `preprocess`: the one default preprocessing of this
    estimator) and `option_help` (option -> one help line), implement `_prepare(x) -> prepared layer` and `_pair(px, py) -> (mi nats, nmi or
    None)`, override `_span` with a batched computation, `_validate` with checks of their own
    options (using `_int_option`, `_float_option`, `_choice_option`) and `min_samples` where they
    need more than 3 paired samples.
    """

    name: ClassVar[str] = ""
    promises_dpi: ClassVar[bool] = False
    has_norm: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {"preprocess": "none"}
    option_help: ClassVar[dict[str, str]] = {"preprocess": PREPROCESS_HELP}

    def __init__(self, **options: Any):
        unknown = [key for key in options if key not in self.defaults]
        if unknown:
            raise MiPrunError(f"estimator {self.name!r} has no option {unknown[0]!r}. "
                              f"Fix: use one of {', '.join(sorted(self.defaults)) or '(none)'}.")
        self.options: dict[str, Any] = {**self.defaults, **options}
        if "preprocess" in self.options:
            self._choice_option("preprocess", PREPROCESS)
        self._validate()

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """A copy of this estimator's defaults: what `get_estimator(name)` uses with no options."""
        return dict(cls.defaults)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # -- option validation (runs in __init__, before any work)
    def _validate(self) -> None:
        """Check and normalise option values; raise MiPrunError naming the bad option."""

    def _bad(self, option: str, why: str, fix: str | None = None) -> MiPrunError:
        fix = fix or f"pass a valid value, or leave {option} out for the default {self.defaults[option]!r}"
        return MiPrunError(f"estimator {self.name!r}: option {option}={self.options[option]!r} {why}. "
                           f"Fix: {fix}.")

    def _int_option(self, option: str, low: int, high: int | None = None, fix: str | None = None) -> int:
        """An integer option in [low, high]; numpy integers are accepted, bools and floats refused."""
        v = self.options[option]
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise self._bad(option, f"is not an integer (must be an integer {span})", fix)
        v = int(v)
        if v < low or (high is not None and v > high):
            raise self._bad(option, f"is out of range (must be an integer {span})", fix)
        self.options[option] = v
        return v

    def _float_option(self, option: str, low: float, high: float = math.inf, *, low_open: bool = False,
                      fix: str | None = None) -> float:
        """A finite real option in [low, high] (or (low, high] with low_open); ints are accepted."""
        v = self.options[option]
        left = "(" if low_open else "["
        span = f"in {left}{low:g}, {high:g}]" if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}"
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise self._bad(option, f"is not a number (must be a number {span})", fix)
        f = float(v)
        if not math.isfinite(f) or f < low or f > high or (low_open and f == low):
            raise self._bad(option, f"is out of range (must be a number {span})", fix)
        self.options[option] = f
        return f

    def _choice_option(self, option: str, choices: Sequence[str], fix: str | None = None) -> str:
        v = self.options[option]
        if not (isinstance(v, str) and v in choices):
            raise self._bad(option, f"is not one of {', '.join(map(repr, choices))}",
                            fix or f"choose one of {', '.join(choices)}")
        return v

    # -- how many paired samples this estimator needs
    def min_samples(self, dim: int) -> int:
        """Hard minimum of paired samples (positions) for layers of width `dim`: below it the
        estimate is meaningless (for correlations: 0 with 1 sample, the clipping ceiling with 2)."""
        return 3

    def noisy_samples(self, dim: int) -> int:
        """Below this many paired samples the estimate is valid but noisy (default: 10x the minimum)."""
        return NOISY_FACTOR * self.min_samples(dim)

    def check_samples(self, m: int, dim: int) -> str | None:
        """Raise MiPrunError if m paired samples of width `dim` are below `min_samples(dim)`;
        return a warning line if m is below `noisy_samples(dim)`, else None."""
        need = self.min_samples(dim)
        if m < need:
            raise MiPrunError(f"estimator {self.name!r} needs at least {need} paired samples (token "
                              f"positions) for layers of width {dim}, got {m}. Fix: {SAMPLES_FIX}.")
        noisy = self.noisy_samples(dim)
        if m < noisy:
            return (f"estimator {self.name!r}: {m} paired samples (token positions) give a noisy estimate "
                    f"for layers of width {dim}; {noisy} or more are recommended. Fix: {SAMPLES_FIX}.")
        return None

    # -- the two steps every estimator implements
    @abstractmethod
    def _prepare(self, x: torch.Tensor) -> Any:
        """One layer (m, d) float32 -> whatever `_pair` needs."""

    @abstractmethod
    def _pair(self, px: Any, py: Any) -> tuple[float, float | None]:
        """Two prepared layers -> (MI in nats, normalised MI in [0, 1] or None)."""

    def _span(self, preps: list[Any], progress: FractionProgress | None
              ) -> tuple[np.ndarray, np.ndarray | None]:
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
        """MI in nats between x and y, each (m, d) with rows paired; m below `min_samples` is refused."""
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
        self.check_samples(x.shape[0], max(x.shape[1], y.shape[1]))  # hard minimum only, no warning
        return self._prepare(self._pre(x)), self._prepare(self._pre(y))

    def span_matrix(self, H: torch.Tensor, progress: FractionProgress | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """M[i, j] = I(h_i; h_j) for all layers of H (L+1, m, d): (span, span_norm), see package doc.

        First `check_samples(m, d)`: too few positions raise MiPrunError, a noisy count logs a
        warning. `progress(fraction)` is called as the pairs are computed.
        """
        H = _check_capture(H)
        note = self.check_samples(int(H.shape[1]), int(H.shape[2]))
        if note:
            log.warning("%s", note)
        preps = self._prepare_all(H)
        span, norm = self._span(preps, progress)
        if progress:
            progress(1.0)
        return span, norm

    def block_mi(self, H: torch.Tensor) -> np.ndarray:
        """(L,) MI_b = I(h_b; h_{b+1}); prepares each layer once, keeps two at a time.

        No sample-count check: it serves the per-group stability estimates, whose groups are
        smaller than the capture by design (call `check_samples` first where that matters).
        """
        H = _check_capture(H)
        out = np.empty(H.shape[0] - 1)
        prev = self._prepare(self._pre(_layer(H[0], "H[0]")))
        for b in range(1, H.shape[0]):
            cur = self._prepare(self._pre(_layer(H[b], f"H[{b}]")))
            out[b - 1] = self._pair(prev, cur)[0]
            prev = cur
        return out
