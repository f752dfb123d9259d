"""Block scores from one capture: block MI, the DPI span matrix and its checks, stability across
calibration samples, and the baseline criteria (cosine Block Influence, angular distance, random).

Input contract (as in `mi_prun.estimators`): `H` (L+1, m, d) float tensor, `H[b]` = m token
positions of h_b (h_0 = input of block 0, h_{b+1} = output of block b); `batch_index` (m,) long
tensor, the calibration sample (0..N-1) each position came from. Blocks are numbered from 0.
Everything returned is numpy (or plain JSON types), ready for `mi_prun.results.Analysis`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from mi_prun.config import DPI_TOL
from mi_prun.errors import MiPrunError
from mi_prun.progress import FractionProgress, Progress
from mi_prun.estimators import Estimator, get_estimator

log = logging.getLogger(__name__)

N_GROUPS = 8
_MEM_BUDGET = 256 * 2**20  # bytes for the largest temporary of the batched baseline passes



def _estimator(estimator: Estimator | str) -> Estimator:
    return get_estimator(estimator) if isinstance(estimator, str) else estimator


def _capture(H: Any) -> torch.Tensor:
    t = torch.as_tensor(H)
    if t.ndim != 3 or t.shape[0] < 2:
        raise MiPrunError(f"a capture must have shape (L+1, m, d) with L >= 1, got {tuple(t.shape)}.")
    return t


# ----------------------------------------------------------------------------- span and block MI

def block_mi_from_span(span: np.ndarray) -> np.ndarray:
    """(L,) MI_b = span[b, b+1] (high = redundant)."""
    span = np.asarray(span)
    return np.array([span[b, b + 1] for b in range(span.shape[0] - 1)], dtype=float)


# ----------------------------------------------------------------------------- DPI

def _tolerance(tol: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(tol, (int, float)):
        rtol = atol = float(tol)
    else:
        rtol, atol = (float(v) for v in tol)
    if rtol < 0 or atol < 0:
        raise MiPrunError(f"DPI tolerance must be non-negative, got rtol={rtol}, atol={atol}.")
    return rtol, atol


def dpi_report(span: np.ndarray, tol: float | tuple[float, float] = DPI_TOL, top: int = 10) -> dict[str, Any]:
    """Violations of the data processing inequality in a span matrix.

    DPI: M[i, j] <= M[i', j'] for all sub-spans i <= i' < j' <= j, (i', j') != (i, j). The tightest
    such bound of cell (i, j) is min over its sub-spans; by dynamic programming over span length,
        bound[i, j] = min(M[i+1, j], M[i, j-1], bound[i+1, j], bound[i, j-1]),
    since every proper sub-span lies in (i+1, j) or (i, j-1). Cells with j - i = 1 have no bound.

    Tolerance: `tol` = (rtol, atol) (a single float sets both); cell (i, j) violates DPI iff
        excess = M[i, j] - bound[i, j] > atol + rtol * |bound[i, j]|.
    NaN cells are skipped (neither violate nor bound).

    Returns a JSON-serialisable dict except "bound", the (L+1, L+1) numpy matrix of bounds
    (symmetric, NaN where none): "tolerance" {"rtol", "atol", "rule"}, "n_cells" (cells with a
    bound), "n_violations", "cells" ([i, j] of every violation, i < j), "worst" (the `top` largest
    excesses: {"i", "j", "value", "bound", "excess", "bound_cell": [i', j']}), "max_excess".
    """
    M = np.asarray(span, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise MiPrunError(f"a span matrix must be square, got shape {M.shape}.")
    rtol, atol = _tolerance(tol)
    n = M.shape[0]
    bound = np.full((n, n), np.nan)
    cell = np.full((n, n, 2), -1, dtype=int)  # where bound[i, j] is attained
    for length in range(2, n):
        for i in range(n - length):
            j = i + length
            cands = [(M[i + 1, j], (i + 1, j)), (M[i, j - 1], (i, j - 1)),
                     (bound[i + 1, j], tuple(cell[i + 1, j])), (bound[i, j - 1], tuple(cell[i, j - 1]))]
            cands = [(v, c) for v, c in cands if np.isfinite(v)]
            if cands:
                v, c = min(cands, key=lambda t: t[0])
                bound[i, j] = bound[j, i] = v
                cell[i, j] = c
    rows = []
    n_cells = 0
    for i in range(n):
        for j in range(i + 2, n):
            b, v = bound[i, j], M[i, j]
            if not (np.isfinite(b) and np.isfinite(v)):
                continue
            n_cells += 1
            excess = v - b
            if excess > atol + rtol * abs(b):
                rows.append({"i": i, "j": j, "value": float(v), "bound": float(b), "excess": float(excess),
                             "bound_cell": [int(cell[i, j, 0]), int(cell[i, j, 1])]})
    rows.sort(key=lambda r: -r["excess"])
    return {
        "tolerance": {"rtol": rtol, "atol": atol, "rule": "M[i,j] - bound[i,j] > atol + rtol*|bound[i,j]|"},
        "n_cells": n_cells,
        "n_violations": len(rows),
        "cells": sorted([r["i"], r["j"]] for r in rows),
        "worst": rows[:top],
        "max_excess": float(max((r["excess"] for r in rows), default=0.0)),
        "bound": bound,
    }


# ----------------------------------------------------------------------------- stability

def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b of two score vectors (ties handled): 1 = same order, -1 = reversed.

    tau_b = (n_c - n_d) / sqrt((n0 - t_a)(n0 - t_b)), n0 = n(n-1)/2 pairs, t_a/t_b pairs tied in a/b.
    NaN when either vector is constant (or shorter than 2) or contains NaN.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise MiPrunError(f"kendall_tau needs vectors of the same length, got {a.size} and {b.size}.")
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    iu = np.triu_indices(a.size, 1)
    sa = np.sign(a[:, None] - a[None, :])[iu]  # (pairs,)
    sb = np.sign(b[:, None] - b[None, :])[iu]
    n0 = sa.size
    den = np.sqrt(float(n0 - np.sum(sa == 0)) * float(n0 - np.sum(sb == 0)))
    return float(np.sum(sa * sb) / den) if den > 0 else float("nan")


def _split_samples(batch_index: torch.Tensor, n: int, seed: int) -> list[np.ndarray]:
    """The calibration samples, shuffled with `seed`, split into n near-equal groups."""
    samples = np.unique(batch_index.cpu().numpy())
    perm = np.random.default_rng(seed).permutation(samples)
    return [g for g in np.array_split(perm, min(n, samples.size)) if g.size]


def _positions(batch_index: torch.Tensor, samples: np.ndarray) -> torch.Tensor:
    mask = torch.isin(batch_index, torch.as_tensor(samples, device=batch_index.device))
    return mask.nonzero().squeeze(1)


def stability(H: torch.Tensor, batch_index: torch.Tensor, estimator: Estimator | str,
              n_groups: int = N_GROUPS, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Block MI per group of calibration samples, and rank agreement between two halves.

    The calibration samples (distinct values of batch_index) are shuffled with `seed` and split into
    B = min(n_groups, N) groups; each group's positions give one block-MI vector. Separately, the
    samples are split into two disjoint halves and the Kendall tau-b between the halves' block-MI
    vectors measures how reproducible the ranking is.

    Returns block_mi_batches (L, B) and info {"kendall_tau_halves" (None when N < 2), "n_groups",
    "n_samples", "group_n_samples", "group_n_positions", "block_mi_halves" (2 x L), "rel_std"
    (mean over blocks of std / |mean| across groups), "seed"}.
    """
    H = _capture(H)
    est = _estimator(estimator)
    batch_index = torch.as_tensor(batch_index).to(H.device).long()
    if batch_index.shape != (H.shape[1],):
        raise MiPrunError(f"batch_index must have shape ({H.shape[1]},) like the capture's positions, "
                          f"got {tuple(batch_index.shape)}.")
    if n_groups < 1:
        raise MiPrunError(f"n_groups must be >= 1, got {n_groups}.")
    groups = _split_samples(batch_index, n_groups, seed)
    cols, n_pos = [], []
    for g in groups:
        pos = _positions(batch_index, g)
        n_pos.append(int(pos.numel()))
        cols.append(est.block_mi(H[:, pos]))
    batches = np.stack(cols, axis=1)  # (L, B)
    info: dict[str, Any] = {"n_groups": len(groups), "n_samples": int(sum(g.size for g in groups)),
                            "group_n_samples": [int(g.size) for g in groups], "group_n_positions": n_pos,
                            "seed": seed}
    halves = _split_samples(batch_index, 2, seed + 1)
    if len(halves) == 2:
        mis = [est.block_mi(H[:, _positions(batch_index, h)]) for h in halves]
        tau = kendall_tau(mis[0], mis[1])
        info["kendall_tau_halves"] = None if np.isnan(tau) else tau
        info["block_mi_halves"] = [v.tolist() for v in mis]
    else:
        info["kendall_tau_halves"] = None
        info["block_mi_halves"] = None
        info["note"] = "one calibration sample: no halves to compare"
    mean = batches.mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(mean) > 0, batches.std(1) / np.abs(mean), 0.0)
    info["rel_std"] = float(np.mean(rel))
    return batches, info


