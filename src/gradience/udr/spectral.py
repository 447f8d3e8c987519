"""Largest singular value of a dense base weight without a full SVD.

A full float64 SVD of one 4096×11008 matrix costs minutes on a laptop CPU; UDR needs only σ₁ to ~1e-4
relative accuracy. We run block Lanczos (block Krylov with full reorthogonalization and Rayleigh–Ritz) on
the Gram operator G = WᵀW or WWᵀ, whichever is smaller. Each step applies W and Wᵀ to a block of ``b``
vectors: that costs about as much memory traffic as a single matrix-vector pair (the weight is streamed
once per product either way), yet the block converges far faster on the flat or clustered top spectra that
real and random weights have. Products run in float32 (the weight's own precision; bf16 arithmetic would
stall at ~3e-3), the small Krylov algebra in float64.

Stopping rule: a Ritz value θ of G with residual ‖Gx − θx‖ = ρ has an eigenvalue within ρ of it, and within
ρ²/gap when the rest of the spectrum is at least ``gap`` away (Kato–Temple). We stop when the gap-refined
bound min(ρ, ρ²/gap) on the error of λ₁ = σ₁², converted to σ, is below ``rtol`` (times a safety factor).
A "value stopped changing" rule is deliberately not used: it stops early on flat spectra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.policy.thresholds import UDR_SIGMA_RTOL

# Block size: 8 vectors cost barely more per pass than one (the pass is memory-bound).
DEFAULT_BLOCK = 8
# Krylov basis size cap (columns); restart from the best Ritz vectors beyond it.
MAX_BASIS_COLUMNS = 192
# Columns the single-vector scouting phase may use before the block phase takes over.
SCOUT_COLUMNS = 64
MAX_RESTARTS = 40
# Stop when the error bound is below rtol * SAFETY: the bound is usually pessimistic, but not always.
SAFETY = 0.5


@dataclass(frozen=True)
class SpectralNorm:
    """σ₁ estimate with its convergence record."""

    sigma_max: float
    iterations: int           # block steps (each applies W and Wᵀ once to a block)
    products: int             # matrix-vector products with W (and as many with Wᵀ)
    rel_error_bound: float    # bound on |σ̂ − σ₁| / σ̂ at exit (Kato–Temple, gap from Ritz values)
    converged: bool


def frobenius_norm(w: np.ndarray) -> float:
    """‖W‖_F with float64 accumulation (exact in one pass; the data may be float32 or a bf16-converted view)."""
    if w.size == 0:
        return 0.0
    flat = w.reshape(-1)
    total = 0.0
    step = 1 << 22  # 4M elements per chunk keeps the float64 temporary small
    for i in range(0, flat.size, step):
        chunk = flat[i:i + step].astype(np.float64, copy=False)
        total += float(np.dot(chunk, chunk))
    return math.sqrt(total)


def _orthonormalize(block: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Orthogonalize ``block`` against the orthonormal columns of ``basis`` (twice: classical Gram–Schmidt
    needs it) and against itself; columns already in the span are replaced by fresh random directions."""
    for _ in range(2):
        if basis.shape[1]:
            block -= basis @ (basis.T @ block)
    q_new, r = np.linalg.qr(block)
    diag = np.abs(np.diag(r))
    dead = diag <= 1e-10 * max(float(diag.max()) if diag.size else 0.0, 1e-300)
    if dead.any():
        keep = np.concatenate([basis, q_new[:, ~dead]], axis=1)
        fresh = np.random.default_rng(keep.shape[1]).standard_normal((block.shape[0], int(dead.sum())))
        for _ in range(2):
            fresh -= keep @ (keep.T @ fresh)
        fresh, _ = np.linalg.qr(fresh)
        q_new = np.concatenate([q_new[:, ~dead], fresh], axis=1)
    return q_new


def spectral_norm(
    w: np.ndarray,
    *,
    rtol: float = UDR_SIGMA_RTOL,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
) -> SpectralNorm:
    """‖W‖₂ of a 2-D array to relative accuracy ``rtol`` (float32 products, never a full SVD)."""
    if w.ndim != 2:
        raise ValueError(f"spectral_norm needs a 2-D array, got shape {w.shape}")
    w32 = w if w.dtype == np.float32 else w.astype(np.float32)
    d_out, d_in = w32.shape

    # Gram operator on the smaller side: G x = Wᵀ(W x) when d_in is smaller, else W(Wᵀ x).
    def apply_gram(x: np.ndarray) -> np.ndarray:
        x32 = x.astype(np.float32)
        y = w32.T @ (w32 @ x32) if d_in <= d_out else w32 @ (w32.T @ x32)
        return y.astype(np.float64)

    return largest_gram_eigen(apply_gram, min(d_out, d_in), rtol=rtol, block=block, seed=seed)


