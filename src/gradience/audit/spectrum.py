"""Exact singular values of a LoRA update ΔW = s·B·A from its factors, with r×r work only.

Why this way: the dense d_out×d_in product (and an SVD of it) costs O(d_out·d_in·r) memory traffic and
seconds per layer; the non-zero spectrum of B·A lives in an r×r problem. Each factor is reduced, in one pass
over its data, to its float64 Gram (G_A = A·Aᵀ, G_B = Bᵀ·B; float32 Grams lose ~1e-4·σ₁ on ill-conditioned
factors). Then, batched over pairs of equal rank (Python overhead paid once per batch, not once per pair):

* each Gram is scaled to unit diagonal, G = D·H·D, and H = L·Lᵀ (Cholesky) gives a square root of the factor,
  T = D·L (A = T_A·Q_A and Bᵀ = T_B·Q_B with orthonormal rows Q), so σ(B·A) = σ(T_Bᵀ·T_A): the SVD of the small
  *core*, never the eigenvalues of a product of Grams. Squaring the product (the obvious route) loses
  ~sqrt(eps)·σ₁ on the small σ of any steep spectrum. The unit diagonal matters because a factor whose decay
  lives in the scale of its rows or columns (graded: the common case, B's columns carry the learned scale) is
  well conditioned at unit diagonal, and the Gram's rounding is relative to each row's own norm.
* a factor whose H is still ill-conditioned (λ_min < ``SPECTRUM_FACTOR_SPLIT_RATIO``·λ_max: rank-deficient, or
  steep in a rotated basis) keeps its well-resolved directions from the Gram and recomputes the others from the
  data: Z = V_smallᵀ·X (a thin product, k ≤ r rows), whose own Gram is accurate relative to *its* scale,
  recursively (:mod:`gradience.audit.refine`). That is far cheaper than a Householder QR of the whole factor
  (the previous refinement, ~8x the Gram pass on 7B shapes) and at least as accurate: every σ within
  ~1e-12·σ₁ of a dense float64 SVD on steep, rank-deficient and rotated cases. Directions below the factor's
  float64 noise floor are exactly 0.

Factors whose Gram would overflow or underflow float64 (float64 factors near 1e±160) are scaled by a power of
two first and σ unscaled after (exact), so finite factors are never reported as non-finite.
``singular_values_qr`` / ``factored_svd`` (Householder QR) remain the reference path and the thin SVD that
compress and compare need (U and V, not only σ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gradience.audit.refine import Scratch, refined_root
from gradience.io.safetensors import bf16_to_f32
from gradience.policy.thresholds import (
    ENERGY_LEVELS,
    ENERGY_RANK_RTOL,
    SPECTRUM_FACTOR_SPLIT_RATIO,
)

_EPS = float(np.finfo(np.float64).eps)


# Factors are converted to float64 in chunks of about this many elements (256 KiB): converting a whole
# 11008×r factor at once costs a fresh page-faulted allocation per pair and measured ~7x slower for r=16.
_GRAM_CHUNK_ELEMS = 32768


def _bf16_chunk(bits: np.ndarray, u32: np.ndarray) -> np.ndarray:
    """A chunk of bf16 bits (uint16, any strides) as float32 in the reused buffer ``u32`` (exact)."""
    return bf16_to_f32(bits, u32.view(np.float32))


def _gram_of_rows(x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """x·xᵀ in float64 for x (r, d), accumulated over column chunks (``c @ c.T`` uses BLAS syrk).

    ``bf16``: x holds bf16 bits (uint16 view of the file), converted chunk by chunk: never a whole float32 copy.
    """
    r, d = x.shape
    block = max(1, _GRAM_CHUNK_ELEMS // max(r, 1))
    if d <= block:
        c = np.asarray(bf16_to_f32(x) if bf16 else x, dtype=np.float64)
        return c @ c.T
    g = np.zeros((r, r))
    buf = np.empty((r, block))
    u32 = np.empty((r, block), dtype=np.uint32) if bf16 else None
    for i in range(0, d, block):
        if i + block <= d:
            chunk = x[:, i:i + block]
            buf[...] = chunk if u32 is None else _bf16_chunk(chunk, u32)
            g += buf @ buf.T
        else:
            tail = x[:, i:]
            c = np.asarray(bf16_to_f32(tail) if bf16 else tail, dtype=np.float64)
            g += c @ c.T
    return g


def _gram_of_cols(x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """xᵀ·x in float64 for x (d, r), accumulated over row chunks (``bf16`` as in :func:`_gram_of_rows`)."""
    d, r = x.shape
    block = max(1, _GRAM_CHUNK_ELEMS // max(r, 1))
    if d <= block:
        c = np.asarray(bf16_to_f32(x) if bf16 else x, dtype=np.float64)
        return c.T @ c
    g = np.zeros((r, r))
    buf = np.empty((block, r))
    u32 = np.empty((block, r), dtype=np.uint32) if bf16 else None
    for i in range(0, d, block):
        if i + block <= d:
            chunk = x[i:i + block]
            buf[...] = chunk if u32 is None else _bf16_chunk(chunk, u32)
            g += buf.T @ buf
        else:
            tail = x[i:]
            c = np.asarray(bf16_to_f32(tail) if bf16 else tail, dtype=np.float64)
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


# Gram entries (squared factor scale) outside [2^-_SAFE_EXP, 2^_SAFE_EXP] are re-done at a power-of-two scale.
_SAFE_EXP = 900


def _needs_rescale(g: np.ndarray) -> bool:
    """The trace is NaN/Inf as soon as any factor entry is (each diagonal entry sums a whole row's squares)."""
    tr = float(np.trace(g))
    return not math.isfinite(tr) or tr < 2.0 ** -_SAFE_EXP


def _safe_gram(x: np.ndarray, gram: Callable[..., np.ndarray], bf16: bool = False) -> tuple[np.ndarray, int, bool]:
    """(Gram of x·2^-e, e, finite?): e = 0 on the normal path; the data is scanned again only when the plain
    Gram is non-finite or underflowed (a zero factor is scanned once more to tell it from an underflow)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # detected below, then redone at scale
        g = gram(x, bf16)
    if not _needs_rescale(g):
        return g, 0, True
    if bf16:  # the rare path: the whole factor as float32 (exact), then as for any float factor
        x = bf16_to_f32(x)
    if not np.isfinite(x).all():
        return g, 0, False
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0.0:
        return np.zeros_like(g), 0, True
    e = math.frexp(top)[1]  # x·2^-e has max |entry| in [0.5, 1): its Gram neither overflows nor vanishes
    return gram(np.ldexp(np.asarray(x, dtype=np.float64), -e)), e, True


@dataclass(frozen=True)
class FactorGram:
    """One factor's float64 Gram (A·Aᵀ or Bᵀ·B) of the factor scaled by 2^-exp (exp = 0 unless the plain
    Gram would overflow or underflow); ``finite`` is False when the factor holds NaN/Inf."""

    g: np.ndarray
    exp: int = 0
    finite: bool = True

    @property
    def zero(self) -> bool:
        return not np.count_nonzero(self.g)  # = not g.any() (NaN counts), ~5x cheaper per call on r×r

    def unscaled(self) -> np.ndarray:
        """The Gram of the factor itself (as :func:`factor_grams` gives it; inf where it overflows)."""
        if not self.exp:
            return self.g
        with np.errstate(over="ignore", under="ignore"):
            return np.ldexp(self.g, 2 * self.exp)


def factor_gram(x: np.ndarray, *, rows: bool, bf16: bool = False) -> FactorGram:
    """Gram of A (``rows=True``, x is (r, d)) or of B (``rows=False``, x is (d, r)), in float64, one pass.
    ``bf16``: x is the factor's bf16 bits (uint16), converted chunk by chunk (same Gram, bit for bit)."""
    g, e, finite = _safe_gram(x, _gram_of_rows if rows else _gram_of_cols, bf16)
    return FactorGram(0.5 * (g + g.T), e, finite)


