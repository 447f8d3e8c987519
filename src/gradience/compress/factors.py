"""New LoRA factors for one pair: the exact best rank-k approximation, split evenly, scale absorbed.

ΔW = s·B·A with A (r, d_in), B (d_out, r). Its thin SVD is B·A = U Σ Vᵀ (exact, from r×r work); the best
rank-k approximation (Eckart–Young, Frobenius and spectral norm) is ΔW_k = s·U_k Σ_k V_kᵀ. The output module
has rank k and PEFT scale α/k (one global ``lora_alpha``, ``use_rslora: false``), so the new factors carry
c = s·k/α:  B' = sign(c)·√|c|·U_k Σ_k^½ and A' = √|c|·Σ_k^½ V_kᵀ, giving (α/k)·B'A' = ΔW_k exactly.
The balanced split keeps ‖B'‖ and ‖A'‖ of the same size (neither factor absorbs the whole scale), which keeps
bf16/fp16 rounding of the two factors symmetric and training resumable.

Two ways to get U_k Σ_k^½ and Σ_k^½ V_kᵀ, both exact in exact arithmetic:

* from the audit's Grams (G_B = BᵀB = V_b W V_bᵀ, G_A = A·Aᵀ = V_a Λ V_aᵀ): with R_B = W^½ V_bᵀ and
  R_A = Λ^½ V_aᵀ (so B = Q_B R_B, Aᵀ = Q_A R_A), the core C = R_B R_Aᵀ has the SVD U_c Σ V_cᵀ and
  U_k Σ_k = B·(R_Aᵀ V_c,k), Σ_k V_kᵀ = (U_c,kᵀ R_B)·A — two (d×r)·(r×k) products, no inverse, no Q.
  This is what makes compress cost about one audit (SPEC §12's ≤ 2× target); it is used only when both
  Grams are well conditioned and σ_k is not tiny, where its error stays near float64 rounding;
* otherwise :func:`gradience.audit.spectrum.factored_svd` (Householder QR of B and Aᵀ, SVD of the core), the
  accurate path for rank-deficient or steep factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gradience.audit.spectrum import factor_grams, factored_svd
from gradience.policy.thresholds import COMPRESS_GRAM_SIGMA_RATIO, SPECTRUM_QR_REFINE_RATIO

SplitMethod = Literal["gram", "qr"]

# Row/column blocks for the float64 products (a few MB of scratch instead of a float64 copy of a factor).
_BLOCK_ELEMS = 1 << 18


@dataclass(frozen=True)
class GramSplit:
    """Coefficients of the Gram path: B' = B @ x_b (d_out, k), A' = y_a @ A (k, d_in), scale included."""

    x_b: np.ndarray   # (r, k)
    y_a: np.ndarray   # (k, r)


def gram_split(ga: np.ndarray, gb: np.ndarray, k: int, coef: float) -> GramSplit | None:
    """The Gram-path coefficients for rank k with scale coefficient ``coef`` = s·k/α, or None when the Grams
    are too ill-conditioned (or σ_k too small relative to σ₁) for this path to be accurate."""
    wb, vb = np.linalg.eigh(gb)
    wa, va = np.linalg.eigh(ga)
    if not (wb[-1] > 0.0 and wa[-1] > 0.0):
        return None
    if wb[0] < SPECTRUM_QR_REFINE_RATIO * wb[-1] or wa[0] < SPECTRUM_QR_REFINE_RATIO * wa[-1]:
        return None
    r_b = np.sqrt(wb)[:, None] * vb.T      # R_Bᵀ R_B = G_B
    r_a = np.sqrt(wa)[:, None] * va.T      # R_Aᵀ R_A = G_A
    uc, s, vct = np.linalg.svd(r_b @ r_a.T)
    if s[k - 1] <= COMPRESS_GRAM_SIGMA_RATIO * s[0]:
        return None
    root = math.sqrt(abs(coef))
    sign = -1.0 if coef < 0 else 1.0
    inv_half = 1.0 / np.sqrt(s[:k])
    x_b = (r_a.T @ vct[:k].T) * (inv_half * (sign * root))[None, :]
    y_a = (inv_half * root)[:, None] * (uc[:, :k].T @ r_b)
    return GramSplit(x_b=x_b, y_a=y_a)


def left_product(b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """b (d, r) @ x (r, k) in float64, converting b in row blocks (b may be a float32 memory-mapped view)."""
    d, r = b.shape
    out = np.empty((d, x.shape[1]), dtype=np.float64)
    block = max(1, _BLOCK_ELEMS // max(r, 1))
    for i in range(0, d, block):
        out[i:i + block] = np.asarray(b[i:i + block], dtype=np.float64) @ x
    return out


def right_product(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """y (k, r) @ a (r, d) in float64, converting a in column blocks."""
    r, d = a.shape
    out = np.empty((y.shape[0], d), dtype=np.float64)
    block = max(1, _BLOCK_ELEMS // max(r, 1))
    for j in range(0, d, block):
        out[:, j:j + block] = y @ np.asarray(a[:, j:j + block], dtype=np.float64)
    return out


def truncated_factors(a: np.ndarray, b: np.ndarray, k: int, coef: float,
                      grams: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, SplitMethod]:
    """(A' (k, d_in), B' (d_out, k), method) in float64 with (α/k)·B'A' = s·(B·A)_k, where coef = s·k/α.

    ``grams``: the pair's (G_A, G_B) from the audit; without them (or when they are ill-conditioned) the QR
    path of :func:`factored_svd` is used.
    """
    if k < 1:
        raise ValueError(f"rank must be >= 1, got {k}")
    if grams is not None:
        split = gram_split(grams[0], grams[1], k, coef)
        if split is not None:
            return right_product(split.y_a, a), left_product(b, split.x_b), "gram"
    svd = factored_svd(a, b)
    q = svd.sigma.shape[0]
    kk = min(k, q)
    half = np.sqrt(svd.sigma[:kk]) * math.sqrt(abs(coef))
    a_new = np.zeros((k, a.shape[1]))
    b_new = np.zeros((b.shape[0], k))
    a_new[:kk] = half[:, None] * svd.vt[:kk]
    b_new[:, :kk] = svd.u[:, :kk] * (half * (-1.0 if coef < 0 else 1.0))[None, :]
    return a_new, b_new, "qr"


def rescaled_factors(a: np.ndarray, b: np.ndarray, k: int, coef: float) -> tuple[np.ndarray, np.ndarray]:
    """The pair's own factors (no truncation) with the scale change ``coef`` = s·k/α spread over both, zero-padded
    to rank ``k`` >= r (padding keeps ΔW and lets every module have the same rank)."""
    r = a.shape[0]
    if k < r:
        raise ValueError(f"cannot pad rank {r} down to {k}")
    root = math.sqrt(abs(coef))
    a_new = np.zeros((k, a.shape[1]))
    b_new = np.zeros((b.shape[0], k))
    a_new[:r] = np.asarray(a, dtype=np.float64) * root
    b_new[:, :r] = np.asarray(b, dtype=np.float64) * (root * (-1.0 if coef < 0 else 1.0))
    return a_new, b_new


def _exponent(x: np.ndarray) -> int:
    """e with max|x| ≈ 2^e (0 for an all-zero or non-finite x)."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    return math.frexp(top)[1]


