"""The steep path of :mod:`gradience.audit.spectrum`: an exact root of a factor whose Gram is ill-conditioned.

A factor X whose unit-diagonal Gram H is ill-conditioned (rank-deficient, or steep in a rotated basis: trained
adapters' B = G·diag(e^(−i/τ))·Q, about half of a 7B run's pairs) cannot take its weak directions from the
Gram: the Gram squares the spectrum, so those directions come back with ~sqrt(eps)·σ₁ error. They are
recomputed from the data instead: Z = V_weakᵀ·Y (a thin product, k ≤ r rows) has a Gram accurate relative to
*its* scale, and the same split is applied to Z, recursively, until the rest is below the float64 noise floor.

Why this module is shaped for speed (SPEC §11, issue 17 item 7): the one product that touches the factor's
data converts it into a float64 buffer reused across the factors of one audit and writes Z into another (a
fresh float64 copy of an 11008×16 factor per pair costs page faults on top of the arithmetic); the
eigen-solves of every steep factor's H are done in one batched call by the caller; and the recursion keeps
the top level's absolute error bound instead of re-splitting by the ratio at every level (see :func:`_root`),
so a trained adapter's steep factors need one or two levels, not one per six decades.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradience.policy.thresholds import SPECTRUM_FACTOR_SPLIT_RATIO

_EPS = float(np.finfo(np.float64).eps)
_MAX_DEPTH = 8  # each level shrinks the scale by the split ratio: 8 levels are far below the noise floor


class Scratch:
    """Float64 work buffers reused across the steep factors of one call (grown on demand, never shrunk)."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, n: int) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1))
            self._bufs[key] = buf
        return buf[:n]


def weak_product(x: np.ndarray, exp: int, rows: bool, u: np.ndarray,
                 scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Z·Zᵀ) in float64, Z = uᵀ·Y (k, d), for Y = x·2^-e when ``rows`` (A, x (r, d)) or Y = (x·2^-e)ᵀ
    (B, x (d, r)).

    x may be float32 (a mapped file) or float64; it is converted (exactly) into a float64 buffer reused across
    factors, and Z is written into another: a fresh 1.4 MB float64 copy per factor costs more in page faults
    than the arithmetic. Z lives in ``scratch`` (valid until the next factor)."""
    k = u.shape[1]
    if x.dtype == np.float64 and not exp:
        y = x
    else:
        y = scratch.get("x", x.size).reshape(x.shape)
        np.copyto(y, x)
        if exp:
            np.ldexp(y, -exp, out=y)
    if rows:
        d = x.shape[1]
        z = scratch.get("z", k * d).reshape(k, d)
        np.matmul(u.T, y, out=z)
        return z, z @ z.T
    d = x.shape[0]
    zt = scratch.get("z", d * k).reshape(d, k)
    np.matmul(y, u, out=zt)
    return zt.T, zt.T @ zt


def noise_floor2(shape: tuple[int, ...], top: float) -> float:
    """Squared absolute noise level of a thin float64 product over a factor whose largest Gram eigenvalue
    is ``top`` (rounding ~sqrt(d)·eps·‖X‖ on a length-d row, with a safety factor)."""
    d = max(shape) if shape else 1
    return (8.0 * math.sqrt(d) * _EPS) ** 2 * top


def _root(rows_times: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], w: np.ndarray, v: np.ndarray,
          floor2: float, depth: int = 0, top0: float = 0.0) -> np.ndarray:
    """T (n×n) with Y = T·Q, Q with orthonormal rows, for the n×d matrix Y whose Gram is V·diag(w)·Vᵀ.

    ``rows_times(U)`` computes Z = Uᵀ·Y from the data, and Z·Zᵀ. Directions accurate enough from the Gram are
    taken from it (T column = v·sqrt(w)); the others are recomputed as Z = V_smallᵀ·Y and handled the same way
    on Z's own Gram, whose rounding is relative to Z's (small) scale. Anything below ``floor2`` is noise: 0.

    Which directions are accurate enough: a Gram whose largest eigenvalue is S² gives a direction of scale σ
    with an error ~eps·S²/σ. At the top level (S² = ``top0``) the split ratio ρ keeps σ² >= ρ·S², an error
    <= eps·S₀/sqrt(ρ). Deeper down the same absolute bound is kept, σ² >= ρ·S²·(S²/S₀²): far more of a small
    Z is usable than ρ·S² alone would say, so the recursion ends after one or two levels instead of one level
    per factor of ρ (same accuracy, a fraction of the eigen-solves).
    """
    n = v.shape[0]
    w = np.maximum(w, 0.0)  # (a ufunc: np.clip's wrapper costs more than the op on r values)
    top = float(w[-1]) if n else 0.0
    t = np.zeros((n, n))
    if top <= floor2:
        return t
    top0 = top0 or top
    k = int(np.searchsorted(w, SPECTRUM_FACTOR_SPLIT_RATIO * top * (top / top0), side="left"))  # w ascending
    t[:, k:] = v[:, k:] * np.sqrt(w[k:])
    if k == 0 or depth >= _MAX_DEPTH:
        return t
    vs = v[:, :k]
    z, gz = rows_times(vs)
    wz, vz = np.linalg.eigh(gz)  # reads the lower triangle only: no symmetrising pass needed
    if float(wz[-1]) <= floor2:
        return t  # the weak part is noise: its columns stay 0
    # z may live in the caller's scratch buffer: it is only overwritten by the next factor, after this returns.
    t[:, :k] = vs @ _root(lambda u: _with_gram(u.T @ z), wz, vz, floor2, depth + 1, top0)
    return t


def _with_gram(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return z, z @ z.T


def refined_root(x: np.ndarray, exp: int, w: np.ndarray, v: np.ndarray, d: np.ndarray, *, rows: bool,
                 scratch: Scratch) -> np.ndarray:
    """Root D·T_H of a factor x (A (r, d) when ``rows``, else B (d, r)) whose unit-diagonal Gram H = V·diag(w)·Vᵀ
    (ascending w) is ill-conditioned: its weak directions are recomputed from the data (module docstring)."""
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0.0)
    root = _root(lambda u: weak_product(x, exp, rows, u * inv[:, None], scratch), w, v,
                 noise_floor2(x.shape, float(w[-1])))
    return d[:, None] * root