def pair_grams(a: np.ndarray, b: np.ndarray, *, a_bf16: bool = False,
               b_bf16: bool = False) -> tuple[FactorGram, FactorGram]:
    """What the audit keeps of a pair after reading its factors once: A (r, d_in), B (d_out, r)
    (``*_bf16``: that factor is given as bf16 bits, see :func:`factor_gram`)."""
    return factor_gram(a, rows=True, bf16=a_bf16), factor_gram(b, rows=False, bf16=b_bf16)


def unit_diagonal(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, d) with G = D·H·D, D = diag(d) the rows'/columns' norms, for a stack (..., r, r) of Grams.

    Why: a factor whose decay lives in the scale of its rows or columns (graded, the common case: B's columns
    carry the learned scale) is well conditioned at unit diagonal, and its Gram's rounding, relative to each
    row's own norm, stays that small in the root D·L. A zero row/column gets d = 0 and an identity entry in H
    (D zeroes it out again in the root).
    """
    d = np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0.0, None))
    live = d > 0.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=live)
    h = g * inv[..., :, None] * inv[..., None, :]
    if not live.all():
        both = live[..., :, None] & live[..., None, :]
        h = np.where(both, h, np.broadcast_to(np.eye(g.shape[-1]), h.shape))
    return h, d


def singular_values_many(
    grams: Sequence[tuple[FactorGram, FactorGram]], load: Callable[[int], tuple[np.ndarray, np.ndarray]],
    overflow_out: dict[int, int] | None = None,
) -> tuple[list[np.ndarray], int]:
    """σ (descending, length r, unscaled) of many pairs, and how many pairs needed a second read.

    Batched by rank: one eigen-solve sweep over every unit-diagonal Gram, one SVD sweep over the r×r cores
    T_Bᵀ·T_A. ``load(i)`` returns pair i's factors again; it is called only for a pair with a rank-deficient
    factor or one steep in a rotated basis (see the module docstring). NaN vectors for non-finite factors,
    zeros for zero updates.

    ``overflow_out``: when given, a pair of finite factors whose σ itself exceeds float64 (factors ~1e200)
    keeps σ·2^-shift and gets ``overflow_out[i] = shift``, so that scale-free metrics stay computable.
    """
    out: list[np.ndarray] = [np.zeros(ga.g.shape[0]) for ga, _ in grams]
    by_rank: dict[int, list[int]] = {}
    for i, (ga, gb) in enumerate(grams):
        if not (ga.finite and gb.finite):
            out[i] = np.full(ga.g.shape[0], np.nan)
        elif not (ga.zero or gb.zero):
            by_rank.setdefault(ga.g.shape[0], []).append(i)
    n_refined = 0
    split = SPECTRUM_FACTOR_SPLIT_RATIO
    scratch = Scratch()
    for idx in by_rank.values():
        n = len(idx)
        h, d = unit_diagonal(np.stack([grams[i][0].g for i in idx] + [grams[i][1].g for i in idx]))
        w = np.linalg.eigvalsh(h)  # ascending; only to tell well-conditioned Grams from the others
        steep = w[:, 0] < split * w[:, -1]
        t = np.empty_like(h)
        ok = ~steep
        if ok.any():  # H = L·Lᵀ (safely positive definite here): T = D·L, a root at a fraction of eigh's cost
            t[ok] = d[ok][:, :, None] * np.linalg.cholesky(h[ok])
        if steep.any():
            # The steep factors' eigenvectors in one batched call; their weak directions from the data.
            ws, vs = np.linalg.eigh(h[steep])
            where = np.full(len(steep), -1)
            where[steep] = np.arange(len(ws))
            for row in np.flatnonzero(steep[:n] | steep[n:]).tolist():
                i = idx[row]
                a, b = load(i)
                n_refined += 1
                for j, x, rows, g in ((row, a, True, grams[i][0]), (n + row, b, False, grams[i][1])):
                    if steep[j]:
                        t[j] = refined_root(x, g.exp, ws[where[j]], vs[where[j]], d[j], rows=rows,
                                            scratch=scratch)
        sigma = np.linalg.svd(np.swapaxes(t[n:], -1, -2) @ t[:n], compute_uv=False)
        for row, i in enumerate(idx):
            shift = grams[i][0].exp + grams[i][1].exp
            if not shift:
                out[i] = sigma[row]
                continue
            with np.errstate(over="ignore"):
                out[i] = np.ldexp(sigma[row], shift)
            if overflow_out is not None and not np.isfinite(out[i]).all():
                out[i], overflow_out[i] = sigma[row], shift
    return out, n_refined


def singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """σ(B·A), descending, length r, float64 (unscaled). NaN-filled when a factor is not finite."""
    return singular_values_many([pair_grams(a, b)], lambda _i: (a, b))[0][0]


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


def _energy_ranks(sigma: np.ndarray) -> tuple[int, int, int]:
    """:func:`energy_rank` at the three ``ENERGY_LEVELS`` from one cumulative sum (same arithmetic, one pass:
    this runs for every layer of every audit)."""
    energy = np.cumsum(np.square(sigma, dtype=np.float64))
    total = float(energy[-1]) if energy.size else 0.0
    if total <= 0.0:
        return 0, 0, 0
    targets = np.asarray(ENERGY_LEVELS) * total * (1.0 - ENERGY_RANK_RTOL)
    k90, k95, k99 = (np.searchsorted(energy, targets, side="left") + 1).tolist()
    return k90, k95, k99


def spectrum_metrics(sigma: np.ndarray, r: int) -> SpectrumMetrics:
    """Per-layer metrics of SPEC §3.1 from a finite descending σ vector of a rank-r pair."""
    sigma = np.asarray(sigma, dtype=np.float64)
    s1 = float(sigma[0]) if sigma.size else 0.0
    if s1 <= 0.0:
        return SpectrumMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    # Ratios from σ/σ₁: σ² of F64 factors ~1e-160 underflows to 0 and of ~1e170 overflows (issue 17).
    t = sigma / s1
    stable = float(np.sum(np.square(t)))
    k90, k95, k99 = _energy_ranks(t)
    return SpectrumMetrics(
        frob_norm=s1 * math.sqrt(stable),
        sigma_max=s1,
        stable_rank=stable,
        utilization=stable / r if r > 0 else 0.0,
        effective_rank=effective_rank(t),
        energy_rank_90=k90,
        energy_rank_95=k95,
        energy_rank_99=k99,
    )


def spectrum_metrics_many(sigmas: np.ndarray, r: int) -> list[SpectrumMetrics]:
    """:func:`spectrum_metrics` of every row of an (N, k) stack of finite descending σ vectors of rank-r pairs,
    with the same formulas vectorised over rows (an MoE adapter has ~12k expert rows; per-row calls cost more
    than its whole spectrum pass). Energy ranks count the cumulative energies below each target, which is what
    ``searchsorted(side="left")`` returns on the non-decreasing cumulative sum."""
    s = np.asarray(sigmas, dtype=np.float64)
    out = [SpectrumMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)] * s.shape[0]
    if s.ndim != 2 or s.shape[1] == 0:
        return out
    live = np.flatnonzero(s[:, 0] > 0.0)
    if not live.size:
        return out
    s1 = s[live, 0]
    t = s[live] / s1[:, None]
    sq = np.square(t)
    stable = np.sum(sq, axis=1)
    energy = np.cumsum(sq, axis=1)
    targets = np.asarray(ENERGY_LEVELS)[None, :] * energy[:, -1:] * (1.0 - ENERGY_RANK_RTOL)
    ranks = np.sum(energy[:, None, :] < targets[:, :, None], axis=2) + 1
    p = t / np.sum(t, axis=1, keepdims=True)
    pos = p > 0.0
    plogp = np.where(pos, p * np.log(np.where(pos, p, 1.0)), 0.0)
    eff = np.exp(-np.sum(plogp, axis=1))
    frob = s1 * np.sqrt(stable)
    util = stable / r if r > 0 else np.zeros_like(stable)
    for i, fr, top, st, ut, er, (k90, k95, k99) in zip(live.tolist(), frob.tolist(), s1.tolist(), stable.tolist(),
                                                        util.tolist(), eff.tolist(), ranks.tolist(), strict=True):
        out[i] = SpectrumMetrics(fr, top, st, ut, er, k90, k95, k99)
    return out
