"""ties / dare: the published element-wise merges, one module's dense ΔW at a time, then re-factored.

TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", Alg. 1): per input
τᵢ = sᵢ·Bᵢ·Aᵢ, *trim* to its top-``density`` entries by magnitude (k = int(density·numel), ties at the
threshold kept; PEFT's ``magnitude_based_pruning``), *elect* the sign γ = sgn(Σᵢ wᵢ·τ̂ᵢ) (the "total" mass
rule), *disjoint mean* Σ_{i: sgn(wᵢτ̂ᵢ)=γ} wᵢ·τ̂ᵢ / #{i: sgn(wᵢτ̂ᵢ)=γ} (PEFT's ``disjoint_merge``). sgn(0) = 0
as in the paper: entries whose trimmed values cancel exactly stay 0.
DARE (Yu et al. 2024, "Language Models are Super Mario", Eq. 2): drop each entry of τᵢ with probability p,
rescale the survivors by 1/(1−p), then the weighted sum Σᵢ wᵢ·τ̃ᵢ (PEFT's ``dare_linear``). Entry (row, col)
of input i is kept when u ≥ p, u = splitmix64(keyᵢ + row·d_in + col)·2⁻⁶⁴ (top 53 bits) with
keyᵢ = splitmix64(seed, i, crc32(module name)): a counter-based stream, so the same seed gives the same
adapter whatever the order or the blocking of the computation.

Memory: M is never held whole. It is produced in slabs along its long side and folded into the Gram of its
short side (G = M·Mᵀ or Mᵀ·M, float64, min(d)² entries), whose eigen-decomposition gives σ and the kept
singular vectors; the factors are then one more slab pass (B' ∝ U_k, A' ∝ U_kᵀ·M, or the transpose). TIES'
trim thresholds are exact order statistics of each |τᵢ| found by radix selection over slabs (a few extra slab
passes, no dense buffer; :func:`order_statistic`). The kept
directions are accurate to ~eps·σ₁²/σ_k (absolute, relative to σ₁), and ‖M‖_F (hence the retained energy)
is exact.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from gradience.merge.factored import Stack

_CHUNK_ELEMS = 1 << 20  # entries per slab of the dense passes (8 MiB of float64)
_M64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def dare_key(seed: int, index: int, name: str) -> int:
    """The per-(input, module) key of the DARE mask stream."""
    crc = zlib.crc32(name.encode("utf-8", "surrogatepass"))
    return _splitmix64_int(_splitmix64_int(_splitmix64_int(seed & _M64) ^ index) ^ crc)


def dare_uniforms(key: int, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) for the uint64 ``counters`` (entry indices row·d_in + col), splitmix64 vectorised."""
    with np.errstate(over="ignore"):
        z = counters.astype(np.uint64)  # a fresh array: every step below is in place (uint64 wraps mod 2^64)
        z += np.uint64((key + 0x9E3779B97F4A7C15) & _M64)
        t = z >> np.uint64(30)
        z ^= t
        z *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(z, np.uint64(27), out=t)
        z ^= t
        z *= np.uint64(0x94D049BB133111EB)
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
        z >>= np.uint64(11)
    out = z.astype(np.float64)
    out *= 1.0 / (1 << 53)
    return out


