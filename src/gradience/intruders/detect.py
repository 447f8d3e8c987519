"""Intruder dimensions of one layer: the top-k of W + ΔW against a partial SVD of W, certified by a mass bound.

Definition (Shuttleworth et al. 2025; PEFT ``reduce_intruder_dimension``, peft/tuners/lora/intruders.py): with
U₀ the left singular vectors of W and u_i the i-th left singular vector of W + ΔW (both in the stored
orientation of W), c_i = max_j |u_iᵀ·U₀[:, j]|; i < k is an intruder when c_i < ε.

Certification from a partial SVD U_p (the top p base vectors): the cosines over any orthonormal set have
Σ_j c_ij² ≤ ‖u_i‖² = 1, so every base vector outside U_p has |cos| ≤ √(1 − Σ_{j≤p} c_ij²). Hence
* some |cos| over U_p ≥ ε  →  not an intruder (whatever the rest holds);
* every |cos| over U_p < ε and √(1 − Σ c²) < ε  →  an intruder.
A direction whose cosines over U_p are all small but whose remaining mass is not (a direction in W's bulk, the
typical intruder) gets the Lanczos bound on each single remaining cosine (:mod:`gradience.intruders.lanczos`;
for a tall W, m > n, on its projection onto range(W), which is what PEFT's n base vectors span). Only when that
cannot decide either is the partial SVD extended (×4) and, past a fraction of min(m, n), replaced by the dense SVD
of W as the last resort (exact, PEFT's computation; reported as decided_by "dense"). A margin around ε leaves
near-ties to the longer paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gradience.intruders.solver import Operator, TopK, dense_left_singular, top_singular
from gradience.policy.thresholds import (
    INTRUDER_BASE_P0,
    INTRUDER_DECIDE_MARGIN,
    INTRUDER_DENSE_FRACTION,
    INTRUDER_RESIDUAL_RTOL,
)


@dataclass(frozen=True)
class BaseSpectrum:
    """Top p left singular vectors of W (m, p) and σ; ``complete`` when p = min(m, n) (a dense SVD)."""

    u: np.ndarray
    sigma: np.ndarray
    complete: bool


@dataclass
class LayerIntruders:
    """Per-layer outcome; ``cos`` is the best |cos| found per top-k direction (exact when ``decided_by`` is
    "dense", a lower bound otherwise), ``cos_upper`` an upper bound on it."""

    k: int
    eps: float
    indices: list[int]
    sigma: list[float]                     # the top-k σ of W + ΔW
    cos: list[float]
    cos_upper: list[float]
    decided_by: str                        # "partial" (p0 vectors) | "lanczos" (+ the Lanczos bound) | "extended" | "dense"
    base_vectors: int                      # p of the partial SVD that decided
    converged: bool
    residual_max: float
    products: int
    triplets: TopK | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def energy(self) -> float:
        """Σ σ_i² over the intruders (the squared Frobenius norm of their components in W + ΔW)."""
        return float(sum(self.sigma[i] ** 2 for i in self.indices))

    @property
    def energy_fraction(self) -> float | None:
        """That energy over the top-k's energy."""
        total = float(sum(s * s for s in self.sigma))
        return self.energy / total if total > 0 else None


