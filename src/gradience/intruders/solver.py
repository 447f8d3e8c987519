"""Top-k singular triplets of W + s·L·R from products with W and the low-rank term only (block Krylov).

Why: the dense SVD of a 4096×11008 merged weight costs tens of seconds per layer and a second dense copy of W;
the top-k triplets live in a Krylov space of a few blocks. The basis is kept in the left space:
Q₀ = orth(M·Ω), Q_{j+1} = orth((I − QQᵀ)·M·Mᵀ·Q_j) (two Gram–Schmidt passes), and Rayleigh–Ritz on QᵀM = Zᵀ with
Z = Mᵀ·Q (through the small Gram ZᵀZ, grown one block at a time) gives u, σ, v. The stop is residual based: ‖M·v_i − σ_i·u_i‖ ≤ rtol·σ₁ for every i < k (Mᵀ·u_i =
σ_i·v_i holds exactly by construction). The Krylov products run in float32 against W as stored (no float64 copy
of W); the basis and the small problems are float64. ``TorchOperator`` runs W's products on a torch device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gradience.policy.thresholds import INTRUDER_BLOCK_EXTRA, INTRUDER_MAX_BLOCKS, INTRUDER_RESIDUAL_RTOL


class Operator(Protocol):
    """A real m×n matrix seen through its products with blocks of vectors (float64 in and out)."""

    shape: tuple[int, int]

    def matmat(self, x: np.ndarray) -> np.ndarray: ...   # M @ x, x (n, b)

    def rmatmat(self, y: np.ndarray) -> np.ndarray: ...  # Mᵀ @ y, y (m, b)


class LowRankPlus:
    """M = W + s·L·R for W (m, n) float32 (a view of the file is fine), L (m, r), R (r, n); L None: M = W."""

    def __init__(self, w: np.ndarray, l_fac: np.ndarray | None = None, r_fac: np.ndarray | None = None,
                 scale: float = 1.0) -> None:
        self.w = w
        self.shape = (int(w.shape[0]), int(w.shape[1]))
        self.l = None if l_fac is None else np.asarray(l_fac, dtype=np.float64) * float(scale)
        self.r = None if r_fac is None else np.asarray(r_fac, dtype=np.float64)

    def _w(self, w: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(w @ x.astype(np.float32), dtype=np.float64)

    def matmat(self, x: np.ndarray) -> np.ndarray:
        out = self._w(self.w, x)
        if self.l is not None and self.r is not None:
            out += self.l @ (self.r @ x)
        return out

    def rmatmat(self, y: np.ndarray) -> np.ndarray:
        out = self._w(self.w.T, y)
        if self.l is not None and self.r is not None:
            out += self.r.T @ (self.l.T @ y)
        return out


class TorchOperator(LowRankPlus):
    """The same operator with W's products on a torch device (the low-rank term stays in numpy float64)."""

    def __init__(self, w: np.ndarray, l_fac: np.ndarray | None = None, r_fac: np.ndarray | None = None,
                 scale: float = 1.0, device: str = "cpu") -> None:
        super().__init__(w, l_fac, r_fac, scale)
        import torch

        self._torch = torch
        self.device = device
        self.tw = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device)

    def _w(self, w: Any, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        tw = self.tw if w is self.w else self.tw.T
        return np.asarray((tw @ tx).cpu().numpy(), dtype=np.float64)


class _Transposed:
    """Mᵀ seen through the products of M."""

    def __init__(self, op: Operator) -> None:
        self.op = op
        self.shape = (op.shape[1], op.shape[0])

    def matmat(self, x: np.ndarray) -> np.ndarray:
        return self.op.rmatmat(x)

    def rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self.op.matmat(y)


@dataclass(frozen=True)
class TopK:
    """u (m, k), sigma (k,) descending, v (n, k) float64; ``residual`` ‖M·v_i − σ_i·u_i‖ per triplet (for a
    tall M solved as Mᵀ, ‖Mᵀ·u_i − σ_i·v_i‖; the other one is then exact by construction)."""

    u: np.ndarray
    sigma: np.ndarray
    v: np.ndarray
    residual: np.ndarray
    converged: bool
    products: int        # block products with M or Mᵀ (each costs one pass over W)
    blocks: int


def _orth_against(y: np.ndarray, basis: list[np.ndarray], floor: float) -> np.ndarray:
    """Columns spanning y minus its projection on the basis (CGS2), without directions below ``floor``."""
    for _ in range(2):
        for q in basis:
            y = y - q @ (q.T @ y)
    if y.size == 0:
        return y
    u, s, _ = np.linalg.svd(y, full_matrices=False)
    keep = s > floor
    return np.ascontiguousarray(u[:, keep])


CHECK_EVERY = 2


def _ritz(qs: list[np.ndarray], zs: list[np.ndarray], ys: list[np.ndarray], gram: np.ndarray, k: int, rtol: float,
          products: int, blocks: int, exhausted: bool) -> tuple[TopK, bool]:
    """Rayleigh–Ritz on the basis so far: the top-k triplets, their residuals, and whether all met the stop."""
    theta, e = np.linalg.eigh(gram)
    order = np.argsort(theta)[::-1]
    kk = min(k, theta.shape[0])
    e = e[:, order[:kk]]
    sig = np.sqrt(np.clip(theta[order[:kk]], 0.0, None))
    safe = np.where(sig > 0, sig, 1.0)
    u = np.concatenate(qs, axis=1) @ e
    v = (np.concatenate(zs, axis=1) @ e) / safe
    mv = (np.concatenate(ys, axis=1) @ e) / safe
    res = np.linalg.norm(mv - u * sig, axis=0)
    sigma1 = float(sig[0]) if sig.size else 0.0
    ok = kk == k and bool(np.all(res <= rtol * max(sigma1, np.finfo(float).tiny)))
    return TopK(u, sig, v, res, ok or exhausted, products, blocks), ok


def top_singular(op: Operator, k: int, *, rtol: float = INTRUDER_RESIDUAL_RTOL, block: int | None = None,
                 max_blocks: int = INTRUDER_MAX_BLOCKS, seed: int = 0, start: np.ndarray | None = None) -> TopK:
    """The k largest singular triplets of ``op`` (k ≤ min(m, n)); see the module docstring for the method.

    Two products per block: Z_j = Mᵀ·Q_j and Y_j = M·Z_j. Y_j is both the next block's raw directions and, kept,
    what makes the residual free: with ZᵀZ = E·Θ·Eᵀ, σ = √θ, u = Q·e, v = Z·e/σ and M·v = Y·e/σ exactly.
    ``start`` (m, s): left-space directions expected near the answer (for W + s·L·R: L and W's top vectors), the
    first block instead of M·Ω (completed with M·Ω up to the block size); only the speed depends on it.
    A tall M (m > n, gate/up as stored) is solved as Mᵀ: the basis, its orthogonalisation and the Ritz products
    then live in the shorter dimension (n), about m/n times cheaper; the products with W cost the same.
    """
    m, n = op.shape
    if m > n:
        t_start = None if start is None else op.rmatmat(np.asarray(start, dtype=np.float64))  # right-space
        tr = top_singular(_Transposed(op), k, rtol=rtol, block=block, max_blocks=max_blocks, seed=seed, start=t_start)
        return TopK(tr.v, tr.sigma, tr.u, tr.residual, tr.converged, tr.products + (start is not None), tr.blocks)
    full = min(m, n)
    k = max(1, min(k, full))
    b = min(full, block if block is not None else k + INTRUDER_BLOCK_EXTRA)
    rng = np.random.default_rng(seed)
    extra = b if start is None else max(0, b - start.shape[1])
    y = op.matmat(rng.standard_normal((n, extra))) if extra else np.zeros((m, 0))
    products = 1 if extra else 0
    if start is not None:
        y = np.concatenate([np.asarray(start, dtype=np.float64), y], axis=1)
    floor = (float(np.linalg.norm(y)) or 1.0) * 1e-13
    qs: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    gram = np.zeros((0, 0))
    q = _orth_against(y, qs, floor)
    result: TopK | None = None
    sigma1 = 0.0
    checked = 0
    for blocks in range(1, max_blocks + 1):
        if q.shape[1] == 0:
            break
        z = op.rmatmat(q)
        y = op.matmat(z)
        products += 2
        # Gram of Z = [Z_0 … Z_j], grown by the new block only.
        cross = np.concatenate(zs, axis=1).T @ z if zs else np.zeros((0, z.shape[1]))
        gram = np.block([[gram, cross], [cross.T, z.T @ z]])
        qs.append(q)
        zs.append(z)
        ys.append(y)
        exhausted = gram.shape[0] >= full
        # The Rayleigh–Ritz step and the residuals cost more than the block's two products once the basis is a few
        # hundred columns wide (eigh of the Gram, three basis-wide products): done on the first and every second
        # block (at most one block of products more than checking each).
        if not (blocks == 1 or blocks % CHECK_EVERY == 0 or exhausted or blocks == max_blocks):
            q = _orth_against(y, qs, floor * max(1.0, sigma1))
            continue
        result, ok = _ritz(qs, zs, ys, gram, k, rtol, products, blocks, exhausted)
        checked = blocks
        sigma1 = float(result.sigma[0]) if result.sigma.size else 0.0
        if ok or exhausted or sigma1 == 0.0:
            break
        q = _orth_against(y, qs, floor * max(1.0, sigma1))
    if qs and checked != len(qs):  # the basis stopped growing between two checks: evaluate what was built
        result, _ok = _ritz(qs, zs, ys, gram, k, rtol, products, len(qs), gram.shape[0] >= full)
    if result is None:  # M·Ω was zero: M is the zero matrix (or Ω missed its range)
        zero_u = np.zeros((m, k))
        return TopK(zero_u, np.zeros(k), np.zeros((n, k)), np.zeros(k), True, products, 0)
    if result.sigma.shape[0] < k:  # the range of M has fewer than k dimensions: pad with zero triplets
        pad = k - result.sigma.shape[0]
        result = TopK(np.pad(result.u, ((0, 0), (0, pad))), np.pad(result.sigma, (0, pad)),
                      np.pad(result.v, ((0, 0), (0, pad))), np.pad(result.residual, (0, pad)),
                      result.converged, result.products, result.blocks)
    return result


def dense_left_singular(w: np.ndarray, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors (m, min(m, n)) and σ of the base W: the fallback when a partial SVD cannot
    decide (PEFT's own computation, ``torch.linalg.svd(W, full_matrices=False)``)."""
    if device is not None:
        import torch

        tw = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device)
        u, s, _ = torch.linalg.svd(tw, full_matrices=False)
        return u.cpu().numpy().astype(np.float64), s.cpu().numpy().astype(np.float64)
    u, s, _ = np.linalg.svd(np.asarray(w, dtype=np.float32), full_matrices=False)
    return u.astype(np.float64), s.astype(np.float64)


def blocks_for(k: int, full: int) -> int:
    """How many Krylov blocks a complete basis needs (the solver is exact at that point)."""
    b = min(full, k + INTRUDER_BLOCK_EXTRA)
    return math.ceil(full / max(b, 1))
