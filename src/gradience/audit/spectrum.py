"""Exact singular values of a LoRA update ΔW = s·B·A from its factors, with r×r work only.

Why this way: the dense d_out×d_in product (and an SVD of it) costs O(d_out·d_in·r) memory traffic and
seconds per layer; the non-zero spectrum of B·A lives in an r×r problem. We form the two Grams
G_A = A·Aᵀ and G_B = Bᵀ·B in float64 (float32 Grams lose ~1e-4·σ₁ on ill-conditioned factors), then
σ(BA)² = eig(W^½·Vᵀ·G_A·V·W^½) where G_B = V·W·Vᵀ: two small symmetric eigen-solves, batched over
pairs of equal rank so Python overhead is paid once per batch, not once per pair.

Squaring costs accuracy on tiny singular values (absolute error ~eps·σ₁² in σ², i.e. ~1e-8·σ₁ in σ),
which matters for the entropy of the spectrum. Pairs whose smallest eigenvalue falls below
``SPECTRUM_QR_REFINE_RATIO``·λ_max are recomputed from Householder QR of both factors
(σ(BA) = σ(R_B·R_Aᵀ)), accurate to ~eps·‖B‖·‖A‖ absolute. Values below that noise floor are set to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradience.policy.thresholds import ENERGY_LEVELS, ENERGY_RANK_RTOL, SPECTRUM_QR_REFINE_RATIO

_EPS = float(np.finfo(np.float64).eps)


# Factors are converted to float64 in chunks of about this many elements (256 KiB): converting a whole
# 11008×r factor at once costs a fresh page-faulted allocation per pair and measured ~7x slower for r=16.
_GRAM_CHUNK_ELEMS = 32768


def _gram_of_rows(x: np.ndarray) -> np.ndarray:
    """x·xᵀ in float64 for x (r, d), accumulated over column chunks (``c @ c.T`` uses BLAS syrk)."""
    r, d = x.shape
    block = max(1, _GRAM_CHUNK_ELEMS // max(r, 1))
    if d <= block:
        c = np.asarray(x, dtype=np.float64)
        return c @ c.T
    g = np.zeros((r, r))
    buf = np.empty((r, block))
    for i in range(0, d, block):
        if i + block <= d:
            buf[...] = x[:, i:i + block]
            g += buf @ buf.T
        else:
            c = np.asarray(x[:, i:], dtype=np.float64)
            g += c @ c.T
    return g


def _gram_of_cols(x: np.ndarray) -> np.ndarray:
    """xᵀ·x in float64 for x (d, r), accumulated over row chunks."""
    d, r = x.shape
    block = max(1, _GRAM_CHUNK_ELEMS // max(r, 1))
    if d <= block:
        c = np.asarray(x, dtype=np.float64)
        return c.T @ c
    g = np.zeros((r, r))
    buf = np.empty((block, r))
    for i in range(0, d, block):
        if i + block <= d:
            buf[...] = x[i:i + block]
            g += buf.T @ buf
        else:
            c = np.asarray(x[i:], dtype=np.float64)
            g += c.T @ c
    return g


def factor_grams(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """G_A = A·Aᵀ and G_B = Bᵀ·B in float64 for A (r, d_in) and B (d_out, r).

    float32 values convert exactly to float64 and their pairwise products are exact in float64, so only
    the summation rounds (relative ~d·eps64 of the diagonal, far below what the σ tests need).
    """
    ga, gb = _gram_of_rows(a), _gram_of_cols(b)
    # Exact symmetry (chunked sums are symmetric up to rounding order only).
    return 0.5 * (ga + ga.T), 0.5 * (gb + gb.T)


def eigvals_from_grams(ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending, clamped at 0) of G_B^½·G_A·G_B^½ for stacks (..., r, r) of Grams.

    These are σ(B·A)²; works on one pair (r, r) or on a batch (n, r, r) in one LAPACK sweep.
    """
    w, v = np.linalg.eigh(gb)
    c = v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]
    m = np.swapaxes(c, -1, -2) @ ga @ c
    m = 0.5 * (m + np.swapaxes(m, -1, -2))  # exact symmetry for eigvalsh
    return np.clip(np.linalg.eigvalsh(m), 0.0, None)


def singular_values_qr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """σ(B·A), descending, length r, from Householder QR of B and Aᵀ (the accurate, slower path)."""
    r = a.shape[0]
    rb: np.ndarray = np.linalg.qr(np.asarray(b, dtype=np.float64), mode="r")  # type: ignore[assignment]
    ra: np.ndarray = np.linalg.qr(np.asarray(a, dtype=np.float64).T, mode="r")  # type: ignore[assignment]
    s = np.linalg.svd(rb @ ra.T, compute_uv=False)
    out = np.zeros(r, dtype=np.float64)
    out[: s.shape[0]] = s
    # Backward error of QR + SVD is ~max(d)·eps·‖B‖·‖A‖; anything below is numerical noise.
    d = max(a.shape[1], b.shape[0], r)
    floor = d * _EPS * float(np.linalg.norm(rb)) * float(np.linalg.norm(ra))
    out[out <= floor] = 0.0
    return out


