"""Largest singular value of a dense base weight without a full SVD.

A full float64 SVD of one 4096×11008 matrix costs minutes on a laptop CPU; UDR needs only σ₁ to ~1e-4
relative accuracy. We run block Lanczos (block Krylov with full reorthogonalization and Rayleigh–Ritz) on the
Gram operator G = WᵀW or WWᵀ, whichever is smaller. Products run in float32 (the weight's own precision;
bf16 arithmetic would stall at ~3e-3), the small Krylov algebra in float64. G·X is computed in one pass over
W, chunk by chunk (Σ Wᵢᵀ(Wᵢ X)), so each chunk is reused from cache for its second product.

Why a block (8 vectors) and not single-vector Lanczos, although a single-vector product is a cheaper GEMV:
a single Krylov vector cannot see a cluster of near-equal top singular values; its Ritz value settles inside
the cluster with a small residual and misses σ₁ by up to the cluster's width. Measured on clusters of 2–10
values spread 3e-4…3e-3 apart: single-vector errors up to 1.8e-3, block-of-8 errors ≤ 1.4e-6.

Stopping rule: a Ritz value θ of G with residual ‖Gx − θx‖ = ρ has an eigenvalue within ρ of it, and λ₁ ≤
θ + ρ²/(θ − α) for α ≥ λ₂ (Kato–Temple; α estimated by the second Ritz value plus its residual). We stop when
min(ρ, ρ²/gap), converted from λ = σ² to σ, is ≤ ``rtol`` relative. A "value stopped changing" rule is
deliberately not used: it stops early on flat spectra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.policy.thresholds import UDR_SIGMA_RTOL
from gradience.udr.row_blocks import (  # the streamed-matrix names keep their old import path
    CHUNK_BYTES,
    BlockOperator,
    RowBlocks,
    _f64_rows,
    frobenius_norm_blocks,
)

__all__ = [
    "CHUNK_BYTES", "DEFAULT_BLOCK", "BlockOperator", "DoraEffective", "RowBlocks", "SpectralNorm",
    "dora_effective_norms", "frobenius_norm", "frobenius_norm_blocks", "largest_gram_eigen", "spectral_norm",
    "spectral_norm_operator", "spectral_norm_torch",
]

# Block size: wide enough for the clusters of near-equal top values that weights have.
DEFAULT_BLOCK = 8
# Krylov basis size cap (columns; memory is touched only as it fills); restart from the best Ritz vectors beyond.
MAX_BASIS_COLUMNS = 512
MAX_RESTARTS = 40
# Stop when the error bound is below rtol * SAFETY (in block mode the bound is pessimistic: measured true
# errors are 10-100x below it).
SAFETY = 1.0


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
    b = max(1, block)
    if min(d_out, d_in) <= 4 * b:
        # A thin matrix: its small Gram matrix, formed exactly in float64, is the cheapest route.
        w64 = w32.astype(np.float64)
        gram = w64 @ w64.T if d_out <= d_in else w64.T @ w64
        lam = float(np.linalg.eigvalsh(gram)[-1]) if gram.size else 0.0
        return SpectralNorm(math.sqrt(max(lam, 0.0)), 1, min(d_out, d_in), 0.0, True)
    if d_in <= d_out:
        # G = WᵀW on the d_in side, one pass over row chunks: Σ Wᵢᵀ(Wᵢ X).
        rows = max(16, CHUNK_BYTES // (4 * d_in))

        def apply_gram(x: np.ndarray) -> np.ndarray:
            x32 = x.astype(np.float32)
            z = np.zeros_like(x32)
            for i in range(0, d_out, rows):
                chunk = w32[i:i + rows]
                z += chunk.T @ (chunk @ x32)
            return z.astype(np.float64)
    else:
        # G = WWᵀ on the (smaller) d_out side, one pass over column chunks: Σ Wⱼ(Wⱼᵀ X). Shorter Krylov
        # vectors make the small dense algebra cheaper.
        cols = max(16, CHUNK_BYTES // (4 * d_out))

        def apply_gram(x: np.ndarray) -> np.ndarray:
            x32 = x.astype(np.float32)
            z = np.zeros_like(x32)
            for j in range(0, d_in, cols):
                chunk = w32[:, j:j + cols]
                z += chunk @ (chunk.T @ x32)
            return z.astype(np.float64)

    return largest_gram_eigen(apply_gram, min(d_out, d_in), rtol=rtol, block=b, seed=seed)


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
    q = _orthonormalize(rng.standard_normal((n, b)), qmat[:, :0])
    iterations = products = 0
    theta, bound = 0.0, math.inf
    for _restart in range(MAX_RESTARTS):
        k = 0
        while True:
            width = q.shape[1]
            gq = apply_gram(q)
            iterations += 1
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
            if k >= n or bound <= rtol * SAFETY:
                return SpectralNorm(math.sqrt(theta), iterations, products, bound, True)
            if k + b > max_cols:
                break
            q = _orthonormalize(gq, qmat[:, :k])
        # Restart from the best Ritz vectors (one block).
        q = _orthonormalize(qmat[:, :k] @ evecs[:, -b:], qmat[:, :0])
    return SpectralNorm(math.sqrt(theta), iterations, products, bound, False)


# -- norms of streamed matrices (the operators themselves are in gradience.udr.row_blocks) -------------------
def spectral_norm_operator(op: BlockOperator, *, rtol: float = UDR_SIGMA_RTOL, block: int = DEFAULT_BLOCK,
                           seed: int = 0) -> SpectralNorm:
    """‖Δ‖₂ of an implicit operator by the block Lanczos of :func:`largest_gram_eigen` (never densified).

    The Gram operator is taken on the stored-column side (one fused pass per product) unless that side is the
    longer one; then ΔΔᵀ on the row side (two passes) keeps the Krylov basis short.
    """
    p, q = op.shape
    if q <= p:
        return largest_gram_eigen(op.gram_cols, q, rtol=rtol, block=block, seed=seed)
    return largest_gram_eigen(op.gram_rows, p, rtol=rtol, block=block, seed=seed)


@dataclass(frozen=True)
class DoraEffective:
    """Norms of the DoRA weight change ΔW_eff = m ⊙ (W + s·B·A)/‖W + s·B·A‖_row − W (PEFT's merge)."""

    sigma_max: float
    frob_norm: float
    spectral: SpectralNorm | None   # None when not finite


def dora_effective_norms(rows: RowBlocks, *, transposed: bool, a: np.ndarray, b: np.ndarray, scale: float,
                         magnitude: np.ndarray, rtol: float = UDR_SIGMA_RTOL) -> DoraEffective:
    """σ₁ and ‖·‖_F of a DoRA layer's effective update, from its base weight and factors, without forming it.

    Orientation: ΔW is (d_out, d_in) = s·B·A with A (r, d_in), B (d_out, r); ``rows`` streams W as stored, (d_out,
    d_in), or (d_in, d_out) when ``transposed`` (GPT-2 Conv1D, embeddings). PEFT normalises W + s·B·A over each
    output feature (``torch.linalg.norm(W + s·BA, dim=1)`` in nn.Linear layout, per output channel for conv, per
    embedding dimension for embeddings) and ``magnitude`` m holds one value per output feature. One float64 pass
    over W gives those norms, then ΔW_eff = diag(d−1)·W + diag(s·d)·B·A with d = m / norm is an implicit operator.
    """
    a64 = np.asarray(a, np.float64)
    b64 = np.asarray(b, np.float64)
    d_out, d_in = b64.shape[0], a64.shape[1]
    expect = (d_in, d_out) if transposed else (d_out, d_in)
    if rows.shape != expect:
        raise ValueError(f"base weight {rows.shape} does not fit ΔW {(d_out, d_in)} (transposed={transposed})")
    sq = np.zeros(d_out)
    if transposed:
        bt = (scale * b64).T                      # (r, d_out)
        for lo, hi, blk in rows.blocks(_f64_rows(d_out)):
            m_blk = blk.astype(np.float64) + a64[:, lo:hi].T @ bt
            sq += np.einsum("ij,ij->j", m_blk, m_blk)
    else:
        sa = scale * a64
        for lo, hi, blk in rows.blocks(_f64_rows(d_in)):
            m_blk = blk.astype(np.float64) + b64[lo:hi] @ sa
            sq[lo:hi] = np.einsum("ij,ij->i", m_blk, m_blk)
    norms = np.sqrt(sq)
    mag = np.asarray(magnitude, np.float64).reshape(d_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = mag / norms
    if not np.isfinite(d).all():
        return DoraEffective(math.nan, math.nan, None)
    alpha = d - 1.0
    beta_b = (scale * d)[:, None] * b64          # diag(s·d)·B, (d_out, r)
    if transposed:
        op = BlockOperator(rows, right=alpha, u=a64.T, v=beta_b.T)
    else:
        op = BlockOperator(rows, left=alpha, u=beta_b, v=a64)
    frob = op.frobenius()
    if not math.isfinite(frob):
        return DoraEffective(math.nan, frob, None)
    result = spectral_norm_operator(op, rtol=rtol)
    return DoraEffective(result.sigma_max, frob, result)