def scaled_truncated_factors(a: np.ndarray, b: np.ndarray, k: int, coef: float
                             ) -> tuple[np.ndarray, np.ndarray, SplitMethod]:
    """:func:`truncated_factors` for finite factors whose σ (or Grams) overflow or underflow float64
    (values ~1e200 or ~1e-200): the SVD runs on A·2^-ea and B·2^-eb and the balanced split gets the factor
    2^((ea+eb)/2) back on each side, so (α/k)·B'A' is unchanged while σ itself is never formed."""
    ea, eb = _exponent(a), _exponent(b)
    a_s = np.ldexp(np.asarray(a, dtype=np.float64), -ea)
    b_s = np.ldexp(np.asarray(b, dtype=np.float64), -eb)
    a_new, b_new, method = truncated_factors(a_s, b_s, k, coef, factor_grams(a_s, b_s))
    half, odd = divmod(ea + eb, 2)
    back = math.sqrt(2.0) if odd else 1.0
    with np.errstate(over="ignore"):
        return np.ldexp(a_new * back, half), np.ldexp(b_new * back, half), method


# Earlier private names (merge imported them before they were public).
_left_product = left_product
_right_product = right_product


def batched_gram_truncation(a3: np.ndarray, b3: np.ndarray, k: int, coef: float
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gram_split` for a stack of E pairs at once (MoE experts: ``a3`` (E, r, d_in) with expert e's A at
    ``a3[e]``, ``b3`` (d_out, r, E) with its B at ``b3[:, :, e]``, as PEFT's ParamWrapper stores them reshaped;
    one k and one ``coef`` for the stack): (A' (E, k, d_in), B' (E, d_out, k), ok (E,) bool), float64.

    The same math as the one-pair Gram path, batched: the Grams come from the audit's stacked pass
    (:func:`gradience.audit.stacked.stacked_pair_grams`), then one eigh/SVD call and two batched products serve
    every expert, instead of E small ones (~1 ms of overhead each). ``ok`` is False for experts where the
    one-pair path would not take the Gram route (a Gram that needed rescaling, ill-conditioned Grams, σ_k too
    small, zero or non-finite factors): the caller recomputes those with the accurate one-pair path.
    """
    from gradience.audit.stacked import stacked_pair_grams

    n_exp = a3.shape[0]
    grams = stacked_pair_grams(a3, b3)
    usable = np.array([fa.exp == 0 and fb.exp == 0 and fa.finite and fb.finite for fa, fb in grams], dtype=bool)
    eye = np.eye(a3.shape[1])
    ga = np.stack([fa.g if ok else eye for (fa, _fb), ok in zip(grams, usable, strict=True)])
    gb = np.stack([fb.g if ok else eye for (_fa, fb), ok in zip(grams, usable, strict=True)])
    with np.errstate(over="ignore", invalid="ignore", under="ignore", divide="ignore"):
        wa, va = np.linalg.eigh(ga)
        wb, vb = np.linalg.eigh(gb)
        top_a, top_b = wa[:, -1], wb[:, -1]
        ok = usable & (top_a > 0.0) & (top_b > 0.0)
        ok &= (wa[:, 0] >= SPECTRUM_QR_REFINE_RATIO * top_a) & (wb[:, 0] >= SPECTRUM_QR_REFINE_RATIO * top_b)
        r_b = np.sqrt(np.clip(wb, 0.0, None))[:, :, None] * vb.transpose(0, 2, 1)
        r_a = np.sqrt(np.clip(wa, 0.0, None))[:, :, None] * va.transpose(0, 2, 1)
        uc, s, vct = np.linalg.svd(r_b @ r_a.transpose(0, 2, 1))
        ok &= s[:, k - 1] > COMPRESS_GRAM_SIGMA_RATIO * s[:, 0]
        root = math.sqrt(abs(coef))
        sign = -1.0 if coef < 0 else 1.0
        inv_half = np.where(ok[:, None], 1.0 / np.sqrt(np.where(s[:, :k] > 0, s[:, :k], 1.0)), 0.0)
        x_b = (r_a.transpose(0, 2, 1) @ vct[:, :k].transpose(0, 2, 1)) * (inv_half * (sign * root))[:, None, :]
        y_a = (inv_half * root)[:, :, None] * (uc[:, :, :k].transpose(0, 2, 1) @ r_b)
        a_new, b_new = _stack_products(a3, b3, y_a, x_b)
        ok &= np.isfinite(a_new).reshape(n_exp, -1).all(axis=1) & np.isfinite(b_new).reshape(n_exp, -1).all(axis=1)
    return a_new, b_new, ok


# The batched products take this many experts' factors to float64 at a time (bounded, reused buffers).
_PRODUCT_CHUNK_ELEMS = 1 << 17


def _stack_products(a3: np.ndarray, b3: np.ndarray, y_a: np.ndarray, x_b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(y_a[e]·A_e, B_e·x_b[e]) for every expert: A' (E, k, d_in) and B' (E, d_out, k), float64.

    Why chunked: converting a whole stack to float64 allocated (and page-faulted) 2x its size per stack, and B's
    expert slices are strided, so each matmul went the slow non-BLAS way; here a few experts at a time are
    converted into reused contiguous buffers (B transposed on the way), the per-expert GEMMs are the same ones on
    the same values (the result is bit-identical). B' is a view of a (d_out, k, E) array: PEFT's stacked layout,
    so the caller joins the stack without another copy."""
    n_exp, r, d_in = a3.shape
    d_out, k = b3.shape[0], x_b.shape[2]
    a_new = np.empty((n_exp, k, d_in))
    b_fin = np.empty((d_out, k, n_exp))
    b_new = b_fin.transpose(2, 0, 1)
    step = max(1, min(n_exp, _PRODUCT_CHUNK_ELEMS // max(1, r * max(d_in, d_out))))
    a_buf, b_buf, b_out = np.empty((step, r, d_in)), np.empty((step, d_out, r)), np.empty((step, d_out, k))
    for lo in range(0, n_exp, step):
        n = min(n_exp, lo + step) - lo
        a_buf[:n] = a3[lo:lo + n]
        np.matmul(y_a[lo:lo + n], a_buf[:n], out=a_new[lo:lo + n])
        b_buf[:n] = b3[:, :, lo:lo + n].transpose(2, 0, 1)
        np.matmul(b_buf[:n], x_b[lo:lo + n], out=b_out[:n])
        b_new[lo:lo + n] = b_out[:n]
    return a_new, b_new