@dataclass(frozen=True)
class FactoredSVD:
    """Thin SVD of B·A (unscaled) from the factors: B·A = U·diag(sigma)·Vt, U (d_out, q), Vt (q, d_in).

    q = min(r, d_out, d_in); float64. This is what compress (truncation, balanced split) and compare
    (subspace overlaps, inner products) need beyond σ: the same QR path as :func:`singular_values_qr`.
    """

    u: np.ndarray
    sigma: np.ndarray
    vt: np.ndarray


def factored_svd(a: np.ndarray, b: np.ndarray) -> FactoredSVD:
    """Exact thin SVD of B·A for A (r, d_in), B (d_out, r): QR of B and Aᵀ, then the SVD of the small core
    R_B·R_Aᵀ, all in float64. Work O((d_in+d_out)·r² + r³); the dense d_out×d_in product is never formed."""
    qb, rb = np.linalg.qr(np.asarray(b, dtype=np.float64))
    qa, ra = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    uc, s, vct = np.linalg.svd(rb @ ra.T)
    return FactoredSVD(u=qb @ uc, sigma=s, vt=vct @ qa.T)


def needs_qr_refinement(eigvals_ascending: np.ndarray) -> bool:
    """True when the Gram path cannot resolve the smallest σ to ~1e-10·σ₁ (rank-deficient or steep)."""
    lam_max = float(eigvals_ascending[-1])
    return lam_max > 0.0 and float(eigvals_ascending[0]) < SPECTRUM_QR_REFINE_RATIO * lam_max


def singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """σ(B·A), descending, length r, float64 (unscaled). NaN-filled when a factor is not finite."""
    ga, gb = factor_grams(a, b)
    r = ga.shape[0]
    if not (np.isfinite(ga).all() and np.isfinite(gb).all()):
        return np.full(r, np.nan)
    if not ga.any() or not gb.any():
        return np.zeros(r)
    lam = eigvals_from_grams(ga, gb)
    if needs_qr_refinement(lam):
        return singular_values_qr(a, b)
    return np.sqrt(lam[::-1])


def batched_singular_values(
    grams: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[np.ndarray | None]:
    """σ (descending) for many pairs from their Grams, batching pairs of equal rank.

    Returns None for a pair that needs QR refinement (the caller recomputes it from its factors),
    NaN vectors for non-finite Grams and zeros for zero factors.
    """
    out: list[np.ndarray | None] = [None] * len(grams)
    by_rank: dict[int, list[int]] = {}
    for i, (ga, gb) in enumerate(grams):
        r = ga.shape[0]
        if not (np.isfinite(ga).all() and np.isfinite(gb).all()):
            out[i] = np.full(r, np.nan)
        elif not ga.any() or not gb.any():
            out[i] = np.zeros(r)
        else:
            by_rank.setdefault(r, []).append(i)
    for idx in by_rank.values():
        lam = eigvals_from_grams(np.stack([grams[i][0] for i in idx]), np.stack([grams[i][1] for i in idx]))
        for row, i in enumerate(idx):
            if not needs_qr_refinement(lam[row]):
                out[i] = np.sqrt(lam[row][::-1])
    return out


@dataclass(frozen=True)
class SpectrumMetrics:
    """Everything the audit derives from one σ vector (unscaled σ; scale applied by the caller)."""

    frob_norm: float
    sigma_max: float
    stable_rank: float
    utilization: float
    effective_rank: float
    energy_rank_90: int
    energy_rank_95: int
    energy_rank_99: int


def energy_rank(sigma: np.ndarray, level: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ level·Σσ² (0 for a zero update); σ sorted descending."""
    energy = np.cumsum(np.square(sigma, dtype=np.float64))
    total = float(energy[-1]) if energy.size else 0.0
    if total <= 0.0:
        return 0
    target = level * total * (1.0 - ENERGY_RANK_RTOL)
    return int(np.searchsorted(energy, target, side="left")) + 1


def effective_rank(sigma: np.ndarray) -> float:
    """exp of the Shannon entropy of p_i = σ_i/Σσ (Roy & Vetterli, 2007); 0 for a zero update."""
    total = float(np.sum(sigma))
    if total <= 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def spectrum_metrics(sigma: np.ndarray, r: int) -> SpectrumMetrics:
    """Per-layer metrics of SPEC §3.1 from a finite descending σ vector of a rank-r pair."""
    sigma = np.asarray(sigma, dtype=np.float64)
    frob2 = float(np.sum(np.square(sigma)))
    s1 = float(sigma[0]) if sigma.size else 0.0
    if s1 <= 0.0:
        return SpectrumMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    stable = frob2 / (s1 * s1)
    k90, k95, k99 = (energy_rank(sigma, level) for level in ENERGY_LEVELS)
    return SpectrumMetrics(
        frob_norm=math.sqrt(frob2),
        sigma_max=s1,
        stable_rank=stable,
        utilization=stable / r if r > 0 else 0.0,
        effective_rank=effective_rank(sigma),
        energy_rank_90=k90,
        energy_rank_95=k95,
        energy_rank_99=k99,
    )
