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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.policy.thresholds import UDR_SIGMA_RTOL

# Block size: wide enough for the clusters of near-equal top values that weights have.
DEFAULT_BLOCK = 8
# Krylov basis size cap (columns; memory is touched only as it fills); restart from the best Ritz vectors beyond.
MAX_BASIS_COLUMNS = 512
MAX_RESTARTS = 40
# Stop when the error bound is below rtol * SAFETY (in block mode the bound is pessimistic: measured true
# errors are 10-100x below it).
SAFETY = 1.0
# Row (or column) chunk of W per fused product: small enough to stay in cache between Wᵢ X and Wᵢᵀ(...).
CHUNK_BYTES = 2 * 1024 * 1024
# Float64 temporaries per block in the exact (Frobenius, DoRA row-norm) passes of streamed matrices.
F64_BLOCK_BYTES = 256 * 1024


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


# -- streamed matrices and implicit operators ----------------------------------------------------------------
class RowBlocks:
    """A stored 2-D matrix read in row blocks as float32, converted block by block.

    ``raw`` is the tensor as stored (typically a memory map): float32 blocks are zero-copy views, bf16 (given as
    its uint16 bits, ``bf16=True``), fp16 and fp64 blocks are converted into one reusable buffer. Peak memory is
    one block, never the float32 copy of the whole tensor (6.4 GB for a 40000×40000 bf16 weight).
    """

    def __init__(self, raw: np.ndarray, *, bf16: bool = False, block_bytes: int = CHUNK_BYTES) -> None:
        if raw.ndim != 2:
            raise ValueError(f"RowBlocks needs a 2-D array, got shape {raw.shape}")
        self.raw = raw
        self.bf16 = bf16
        self.shape: tuple[int, int] = (int(raw.shape[0]), int(raw.shape[1]))
        self.rows_per_block = max(1, block_bytes // (4 * max(1, self.shape[1])))
        self._buf: np.ndarray | None = None

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, float32 block of rows start:stop); a block is valid until the next one is produced."""
        return self.blocks()

    def blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Like iteration, with a smaller block when the caller makes float64 temporaries of each block."""
        p, q = self.shape
        step = min(self.rows_per_block, rows_per_block or self.rows_per_block)
        for a in range(0, p, step):
            b = min(p, a + step)
            chunk = self.raw[a:b]
            if chunk.dtype == np.float32 and not self.bf16:
                yield a, b, chunk
                continue
            if self._buf is None:
                self._buf = np.empty(min(self.rows_per_block, p) * q, np.float32)
            out = self._buf[: (b - a) * q].reshape(b - a, q)
            if self.bf16:
                np.left_shift(chunk, 16, out=out.view(np.uint32), dtype=np.uint32)
            else:
                np.copyto(out, chunk, casting="unsafe")
            yield a, b, out