def decide(u: np.ndarray, base: BaseSpectrum, eps: float,
           margin: float = INTRUDER_DECIDE_MARGIN) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(intruder?, decided?, best |cos| found, upper bound) for each column of u (m, k) against ``base``."""
    c = np.abs(u.T @ base.u) if base.u.shape[1] else np.zeros((u.shape[1], 0))
    best = c.max(axis=1) if c.shape[1] else np.zeros(u.shape[1])
    if base.complete:
        return best < eps, np.ones(u.shape[1], dtype=bool), best, best
    rest = np.sqrt(np.clip(1.0 - np.sum(c * c, axis=1), 0.0, None))
    upper = np.maximum(best, rest)
    not_intruder = best >= eps + margin
    intruder = (best < eps - margin) & (rest < eps - margin)
    return intruder, intruder | not_intruder, best, upper


BaseProvider = Callable[[int], BaseSpectrum]


def partial_base(w: np.ndarray, p: int, device: str | None = None) -> BaseSpectrum:
    """The top p left singular vectors of W by block Krylov (the dense SVD once p is a large share)."""
    full = min(w.shape)
    if p >= INTRUDER_DENSE_FRACTION * full:
        u, s = dense_left_singular(w, device)
        return BaseSpectrum(u, s, True)
    from gradience.intruders.solver import LowRankPlus, TorchOperator

    op = LowRankPlus(w) if device is None else TorchOperator(w, device=device)
    top = top_singular(op, p)
    # Only Ritz vectors that met the residual stop count as base singular vectors.
    good = np.ones(top.sigma.shape[0], dtype=bool) if top.converged else _converged_prefix(top)
    return BaseSpectrum(top.u[:, good], top.sigma[good], False)


def _converged_prefix(top: TopK) -> np.ndarray:
    """The leading Ritz vectors that met the residual stop (an unconverged run keeps only those)."""
    ok = top.residual <= INTRUDER_RESIDUAL_RTOL * max(float(top.sigma[0]), np.finfo(float).tiny)
    bad = np.flatnonzero(~ok)
    keep = np.zeros_like(ok)
    keep[: (int(bad[0]) if bad.size else ok.shape[0])] = True
    return keep


def _lanczos(w_op: Operator, u: np.ndarray, base: BaseSpectrum, eps: float, intr: np.ndarray, decided: np.ndarray,
             best: np.ndarray, upper: np.ndarray) -> bool:
    """Try the Lanczos certificate (:mod:`gradience.intruders.lanczos`) on the undecided directions whose cosines
    over the partial SVD are all below ε; updates the arrays in place, True when it decided any."""
    from gradience.intruders.lanczos import remaining_cos_bound

    target = eps - INTRUDER_DECIDE_MARGIN
    cand = np.flatnonzero(~decided & (best < target))
    if cand.size == 0:
        return False
    bound = remaining_cos_bound(w_op, base, u[:, cand], target)
    ok = bound < target
    upper[cand] = np.maximum(best[cand], np.minimum(upper[cand], bound))
    intr[cand[ok]] = True
    decided[cand[ok]] = True
    return bool(ok.any())


def layer_intruders(merged: TopK, base_for: BaseProvider, full: int, k: int, eps: float,
                    p0: int = INTRUDER_BASE_P0, w_op: Operator | None = None) -> tuple[LayerIntruders, BaseSpectrum]:
    """Decide every top-k direction of ``merged``; ``base_for(p)`` gives a base spectrum with ≥ p vectors (from the
    cache or computed; complete when p reaches the dense share of ``full`` = min(m, n)). ``w_op``: W's products,
    for the Lanczos certificate of bulk directions (after a projection onto range(W) when m > n)."""
    u = merged.u[:, :k]
    p = p0
    base = base_for(p)
    extended = lanczos = False
    while True:
        intr, decided, best, upper = decide(u, base, eps)
        if not decided.all() and not base.complete and w_op is not None:
            lanczos = _lanczos(w_op, u, base, eps, intr, decided, best, upper) or lanczos
        if decided.all() or base.complete:
            break
        extended = True
        p = max(p * 4, base.u.shape[1] * 4)
        base = base_for(p if p < INTRUDER_DENSE_FRACTION * full else full)
    # A singular value at the solver's noise level (W + ΔW of rank < k) has an arbitrary vector: never an intruder.
    live = merged.sigma[:k] > INTRUDER_RESIDUAL_RTOL * (float(merged.sigma[0]) if k else 0.0)
    idx = [int(i) for i in np.flatnonzero(intr & live)]
    out = LayerIntruders(
        k=k, eps=eps, indices=idx, sigma=[float(x) for x in merged.sigma[:k]],
        cos=[float(x) for x in best], cos_upper=[float(x) for x in upper],
        decided_by="dense" if base.complete else ("extended" if extended else ("lanczos" if lanczos else "partial")), base_vectors=int(base.u.shape[1]),
        converged=merged.converged, residual_max=float(merged.residual[:k].max()) if k else 0.0,
        products=merged.products, triplets=merged)
    return out, base
