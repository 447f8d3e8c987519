"""cat / linear / svd of one module from the factors: the weighted sum of LoRA updates is itself a LoRA.

Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ … wₙsₙBₙ]·[A₁; …; Aₙ] =: B_w·A_s, a LoRA of rank R = Σrᵢ (sᵢ each input's own PEFT
scale: alpha/r, rsLoRA alpha/√r, rank_pattern / alpha_pattern applied by the adapter reader). So

* ``cat`` (and ``linear`` without a policy) writes B_w, A_s themselves at rank R: exact, no SVD at all;
* ``svd`` (and ``linear`` with a policy) needs the best rank-k approximation of B_w·A_s. Its singular values
  come from the audit's one spectrum path on the stacked factors (float64 Grams, an R×R core:
  :mod:`gradience.audit.spectrum`), the factors from compress's truncation
  (:func:`gradience.compress.factors.truncated_factors`, Gram coefficients or Householder QR). The dense
  d_out×d_in ΔW is never formed.

The same pass gives the interference diagnostics: the Gram of the *unweighted* stacks holds every input's
own Grams and every cross product, which is exactly what compare's cosine / subspace-overlap math needs
(:func:`gradience.compare.subspace.compare_grams`), so a module's factors are read once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradience.audit.spectrum import FactorGram, energy_rank, factor_gram, singular_values_many
from gradience.compress.factors import truncated_factors
from gradience.errors import InputError
from gradience.policy.thresholds import MERGE_CANCEL_RTOL


@dataclass
class Stack:
    """One module's stacked factors: A_s (R, d_in) and the unweighted B_s (d_out, R) (float32 or float64); per input
    its weight wᵢ, PEFT scale sᵢ, column range in the stack and input index."""

    a: np.ndarray
    b: np.ndarray
    weights: list[float]
    scales: list[float]
    blocks: list[tuple[int, int]]
    inputs: list[int]

    @property
    def coefs(self) -> list[float]:
        """wᵢ·sᵢ: what multiplies Bᵢ·Aᵢ in the weighted sum."""
        return [w * s for w, s in zip(self.weights, self.scales, strict=True)]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def column_weights(self) -> np.ndarray:
        """wᵢ·sᵢ repeated over input i's rᵢ columns: B_w = B_s·diag(this)."""
        d = np.empty(self.rank)
        for (lo, hi), c in zip(self.blocks, self.coefs, strict=True):
            d[lo:hi] = c
        return d

    def weighted_b(self) -> np.ndarray:
        """B_w in float64."""
        return np.asarray(self.b, dtype=np.float64) * self.column_weights()[None, :]


class NonFiniteFactors(InputError):
    """NaN/Inf factors in input ``input_index``: :func:`gradience.merge.core.merge` names that adapter's file."""

    def __init__(self, input_index: int, problem: str) -> None:
        super().__init__(problem)
        self.input_index = input_index


def stack(name: str, factors: Sequence[tuple[int, np.ndarray, np.ndarray, float, float]]) -> Stack:
    """Stack (input index, A (r, d_in), B (d_out, r), weight wᵢ, scale sᵢ) of the inputs that have the module."""
    blocks, lo = [], 0
    for f in factors:
        blocks.append((lo, lo + f[1].shape[0]))
        lo += f[1].shape[0]
    # In the factors' own float dtype (float32 for float32/bf16/fp16 files): the Gram pass and compress's
    # truncation convert to float64 block by block, so no float64 copy of the stack is needed.
    dtype = np.result_type(*(f[1] for f in factors), *(f[2] for f in factors), np.float32)
    a_s = np.concatenate([np.asarray(f[1], dtype=dtype) for f in factors], axis=0)
    b_s = np.concatenate([np.asarray(f[2], dtype=dtype) for f in factors], axis=1)
    if not (np.isfinite(a_s).all() and np.isfinite(b_s).all()):
        bad = next(f[0] for f in factors if not (np.isfinite(f[1]).all() and np.isfinite(f[2]).all()))
        raise NonFiniteFactors(bad, f"module {name}: the factors hold NaN or Inf; nothing meaningful can be merged")
    return Stack(a_s, b_s, [f[3] for f in factors], [f[4] for f in factors], blocks, [f[0] for f in factors])


@dataclass
class StackSpectrum:
    """The stacked Grams (unweighted B) and σ of the weighted sum B_w·A_s (descending, length R)."""

    ga: FactorGram
    gb: FactorGram
    gb_weighted: FactorGram
    sigma: np.ndarray
    input_norms: list[float]     # ‖wᵢ·sᵢ·Bᵢ·Aᵢ‖_F of each stacked input, from the Gram blocks

    @property
    def cancelled(self) -> bool:
        """The weighted sum is zero up to float64 rounding of the inputs (exactly opposite updates, zero weights)."""
        total = float(np.sqrt(np.sum(np.square(self.sigma))))
        return total <= MERGE_CANCEL_RTOL * sum(self.input_norms)


