"""ties / dare: the published element-wise merges, on one module's dense ΔW at a time, then re-factored.

TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", Alg. 1): per input
τᵢ = sᵢ·Bᵢ·Aᵢ, *trim* to its top-``density`` entries by magnitude (k = int(density·numel), ties at the
threshold kept; PEFT's ``magnitude_based_pruning``), *elect* the sign γ = sgn(Σᵢ wᵢ·τ̂ᵢ) (the "total" mass
rule), *disjoint mean* Σ_{i: sgn(wᵢτ̂ᵢ)=γ} wᵢ·τ̂ᵢ / #{i: sgn(wᵢτ̂ᵢ)=γ} (PEFT's ``disjoint_merge``). sgn(0) = 0
as in the paper: entries whose trimmed values cancel exactly stay 0.
DARE (Yu et al. 2024, "Language Models are Super Mario", Eq. 2): drop each entry of τᵢ with probability p,
rescale the survivors by 1/(1−p), then the weighted sum Σᵢ wᵢ·τ̃ᵢ (PEFT's ``dare_linear``). The mask comes
from ``numpy.random.default_rng([seed, input index, crc32(module name)])``, one uniform per entry in
row-major order: the same seed gives the same adapter whatever the order modules are processed in.

Memory: one module's dense ΔW (float64) plus row chunks. The trim thresholds need the whole |τᵢ| once per
input; that pass reuses the same buffer (in-place ``partition``). The merged matrix M is then re-factored by
its exact truncated SVD, from the eigen-decomposition of the smaller Gram M·Mᵀ or Mᵀ·M (float64): the kept
directions are accurate to ~eps·σ₁²/σ_k², and ‖M‖_F (hence the retained energy) is exact.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from gradience.merge.factored import Stack

_CHUNK_ELEMS = 1 << 20  # entries per row chunk of the dense passes (8 MiB of float64)


def _chunks(d_out: int, d_in: int) -> list[slice]:
    rows = max(1, _CHUNK_ELEMS // max(d_in, 1))
    return [slice(i, min(i + rows, d_out)) for i in range(0, d_out, rows)]


def _update_rows(st: Stack, x: int, rows: slice) -> np.ndarray:
    """sᵢ·Bᵢ[rows]·Aᵢ (unweighted update of stacked input x) in float64."""
    lo, hi = st.blocks[x]
    return (st.b[rows, lo:hi] * st.scales[x]) @ st.a[lo:hi]


@dataclass
class DenseMerge:
    """The merged dense update M (d_out, d_in) float64 and what the element-wise step measured."""

    m: np.ndarray
    sign_conflict_rate: float | None   # over entries where ≥ 2 inputs are non-zero after trim/drop
    kept_fraction: list[float]         # per input: fraction of entries surviving trim/drop


def _trim_thresholds(st: Stack, buf: np.ndarray, density: float) -> list[float]:
    """Per input, the magnitude at the k-th largest |τᵢ| entry (k = int(density·numel)); inf keeps nothing."""
    numel = buf.size
    keep = int(density * numel)
    out = []
    for x in range(len(st.blocks)):
        if keep <= 0:
            out.append(math.inf)
            continue
        for rows in _chunks(*buf.shape):
            np.abs(_update_rows(st, x, rows), out=buf[rows])
        flat = buf.reshape(-1)
        flat.partition(numel - keep)  # in place: no second dense buffer
        out.append(float(flat[numel - keep]))
    return out


def _dare_rng(seed: int, x: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, x, zlib.crc32(name.encode("utf-8", "surrogatepass"))])


def dense_merge(st: Stack, name: str, d_out: int, d_in: int, method: str, *, density: float, drop: float,
                seed: int) -> DenseMerge:
    """TIES or DARE of the module's inputs (see the module docstring)."""
    m = np.empty((d_out, d_in))
    n = len(st.blocks)
    thresholds = _trim_thresholds(st, m, density) if method == "ties" else []
    rngs = [_dare_rng(seed, st.inputs[x], name) for x in range(n)] if method == "dare" else []
    kept = [0] * n
    multi = conflicts = 0
    for rows in _chunks(d_out, d_in):
        vals = np.empty((n, rows.stop - rows.start, d_in))
        for x in range(n):
            t = _update_rows(st, x, rows)
            if method == "ties":
                t[np.abs(t) < thresholds[x]] = 0.0
            else:
                mask = rngs[x].random(t.shape) >= drop
                t = np.where(mask, t / (1.0 - drop), 0.0)
            kept[x] += int(np.count_nonzero(t))
            vals[x] = t * st.weights[x]
        signs = np.sign(vals)
        nonzero = np.count_nonzero(signs, axis=0)
        pos = np.count_nonzero(signs > 0, axis=0)
        several = nonzero >= 2
        multi += int(np.count_nonzero(several))
        conflicts += int(np.count_nonzero(several & (pos > 0) & (pos < nonzero)))
        if method == "ties":
            gamma = np.sign(vals.sum(axis=0))
            agree = (signs == gamma[None]) & (signs != 0)
            count = agree.sum(axis=0)
            m[rows] = np.where(agree, vals, 0.0).sum(axis=0) / np.maximum(count, 1)
        else:
            m[rows] = vals.sum(axis=0)
    numel = d_out * d_in
    return DenseMerge(m, None if multi == 0 else conflicts / multi, [c / numel for c in kept])