# ----------------------------------------------------------------------------- baselines

def cosine_block_influence(H: torch.Tensor) -> np.ndarray:
    """(L,) ShortGPT Block Influence BI_b = 1 - mean over positions of cos(h_b, h_{b+1});
    high = important. A zero vector has cosine 0 with everything."""
    H = _capture(H)
    out = np.empty(H.shape[0] - 1)
    for b in range(H.shape[0] - 1):
        x, y = H[b].double(), H[b + 1].double()  # (m, d); float64 so identical vectors give BI 0
        den = (x.norm(dim=1) * y.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)
        out[b] = 1.0 - float(((x * y).sum(1) / den).mean())
    return out


def angular_distance_matrix(H: torch.Tensor) -> np.ndarray:
    """(L+1, L+1) mean over positions of arccos(cos(h_i, h_j)) / pi (Gromov et al.): symmetric,
    0 on the diagonal, in [0, 1]; entry (i, j) is the cost of removing the window i..j-1.

    One batched pass: per chunk of positions, all (L+1)^2 cosines as one batched product.
    Orthogonal vectors give 0.5; a zero vector counts as orthogonal to everything.
    """
    H = _capture(H)
    n, m, d = H.shape
    acc = torch.zeros(n, n, dtype=torch.float64, device=H.device)
    chunk = max(1, _MEM_BUDGET // (8 * 2 * n * d))
    for p0 in range(0, m, chunk):
        u = H[:, p0:p0 + chunk].double()  # (L+1, c, d); float64: arccos is ill-conditioned near 1
        u = u / u.norm(dim=2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        cos = torch.einsum("icd,jcd->cij", u, u).clamp(-1.0, 1.0)  # (c, L+1, L+1)
        acc += torch.arccos(cos).sum(0)
    out = (acc / (m * np.pi)).cpu().numpy()
    out = (out + out.T) / 2
    np.fill_diagonal(out, 0.0)
    return out


# ----------------------------------------------------------------------------- linear predictability

SPAN_LINEAR_RANK = 64  # principal directions per layer: bounds the cost for large d
SPAN_LINEAR_RIDGE = 1e-3  # ridge lambda relative to the mean eigenvalue, as in mi_prun.heal


def _top_eigen(C: torch.Tensor, r: int, seed: int = 0, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenvalues (descending) and eigenvectors (d, r) of the PSD matrix C (float64):
    exact for small d, else seeded randomized subspace iteration (O(d^2 r) per iteration)."""
    d = C.shape[0]
    if d <= 2 * r + 16:
        e, W = torch.linalg.eigh(C)
        return e.flip(0)[:r], W.flip(1)[:, :r]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.linalg.qr(C @ torch.randn(d, r + 16, generator=gen, dtype=C.dtype).to(C.device)).Q
    for _ in range(iters):
        Q = torch.linalg.qr(C @ Q).Q
    e, V = torch.linalg.eigh(Q.T @ C @ Q)
    return e.flip(0)[:r], (Q @ V.flip(1))[:, :r]


def span_unexplained(H: torch.Tensor, rank: int = SPAN_LINEAR_RANK, ridge: float = SPAN_LINEAR_RIDGE,
                     progress: FractionProgress | None = None) -> np.ndarray:
    """(L+1, L+1) U[i, j]: the fraction of h_j's variance that the best linear map from h_i leaves
    unexplained (0 = h_j is a linear function of h_i; 1 = no linear relation). Not symmetric;
    U[i, i] = 0. For i < j it predicts how much of the removed run i..j-1 a linear bridge (the
    healing of `mi_prun.heal`) can give back.

    Per layer b, centred X_b (m, d) has principal directions u_bc (unit vectors in sample space)
    with eigenvalues e_bc, c = 1..r, r = min(rank, d, m - 1). The ridge regression of X_j on the
    top-r principal components of X_i with lambda = ridge x mean eigenvalue shrinks component c
    by f_c = e_c / (e_c + lambda) and explains sum_c f_c (2 - f_c) |u_ic^T X_j|^2 of X_j's
    variance. Both sides are kept to their top r components (exact when r = d): U is the share of
    the variance in h_j's top-r principal subspace left unexplained. All pairs come from one
    ((L+1) r x (L+1) r) product: O((L+1) m d^2 + m (L+1)^2 r^2) flops in all.
    """
    H = _capture(H)
    n, m, d = H.shape
    r = max(1, min(int(rank), d, m - 1))
    bases, scores, total = [], [], []
    for b in range(n):
        X = H[b].float()
        X = X - X.mean(0)
        if m <= d:
            # Fewer samples than channels (an 8B model's 4096 channels on 512 tokens): the nonzero
            # eigenvalues of X^T X are those of the (m, m) Gram matrix X X^T = U E U^T, and the
            # principal component scores are U sqrt(E), exactly; O(m^2 d) instead of O(d^2 m).
            K = (X @ X.T).double()
            ek, U = torch.linalg.eigh(K)
            e, U = ek.flip(0)[:r].clamp_min(0.0), U.flip(1)[:, :r]
            S = (U * e.sqrt()).float()  # (m, r); S[:, c] = sqrt(e_c) u_c
            trace = float(torch.diagonal(K).sum())
        else:
            C = (X.T @ X).double()
            e, W = _top_eigen(C, r, seed=b)
            e = e.clamp_min(0.0)
            S = X @ W.float()  # (m, r) principal component scores; S[:, c] = sqrt(e_c) u_c
            trace = float(torch.diagonal(C).sum())
        lam = ridge * trace / d
        f = e / (e + lam) if lam > 0 else (e > 0).double()
        inv = torch.where(e > 0, e.rsqrt(), torch.zeros_like(e))
        bases.append(S * (inv * (f * (2 - f)).sqrt()).float())  # sqrt(weight_c) u_c
        scores.append(S)
        total.append(float(e.sum()))
        if progress:
            progress(0.8 * (b + 1) / n)
    G = torch.cat(bases, 1).T @ torch.cat(scores, 1)  # ((L+1) r, (L+1) r)
    explained = (G.double() ** 2).reshape(n, r, n, r).sum(dim=(1, 3))  # [i, j]
    tot = torch.tensor(total, dtype=torch.float64, device=explained.device)
    out = torch.where(tot[None, :] > 0, 1.0 - explained / tot.clamp_min(1e-300)[None, :],
                      torch.zeros_like(explained))
    out = out.clamp(0.0, 1.0).cpu().numpy()
    np.fill_diagonal(out, 0.0)
    if progress:
        progress(1.0)
    return out


# ----------------------------------------------------------------------------- all together

def score_capture(H: torch.Tensor, batch_index: torch.Tensor, estimator: Estimator | str, *,
                  dpi_tol: float | tuple[float, float] = DPI_TOL, n_groups: int = N_GROUPS, seed: int = 0,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Every score of one capture: exactly the `mi_prun.results.Analysis` fields scoring fills.

    Returns {"block_mi" (L,), "span", "span_norm", "dpi" (see dpi_report; plus
    "estimator_promises_dpi"), "block_mi_batches" (L, B), "stability", "baselines"
    {"cosine_bi", "angular"}, "timings" (seconds per stage: span, dpi, stability, baselines, total)}.
    `progress(stage, fraction, message)` is called during and after each stage.
    """
    H = _capture(H)
    est = _estimator(estimator)

    def report(stage: str, fraction: float, message: str) -> None:
        if progress:
            progress(stage, float(fraction), message)

    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()
    report("span", 0.0, f"{est.name}: MI of {H.shape[0] * (H.shape[0] - 1) // 2} layer pairs")
    span, span_norm = est.span_matrix(H, progress=lambda f: report("span", f, "span matrix"))
    block_mi = block_mi_from_span(span)
    timings["span"] = time.perf_counter() - t

    t = time.perf_counter()
    dpi = dpi_report(span, dpi_tol)
    dpi["estimator_promises_dpi"] = bool(est.promises_dpi)
    if dpi["n_violations"] and est.promises_dpi:
        log.warning("%s: %d of %d span cells break DPI beyond tolerance (worst excess %.3g nats)",
                    est.name, dpi["n_violations"], dpi["n_cells"], dpi["max_excess"])
    timings["dpi"] = time.perf_counter() - t
    report("dpi", 1.0, f"{dpi['n_violations']} DPI violations")

    t = time.perf_counter()
    report("stability", 0.0, "block MI per calibration group")
    batches, stab = stability(H, batch_index, est, n_groups=n_groups, seed=seed)
    timings["stability"] = time.perf_counter() - t
    tau = stab.get("kendall_tau_halves")
    report("stability", 1.0, "Kendall tau between halves: "
           + (f"{tau:.3f}" if isinstance(tau, (int, float)) and tau == tau else "n/a"))

    t = time.perf_counter()
    baselines = {"cosine_bi": cosine_block_influence(H), "angular": angular_distance_matrix(H)}
    timings["baselines"] = time.perf_counter() - t
    report("baselines", 1.0, "cosine Block Influence and angular distance")
    timings["total"] = time.perf_counter() - t_all

    return {"block_mi": block_mi, "span": span, "span_norm": span_norm, "dpi": dpi,
            "block_mi_batches": batches, "stability": stab, "baselines": baselines, "timings": timings}