def spectral_norm_torch(w: Any, *, rtol: float = UDR_SIGMA_RTOL, block: int = DEFAULT_BLOCK,
                        seed: int = 0) -> SpectralNorm:
    """Same as :func:`spectral_norm` for a float32 torch tensor (e.g. on CUDA): only the products run there,
    the small Krylov algebra stays in float64 numpy, so results match the CPU path to within ``rtol``."""
    import torch

    d_out, d_in = (int(x) for x in w.shape)

    def apply_gram(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(x.astype(np.float32)).to(w.device)
        y = w.T @ (w @ xt) if d_in <= d_out else w @ (w.T @ xt)
        return y.double().cpu().numpy()

    return largest_gram_eigen(apply_gram, min(d_out, d_in), rtol=rtol, block=block, seed=seed)


def largest_gram_eigen(
    apply_gram: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    rtol: float = UDR_SIGMA_RTOL,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
) -> SpectralNorm:
    """σ₁ = √λ₁(G) for a symmetric PSD operator G = WᵀW given by ``apply_gram`` (n×k float64 -> n×k)."""
    if n == 0:
        return SpectralNorm(0.0, 0, 0, 0.0, True)
    b = max(1, min(block, n))
    if n <= 4 * b:
        # Tiny matrix: the Gram matrix itself is cheap and exact enough.
        gram = apply_gram(np.eye(n))
        lam = float(np.linalg.eigvalsh((gram + gram.T) / 2)[-1])
        return SpectralNorm(math.sqrt(max(lam, 0.0)), 1, n, 0.0, True)

    max_cols = b * max(2, min(MAX_BASIS_COLUMNS // b, n // b))
    qmat = np.empty((n, max_cols))      # orthonormal Krylov basis
    gmat = np.empty((n, max_cols))      # G applied to each basis column
    tmat = np.empty((max_cols, max_cols))  # projected Gram QᵀGQ
    rng = np.random.default_rng(seed)
    # Phase 1 (scout): single-vector Lanczos. A product with one vector is a memory-bound GEMV, several
    # times cheaper than a block product, and quickly finds the dominant directions. Phase 2 (certify):
    # block Lanczos restarted from the scout's top Ritz vectors; only its bound decides convergence, since a
    # single vector cannot see a cluster of near-equal top values (its gap estimate would be optimistic).
    width = 1 if b > 1 else b
    scout_cols = min(max_cols, SCOUT_COLUMNS)
    q = _orthonormalize(rng.standard_normal((n, width)), qmat[:, :0])
    iterations = products = block_steps = 0
    theta, bound = 0.0, math.inf
    for _restart in range(MAX_RESTARTS):
        k = 0
        while True:
            gq = apply_gram(q)
            iterations += 1
            block_steps += width == b
            products += width
            qmat[:, k:k + width] = q
            gmat[:, k:k + width] = gq
            tmat[:k + width, k:k + width] = qmat[:, :k + width].T @ gq
            tmat[k:k + width, :k] = tmat[:k, k:k + width].T
            k += width
            t = tmat[:k, :k]
            evals, evecs = np.linalg.eigh((t + t.T) / 2)
            theta = float(evals[-1])
            if theta <= 0.0:
                return SpectralNorm(0.0, iterations, products, 0.0, True)
            # Residuals of the top two Ritz pairs: ‖G x − θ x‖ for x = Q y.
            ys = evecs[:, -2:] if k > 1 else evecs[:, -1:]
            res = np.linalg.norm(gmat[:, :k] @ ys - (qmat[:, :k] @ ys) * evals[-ys.shape[1]:], axis=0)
            resid = float(res[-1])
            # Kato–Temple: λ₁ ≤ θ + ρ²/(θ − α) for any α ≥ λ₂. λ₂ ≤ θ₂ + ρ₂ when the second Ritz pair tracks
            # λ₂; while it does not, ρ₂ is large, the gap closes and the plain bound ρ applies.
            gap = theta - (float(evals[-2]) + float(res[0])) if k > 1 else 0.0
            err_lambda = min(resid, resid * resid / gap) if gap > 0 else resid
            # λ = σ²: |σ − √θ| ≤ err_λ / (σ + √θ) ≤ err_λ / √θ, i.e. err_λ / θ relative to √θ.
            bound = err_lambda / theta
            # The block must have expanded at least once (a restart's first step only re-derives the scout's
            # Ritz values from the same vectors).
            if k >= n or (width == b and block_steps >= 2 and bound <= rtol * SAFETY):
                return SpectralNorm(math.sqrt(theta), iterations, products, bound, True)
            if width < b and (bound <= rtol * SAFETY or k + width > scout_cols):
                break  # scout done: certify with the block
            if k + width > max_cols - b:
                break
            q = _orthonormalize(gq, qmat[:, :k])
        # (Thick) restart from the best Ritz vectors, as one full block; pad with random directions when the
        # scout stopped with fewer than b Ritz vectors.
        keep = min(b, k)
        start = qmat[:, :k] @ evecs[:, -keep:]
        if keep < b:
            start = np.concatenate([start, rng.standard_normal((n, b - keep))], axis=1)
        width = b
        q = _orthonormalize(start, qmat[:, :0])
    return SpectralNorm(math.sqrt(theta), iterations, products, bound, False)