@dataclass
class DenseSpectrum:
    """Eigen-decomposition of the smaller Gram of M: σ descending, the matching singular vectors of that side."""

    sigma: np.ndarray
    vectors: np.ndarray     # (d_out, q) left vectors when ``left`` else (d_in, q) right vectors
    left: bool


def dense_spectrum(m: np.ndarray) -> DenseSpectrum:
    d_out, d_in = m.shape
    left = d_out <= d_in
    g = m @ m.T if left else m.T @ m
    w, v = np.linalg.eigh(0.5 * (g + g.T))
    w, v = w[::-1], v[:, ::-1]
    return DenseSpectrum(np.sqrt(np.clip(w, 0.0, None)), v, left)


def dense_factors(m: np.ndarray, spec: DenseSpectrum, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(A' (k, d_in), B' (d_out, k)) with (α/k)·B'·A' = M_k, the best rank-k approximation (exact projection of
    M on its top-k singular vectors), split evenly between the factors."""
    d_out, d_in = m.shape
    q = spec.sigma.shape[0]
    kk = min(k, q)
    root = math.sqrt(k / alpha)
    s = spec.sigma[:kk]
    floor = max(d_out, d_in) * np.finfo(np.float64).eps * (float(s[0]) if kk else 0.0)
    live = s > floor
    inv = np.divide(1.0, np.sqrt(s), out=np.zeros_like(s), where=live)
    half = np.sqrt(s) * live
    a_new = np.zeros((k, d_in))
    b_new = np.zeros((d_out, k))
    vec = spec.vectors[:, :kk]
    if spec.left:   # M_k = U_k·U_kᵀ·M: B' ∝ U_k·Σ^½, A' ∝ Σ^-½·U_kᵀ·M
        b_new[:, :kk] = vec * (half * root)[None, :]
        a_new[:kk] = (inv * root)[:, None] * (vec.T @ m)
    else:           # M_k = M·V_k·V_kᵀ: B' ∝ M·V_k·Σ^-½, A' ∝ Σ^½·V_kᵀ
        b_new[:, :kk] = (m @ vec) * (inv * root)[None, :]
        a_new[:kk] = (half * root)[:, None] * vec.T
    return a_new, b_new


def error_vs_sum(st: Stack, a_new: np.ndarray, b_new: np.ndarray, k: int, alpha: float) -> tuple[float, float]:
    """(‖(α/k)B'A' − S‖_F, ‖S‖_F) with S = Σᵢ wᵢsᵢBᵢAᵢ the exact weighted sum, in row chunks."""
    bw = st.weighted_b()
    err2 = ref2 = 0.0
    for rows in _chunks(b_new.shape[0], a_new.shape[1]):
        ref = bw[rows] @ st.a
        diff = (b_new[rows] * (alpha / k)) @ a_new - ref
        err2 += float(np.sum(diff * diff))
        ref2 += float(np.sum(ref * ref))
    return math.sqrt(err2), math.sqrt(ref2)