class BlockOperator:
    """Δ = diag(left)·S·diag(right) + U·V over a row-streamed stored matrix S (p×q); every factor optional.

    Plain S is the base weight itself. The DoRA effective update ΔW_eff = diag(d−1)·W + diag(s·d)·B·A has this
    form with W = S (left = d−1, U = diag(s·d)·B, V = A) or, for weights stored transposed, Δᵀ = S·diag(d−1) +
    Aᵀ·(Bᵀ·diag(s·d)). Products run in float32 like :func:`spectral_norm`; the Frobenius norm is exact, in float64.
    """

    def __init__(self, rows: RowBlocks, *, left: np.ndarray | None = None, right: np.ndarray | None = None,
                 u: np.ndarray | None = None, v: np.ndarray | None = None) -> None:
        p, q = rows.shape
        if (u is None) != (v is None):
            raise ValueError("BlockOperator needs both U and V, or neither")
        if u is not None and v is not None and (u.shape[0] != p or v.shape[1] != q or u.shape[1] != v.shape[0]):
            raise ValueError(f"low-rank part {u.shape}·{v.shape} does not fit S {rows.shape}")
        self.rows = rows
        self.shape = (p, q)
        self.left64 = None if left is None else np.asarray(left, np.float64).reshape(p)
        self.right64 = None if right is None else np.asarray(right, np.float64).reshape(q)
        self.u64 = None if u is None else np.asarray(u, np.float64)
        self.v64 = None if v is None else np.asarray(v, np.float64)
        self.left = None if left is None else self.left64.astype(np.float32)[:, None]  # type: ignore[union-attr]
        self.right = None if right is None else self.right64.astype(np.float32)[:, None]  # type: ignore[union-attr]
        self.u = None if u is None else self.u64.astype(np.float32)  # type: ignore[union-attr]
        self.v = None if v is None else self.v64.astype(np.float32)  # type: ignore[union-attr]

    def _adjoint_pass(self, y: np.ndarray) -> np.ndarray:
        """Δᵀy (y: p×k float32) in one pass over S."""
        z = np.zeros((self.shape[1], y.shape[1]), np.float32)
        acc = None if self.u is None else np.zeros((self.u.shape[1], y.shape[1]), np.float32)
        for a, b, blk in self.rows:
            yb = y[a:b]
            z += blk.T @ (yb * self.left[a:b] if self.left is not None else yb)
            if acc is not None and self.u is not None:
                acc += self.u[a:b].T @ yb
        if self.right is not None:
            z *= self.right
        if acc is not None and self.v is not None:
            z += self.v.T @ acc
        return z

    def _forward_block(self, a: int, b: int, blk: np.ndarray, t: np.ndarray, vx: np.ndarray | None) -> np.ndarray:
        y = blk @ t
        if self.left is not None:
            y *= self.left[a:b]
        if vx is not None and self.u is not None:
            y += self.u[a:b] @ vx
        return y

    def gram_cols(self, x: np.ndarray) -> np.ndarray:
        """ΔᵀΔ·x on the q side (x: q×k), fused: each block of S is used for both products while in cache."""
        x32 = x.astype(np.float32)
        t = x32 * self.right if self.right is not None else x32
        vx = None if self.v is None else self.v @ x32
        z = np.zeros_like(x32)
        acc = None if self.u is None else np.zeros((self.u.shape[1], x32.shape[1]), np.float32)
        for a, b, blk in self.rows:
            y = self._forward_block(a, b, blk, t, vx)
            z += blk.T @ (y * self.left[a:b] if self.left is not None else y)
            if acc is not None and self.u is not None:
                acc += self.u[a:b].T @ y
        if self.right is not None:
            z *= self.right
        if acc is not None and self.v is not None:
            z += self.v.T @ acc
        return z.astype(np.float64)

    def gram_rows(self, y: np.ndarray) -> np.ndarray:
        """ΔΔᵀ·y on the p side (y: p×k): two passes over S (Δᵀy, then Δ of it)."""
        w = self._adjoint_pass(y.astype(np.float32))
        t = w * self.right if self.right is not None else w
        vw = None if self.v is None else self.v @ w
        out = np.empty((self.shape[0], y.shape[1]), np.float32)
        for a, b, blk in self.rows:
            out[a:b] = self._forward_block(a, b, blk, t, vw)
        return out.astype(np.float64)

    def frobenius(self) -> float:
        """‖Δ‖_F exactly (float64 per block, one pass)."""
        total = 0.0
        for a, b, blk in self.rows.blocks(_f64_rows(self.shape[1])):
            e = blk.astype(np.float64)
            if self.left64 is not None:
                e *= self.left64[a:b, None]
            if self.right64 is not None:
                e *= self.right64[None, :]
            if self.u64 is not None and self.v64 is not None:
                e += self.u64[a:b] @ self.v64
            total += float(np.einsum("ij,ij->", e, e))
        return math.sqrt(total)


def _f64_rows(cols: int) -> int:
    """Rows per block for passes that hold float64 copies of a block (two or three at a time): ~256 KB each."""
    return max(1, F64_BLOCK_BYTES // (8 * max(1, cols)))


def frobenius_norm_blocks(rows: RowBlocks) -> float:
    """‖S‖_F of a row-streamed matrix with float64 accumulation (one pass)."""
    total = 0.0
    for _a, _b, blk in rows.blocks(_f64_rows(rows.shape[1])):
        flat = blk.reshape(-1).astype(np.float64)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


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