class Slabs:
    """Slabs of a d_out×d_in module along its long side: columns when d_out <= d_in (then G = M·Mᵀ), else rows
    (G = Mᵀ·M). ``left`` says which singular vectors the Gram gives (left = U, of the d_out side)."""

    def __init__(self, d_out: int, d_in: int) -> None:
        self.d_out, self.d_in = d_out, d_in
        self.left = d_out <= d_in
        short, long_ = (d_out, d_in) if self.left else (d_in, d_out)
        width = max(1, _CHUNK_ELEMS // max(short, 1))
        self.spans = [slice(i, min(i + width, long_)) for i in range(0, long_, width)]

    def update(self, st: Stack, x: int, span: slice) -> np.ndarray:
        """sᵢ·Bᵢ·Aᵢ restricted to the slab (unweighted update of stacked input x), float64."""
        lo, hi = st.blocks[x]
        f64 = np.float64
        if self.left:
            return (np.asarray(st.b[:, lo:hi], f64) * st.scales[x]) @ np.asarray(st.a[lo:hi, span], f64)
        return (np.asarray(st.b[span, lo:hi], f64) * st.scales[x]) @ np.asarray(st.a[lo:hi], f64)

    def counters(self, span: slice) -> np.ndarray:
        """Row-major entry indices row·d_in + col of the slab (the DARE mask counters)."""
        if self.left:
            rows = np.arange(self.d_out, dtype=np.uint64)[:, None] * np.uint64(self.d_in)
            return rows + np.arange(span.start, span.stop, dtype=np.uint64)[None, :]
        rows = np.arange(span.start, span.stop, dtype=np.uint64)[:, None] * np.uint64(self.d_in)
        return rows + np.arange(self.d_in, dtype=np.uint64)[None, :]

    def gram(self, slab: np.ndarray) -> np.ndarray:
        return slab @ slab.T if self.left else slab.T @ slab


_DIGIT = 16                   # bits resolved per radix pass
_DIGIT_MASK = np.uint64((1 << _DIGIT) - 1)


def order_statistic(slab_of: Callable[[slice], np.ndarray], spans: Sequence[slice], rank: int) -> float:
    """The ``rank``-th smallest |v| (0-based; what ``np.partition(|v|, rank)[rank]`` gives) over the entries of
    all slabs, exactly, without holding them together.

    Radix selection on the IEEE-754 bits: for non-negative float64 the uint64 bit pattern orders like the value,
    so each pass recomputes the slabs and histograms the next 16 bits of the entries whose higher bits match
    the prefix found so far. Once the bin that holds the answer has at most ``_CHUNK_ELEMS`` entries they are
    gathered and partitioned. At most 4 histogram passes (then the bin holds one value) + 1 gathering pass;
    memory: one slab, its bit view and a 2¹⁶ histogram.
    """
    prefix, shift, count = 0, 64, None
    while True:
        if count is not None and (count <= _CHUNK_ELEMS or shift == 0):
            if shift == 0:
                return float(np.array([prefix], dtype=np.uint64).view(np.float64)[0])
            found = []
            for span in spans:
                bits = np.abs(slab_of(span)).reshape(-1).view(np.uint64)
                found.append(bits[(bits >> np.uint64(shift)) == np.uint64(prefix)])
            cand = np.concatenate(found)
            cand.partition(rank)
            return float(cand[rank:rank + 1].view(np.float64)[0])
        shift -= _DIGIT
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        for span in spans:
            bits = np.abs(slab_of(span)).reshape(-1).view(np.uint64)
            if shift + _DIGIT < 64:
                bits = bits[(bits >> np.uint64(shift + _DIGIT)) == np.uint64(prefix)]
            hist += np.bincount(((bits >> np.uint64(shift)) & _DIGIT_MASK).astype(np.intp), minlength=1 << _DIGIT)
        below = np.cumsum(hist)
        digit = int(np.searchsorted(below, rank, side="right"))
        rank -= int(below[digit - 1]) if digit else 0
        count = int(hist[digit])
        prefix = (prefix << _DIGIT) | digit


@dataclass
class Elementwise:
    """What a TIES/DARE merge needs besides the factors: the method, its parameters and TIES' thresholds."""

    method: str
    density: float
    drop: float
    keys: list[int]             # DARE keys per stacked input
    thresholds: list[float]     # TIES trim magnitude per stacked input


def prepare(st: Stack, name: str, slabs: Slabs, method: str, *, density: float, drop: float,
            seed: int) -> Elementwise:
    """TIES: each input's trim threshold (exact order statistic of |τᵢ|, slab by slab); DARE: keys."""
    thresholds: list[float] = []
    if method == "ties":
        numel = slabs.d_out * slabs.d_in
        keep = int(density * numel)
        if keep > 0:
            thresholds = [order_statistic(partial(_update_of, st, slabs, x), slabs.spans, numel - keep)
                          for x in range(len(st.blocks))]
        else:
            thresholds = [math.inf] * len(st.blocks)
    keys = [dare_key(seed, i, name) for i in st.inputs] if method == "dare" else []
    return Elementwise(method, density, drop, keys, thresholds)


def _update_of(st: Stack, slabs: Slabs, x: int, span: slice) -> np.ndarray:
    return slabs.update(st, x, span)


@dataclass
class SlabStats:
    multi: int = 0          # entries where >= 2 inputs are non-zero after trim/drop
    conflicts: int = 0      # ... of which the signs disagree
    kept: list[int] | None = None


def merged_slabs(st: Stack, slabs: Slabs, ew: Elementwise, stats: SlabStats | None = None
                 ) -> Iterator[tuple[slice, np.ndarray]]:
    """(span, M restricted to the slab) for every slab, in order; ``stats`` accumulates the sign statistics."""
    n = len(st.blocks)
    for span in slabs.spans:
        vals = []
        for x in range(n):
            t = slabs.update(st, x, span)
            if ew.method == "ties":
                t[np.abs(t) < ew.thresholds[x]] = 0.0
            else:
                keep = dare_uniforms(ew.keys[x], slabs.counters(span)) >= ew.drop
                t = np.where(keep, t * (1.0 / (1.0 - ew.drop)), 0.0)
            if stats is not None:
                stats.kept = stats.kept or [0] * n
                stats.kept[x] += int(np.count_nonzero(t))
            vals.append(t * st.weights[x])
        v = np.stack(vals)
        signs = np.sign(v)
        if stats is not None:
            nonzero = np.count_nonzero(signs, axis=0)
            pos = np.count_nonzero(signs > 0, axis=0)
            several = nonzero >= 2
            stats.multi += int(np.count_nonzero(several))
            stats.conflicts += int(np.count_nonzero(several & (pos > 0) & (pos < nonzero)))
        if ew.method == "ties":
            gamma = np.sign(v.sum(axis=0))
            agree = (signs == gamma[None]) & (signs != 0)
            yield span, np.where(agree, v, 0.0).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
        else:
            yield span, v.sum(axis=0)


def merged_gram(st: Stack, slabs: Slabs, ew: Elementwise, stats: SlabStats | None = None) -> np.ndarray:
    """The Gram of M's short side, accumulated slab by slab (M is never held whole)."""
    short = slabs.d_out if slabs.left else slabs.d_in
    g = np.zeros((short, short))
    for _span, slab in merged_slabs(st, slabs, ew, stats):
        g += slabs.gram(slab)
    return g


def spectrum_of_gram(g: np.ndarray) -> np.ndarray:
    """σ of M (descending) from its Gram; eigvalsh reads the lower triangle only, so G needs no symmetrising."""
    w = np.linalg.eigvalsh(g)[::-1]
    return np.sqrt(np.clip(w, 0.0, None))


def eigh_desc(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(σ descending, the matching singular vectors of the Gram's side, as columns) from M's Gram."""
    w, v = np.linalg.eigh(g)
    return np.sqrt(np.clip(w[::-1], 0.0, None)), v[:, ::-1]


def frobenius2(st: Stack, slabs: Slabs, ew: Elementwise, stats: SlabStats | None = None) -> float:
    """‖M‖_F² in one slab pass (and the sign statistics)."""
    return float(sum(float(np.sum(slab * slab)) for _span, slab in merged_slabs(st, slabs, ew, stats)))


@dataclass
class TopK:
    """The top-k singular directions of M on the Gram's side: σ (descending), vectors (short, kk)."""

    sigma: np.ndarray
    vectors: np.ndarray
    method: str            # "eigh" (exact eigen-decomposition) or "subspace" (converged subspace iteration)
    iterations: int = 0
    converged: bool = True


def top_k(st: Stack, slabs: Slabs, ew: Elementwise, k: int, gram: np.ndarray | None = None) -> TopK:
    """The top-k singular vectors of M without an m×m eigen-decomposition when m is large.

    Small Gram side (<= ``MERGE_EXACT_EIGH_MAX``): the exact ``eigh`` of the Gram. Otherwise subspace iteration
    on G (Halko, Martinsson & Tropp 2011, Alg. 4.4 with Rayleigh–Ritz), applied as G·Q = Σ slab·(slabᵀ·Q) over
    slabs of M (or with ``gram`` when it is already in memory): memory m×(k+p), no m² workspace. It stops when
    the captured energy Σ_{i<=k} λ_i (the quantity the best rank-k approximation maximises) changes by less than
    ``MERGE_SUBSPACE_RTOL`` relative, or after ``MERGE_SUBSPACE_MAX_ITER`` passes (``converged`` False).
    """
    from gradience.policy.thresholds import (
        MERGE_EXACT_EIGH_MAX,
        MERGE_SUBSPACE_MAX_ITER,
        MERGE_SUBSPACE_OVERSAMPLE,
        MERGE_SUBSPACE_RTOL,
    )

    short = slabs.d_out if slabs.left else slabs.d_in
    kk = min(k, short)
    width = min(short, kk + max(kk, MERGE_SUBSPACE_OVERSAMPLE))
    if short <= MERGE_EXACT_EIGH_MAX or width >= short:
        g = gram if gram is not None else merged_gram(st, slabs, ew)
        sigma, vec = eigh_desc(g)
        return TopK(sigma[:kk], np.ascontiguousarray(vec[:, :kk]), "eigh")

    def apply(q: np.ndarray) -> np.ndarray:
        if gram is not None:
            return gram @ q
        out = np.zeros_like(q)
        for _span, slab in merged_slabs(st, slabs, ew):
            out += slab @ (slab.T @ q) if slabs.left else slab.T @ (slab @ q)
        return out

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((short, width)))
    captured_prev = -1.0
    lam = np.zeros(width)
    vecs = q
    for it in range(1, MERGE_SUBSPACE_MAX_ITER + 1):
        y = apply(q)
        t = q.T @ y                                  # Rayleigh quotient (width×width)
        lam, rot = np.linalg.eigh(0.5 * (t + t.T))
        lam, rot = lam[::-1], rot[:, ::-1]
        vecs = q @ rot                               # Ritz vectors of this subspace
        captured = float(np.sum(np.clip(lam[:kk], 0.0, None)))
        if captured <= 0.0 or abs(captured - captured_prev) <= MERGE_SUBSPACE_RTOL * captured:
            return TopK(np.sqrt(np.clip(lam[:kk], 0.0, None)), np.ascontiguousarray(vecs[:, :kk]), "subspace", it)
        captured_prev = captured
        q, _ = np.linalg.qr(y)
    return TopK(np.sqrt(np.clip(lam[:kk], 0.0, None)), np.ascontiguousarray(vecs[:, :kk]), "subspace",
                MERGE_SUBSPACE_MAX_ITER, converged=False)


def factors(st: Stack, slabs: Slabs, ew: Elementwise, sigma: np.ndarray, vec: np.ndarray, k: int,
            alpha: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(A' (k, d_in), B' (d_out, k), ‖(α/k)B'A' − S‖_F, ‖S‖_F) with (α/k)·B'·A' = M_k, the best rank-k
    approximation of M (its projection on the top-k singular vectors of the Gram's side), split evenly; S is
    the exact weighted sum Σᵢ wᵢsᵢBᵢAᵢ. One slab pass for the factors, one for the error."""
    kk = vec.shape[1]
    root = math.sqrt(k / alpha)
    s = sigma[:kk]
    floor = max(slabs.d_out, slabs.d_in) * np.finfo(np.float64).eps * (float(s[0]) if kk else 0.0)
    live = s > floor
    inv = np.divide(1.0, np.sqrt(s), out=np.zeros_like(s), where=live)
    half = np.sqrt(s) * live
    a_new = np.zeros((k, slabs.d_in))
    b_new = np.zeros((slabs.d_out, k))
    for span, slab in merged_slabs(st, slabs, ew):
        if slabs.left:   # M_k = U_k·U_kᵀ·M: A' ∝ Σ^-½·U_kᵀ·M (columns of this slab)
            a_new[:kk, span] = (inv * root)[:, None] * (vec.T @ slab)
        else:            # M_k = M·V_k·V_kᵀ: B' ∝ M·V_k·Σ^-½ (rows of this slab)
            b_new[span, :kk] = (slab @ vec) * (inv * root)[None, :]
    if slabs.left:
        b_new[:, :kk] = vec * (half * root)[None, :]
    else:
        a_new[:kk] = (half * root)[:, None] * vec.T
    err2 = ref2 = 0.0
    bw = st.weighted_b()
    a64 = np.asarray(st.a, np.float64)
    scale = alpha / k
    for span in slabs.spans:
        if slabs.left:
            ref = bw @ a64[:, span]
            diff = (b_new * scale) @ a_new[:, span] - ref
        else:
            ref = bw[span] @ a64
            diff = (b_new[span] * scale) @ a_new - ref
        err2 += float(np.sum(diff * diff))
        ref2 += float(np.sum(ref * ref))
    return a_new, b_new, math.sqrt(err2), math.sqrt(ref2)