def stack_spectrum(st: Stack) -> StackSpectrum:
    """One float64 Gram pass over the stacked factors, then σ(B_w·A_s) from the R×R core (audit's path)."""
    ga = factor_gram(st.a, rows=True)
    gb = factor_gram(st.b, rows=False)
    d = st.column_weights()
    gbw = FactorGram(gb.g * d[:, None] * d[None, :], gb.exp, gb.finite)
    sigmas, _ = singular_values_many([(ga, gbw)], lambda _i: (st.a, st.weighted_b()))
    g_a, g_b = ga.unscaled(), gbw.unscaled()
    norms = [math.sqrt(max(0.0, float(np.sum(g_a[lo:hi, lo:hi] * g_b[lo:hi, lo:hi])))) for lo, hi in st.blocks]
    return StackSpectrum(ga, gb, gbw, np.asarray(sigmas[0], dtype=np.float64), norms)


def cat_factors(st: Stack, alpha: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A' (k, d_in), B' (d_out, k)), k >= R, with (α/k)·B'·A' = Σ wᵢsᵢBᵢAᵢ exactly: block i scaled by
    cᵢ = wᵢsᵢk/α, split evenly (√|cᵢ| on both factors, the sign on B) as compress balances its factors; rows
    beyond R are zero (a uniform rank pads)."""
    if k < st.rank:
        raise ValueError(f"cannot write rank {st.rank} at rank {k}")
    a_new = np.zeros((k, st.a.shape[1]))
    b_new = np.zeros((st.b.shape[0], k))
    for (lo, hi), c in zip(st.blocks, st.coefs, strict=True):
        coef = c * k / alpha
        root = math.sqrt(abs(coef))
        a_new[lo:hi] = st.a[lo:hi] * root
        b_new[:, lo:hi] = st.b[:, lo:hi] * (root * (-1.0 if coef < 0 else 1.0))
    return a_new, b_new


def svd_factors(st: Stack, spec: StackSpectrum, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(A' (k, d_in), B' (d_out, k), "gram"|"qr") with (α/k)·B'·A' the best rank-k approximation of the sum.

    compress's Gram coefficients (:func:`gradience.compress.factors.gram_split`) on the weighted Grams; since
    B_w = B_s·D (D the column weights), B' = B_s·(D·x_b) needs no weighted copy of B. Ill-conditioned stacks
    (identical inputs, steep spectra) take compress's QR path (:func:`truncated_factors`).
    """
    from gradience.compress.factors import gram_split, left_product, right_product

    split = gram_split(spec.ga.unscaled(), spec.gb_weighted.unscaled(), k, k / alpha)
    if split is not None:
        x_b = st.column_weights()[:, None] * split.x_b
        return right_product(split.y_a, st.a), left_product(st.b, x_b), "gram"
    return truncated_factors(st.a, st.weighted_b(), k, k / alpha)


def pairwise_interference(st: Stack, spec: StackSpectrum) -> list[dict[str, object]]:
    """Cosine and top-k subspace overlap (compare's definitions) of every pair of inputs that have the module.

    k = min of the two updates' 90%-energy ranks (compare's default), clamped to their numerical ranks.
    ``conflict`` = ½·overlap·(1 − cos): 0 for orthogonal subspaces or identical directions, 1 for the same
    subspace with opposite sign — the pairs whose sum cancels rather than adds.
    """
    from gradience.compare.subspace import compare_grams

    ga, gb = spec.ga.unscaled(), spec.gb.unscaled()
    rows: list[dict[str, object]] = []
    for x in range(len(st.blocks)):
        for y in range(x + 1, len(st.blocks)):
            (lx, hx), (ly, hy) = st.blocks[x], st.blocks[y]
            idx = np.r_[lx:hx, ly:hy]
            row: dict[str, object] = {"a": st.inputs[x], "b": st.inputs[y], "cos": None, "overlap": None,
                                      "k": None, "conflict": None}
            try:
                pc = compare_grams(ga[np.ix_(idx, idx)], gb[np.ix_(idx, idx)], hx - lx, st.coefs[x], st.coefs[y])
            except ValueError:
                rows.append(row)
                continue
            row["cos"] = pc.cos
            if pc.cos is not None and pc.svd_a is not None and pc.svd_b is not None:
                wanted = max(1, min(energy_rank(pc.svd_a.sigma, 0.9), energy_rank(pc.svd_b.sigma, 0.9)))
                k = max(1, min(wanted, pc.numerical_rank("a"), pc.numerical_rank("b")))
                left, right = pc.overlaps(k)
                overlap = 0.5 * (left + right)
                row.update({"overlap": overlap, "overlap_left": left, "overlap_right": right, "k": k,
                            "conflict": 0.5 * overlap * (1.0 - pc.cos)})
            rows.append(row)
    return rows
