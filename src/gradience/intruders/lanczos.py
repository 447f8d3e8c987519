"""A second certificate for "max |cos| < ε" when the partial SVD leaves most of u's mass outside it (a direction in
W's bulk, the typical intruder): a bound on every single remaining cosine from a few Lanczos steps, not a dense SVD.

Let w = (I − U_p·U_pᵀ)·u, ρ = ‖w‖. For the base's left singular vectors outside U_p, c_j² is the weight of the atom
at σ_j² of the spectral measure μ of w under C = W·Wᵀ (total mass ρ²; a multiple σ_j² carries the sum of its
vectors' c², which bounds each). L Lanczos steps on C from w/ρ give the orthonormal polynomials p_0 … p_{L−1} of
μ/ρ², and for every x, μ({x}) ≤ ρ²/K_L(x) with K_L(x) = Σ_l p_l(x)² (the Christoffel function: the minimum of
∫q² dμ over polynomials q of degree < L with q(x) = 1, Szegő / Chebyshev–Markov–Stieltjes). So
max_{j>p} |c_j| ≤ ρ·max_x K_L(x)^{-1/2} over the spectrum's interval, which falls like 1/√L for a mass spread
over the bulk. With m > n (gate/up as stored), C has a null space (not among PEFT's U₀: its U₀ is the n columns
of the thin SVD) whose atom at 0 no bound can tell from a small σ_j; so w is first projected onto range(W) with
the n×n Gram (P·w = W·(WᵀW)⁻¹·Wᵀ·w, float64, one pass over W and a Cholesky-checked solve: m·n² + n³ flops
against the ~4·m·n² + 8·n³ of W's dense SVD), after which μ has no atom at 0 and the bound applies unchanged
(c_j = ⟨P·w, u_j⟩ for every j). A Gram that is not positive definite by a margin (W numerically rank deficient:
PEFT's U₀ then holds arbitrary null vectors) returns no certificate. Numerically: products with W in float32 and
U_p from the residual-stopped solver; the decision margin (``INTRUDER_DECIDE_MARGIN``), full reorthogonalisation
and ``PROJECTION_SLACK`` cover them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradience.intruders.detect import BaseSpectrum
from gradience.intruders.solver import Operator

LANCZOS_MAX_STEPS = 48
LANCZOS_CHECK_EVERY = 6
_GRID = 4001
# m > n: the Gram must be positive definite with λ_min ≥ this × σ₁² (cond(W) ≤ 1e4), so the float64 projection is
# accurate to ~1e-8; PROJECTION_SLACK is added to every bound computed from a projected vector.
GRAM_MIN_RATIO = 1e-8
PROJECTION_SLACK = 1e-6
_GRAM_ROWS = 2048


def _dense_rows(op: Operator) -> np.ndarray:
    w = getattr(op, "w", None)
    if w is None:
        raise TypeError("the range projection needs W itself (LowRankPlus / TorchOperator without the low-rank term)")
    return np.asarray(w)


def range_projection(op: Operator, x: np.ndarray, sigma1: float) -> np.ndarray | None:
    """P·x, the orthogonal projection of the columns of x (m, q) onto range(W) for a tall W (m > n), through the
    Cholesky-checked n×n Gram in float64 (row blocks of W, no float64 copy of W); None when WᵀW is not positive
    definite by ``GRAM_MIN_RATIO``·σ₁²."""
    tw = getattr(op, "tw", None)
    if tw is not None and tw.device.type != "cpu":
        return _range_projection_torch(tw, x, sigma1)
    w = _dense_rows(op)
    m, n = w.shape
    gram = np.zeros((n, n))
    wtx = np.zeros((n, x.shape[1]))
    for start in range(0, m, _GRAM_ROWS):
        rows = np.asarray(w[start:start + _GRAM_ROWS], dtype=np.float64)
        gram += rows.T @ rows
        wtx += rows.T @ x[start:start + _GRAM_ROWS]
    try:
        np.linalg.cholesky(gram - (GRAM_MIN_RATIO * sigma1 * sigma1) * np.eye(n))
    except np.linalg.LinAlgError:
        return None
    z = np.linalg.solve(gram, wtx)
    out = np.empty_like(x, dtype=np.float64)
    for start in range(0, m, _GRAM_ROWS):
        out[start:start + _GRAM_ROWS] = np.asarray(w[start:start + _GRAM_ROWS], dtype=np.float64) @ z
    return out


def _max_inverse_k(alpha: np.ndarray, beta: np.ndarray, hi: float) -> float:
    """max over x ∈ [0, hi] of 1/K(x), K(x) = Σ_{l<L} p_l(x)² from the Jacobi coefficients (α_l, β_{l+1})."""
    steps = alpha.shape[0]
    t = np.diag(alpha) + np.diag(beta[: steps - 1], 1) + np.diag(beta[: steps - 1], -1)
    nodes = np.linalg.eigvalsh(t)
    xs = np.unique(np.concatenate([np.linspace(0.0, hi, _GRID), np.clip(nodes, 0.0, hi)]))

    def k_of(x: np.ndarray) -> np.ndarray:
        p_prev, p = np.zeros_like(x), np.ones_like(x)
        total = np.ones_like(x)
        for step in range(steps - 1):
            p_next = ((x - alpha[step]) * p - (beta[step - 1] if step else 0.0) * p_prev) / beta[step]
            p_prev, p = p, p_next
            total += p * p
        return total

    k = k_of(xs)
    best = int(np.argmin(k))
    # Refine around the smallest grid value (K is smooth between grid points; golden-section on the bracket).
    lo, up = xs[max(best - 1, 0)], xs[min(best + 1, xs.shape[0] - 1)]
    value = float(k[best])
    for _ in range(40):
        a, b = lo + 0.382 * (up - lo), lo + 0.618 * (up - lo)
        ka, kb = k_of(np.array([a, b]))
        value = min(value, float(ka), float(kb))
        if ka < kb:
            up = b
        else:
            lo = a
    return 1.0 / value if value > 0 else np.inf


def _range_projection_torch(tw: Any, x: np.ndarray, sigma1: float) -> np.ndarray | None:
    """The same projection with W on a torch accelerator (float64 there: a GPU does the Gram in well under 1 s)."""
    import torch

    w64 = tw.to(torch.float64)
    gram = w64.T @ w64
    shifted = gram - (GRAM_MIN_RATIO * sigma1 * sigma1) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    _chol, info = torch.linalg.cholesky_ex(shifted)
    if int(info.item()) != 0:
        return None
    tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(tw.device)
    z = torch.linalg.solve(gram, w64.T @ tx)
    return np.asarray((w64 @ z).cpu().numpy(), dtype=np.float64)


def remaining_cos_bound(op: Operator, base: BaseSpectrum, u: np.ndarray, target: float,
                        max_steps: int = LANCZOS_MAX_STEPS) -> np.ndarray:
    """For each column of u (m, q): an upper bound on |cos| with every base left singular vector outside ``base``
    (stops early for a column once its bound is below ``target``)."""
    q = u.shape[1]
    up = base.u
    w = u - up @ (up.T @ u)
    rho = np.linalg.norm(w, axis=0)
    hi = float(base.sigma[0]) ** 2 * 1.0001 if base.sigma.size else 0.0
    slack = 0.0
    if op.shape[0] > op.shape[1] and hi > 0:
        projected = range_projection(op, w, float(base.sigma[0]))
        if projected is None:
            return rho  # each remaining |cos| ≤ ‖w‖ still holds; no sharper certificate without the projection
        w = projected - up @ (up.T @ projected)
        slack = PROJECTION_SLACK
        rho = np.linalg.norm(w, axis=0) + slack
    bounds = rho.copy()
    live = [j for j in range(q) if rho[j] >= target and hi > 0]
    if not live:
        return bounds
    vs = {j: [w[:, j] / np.linalg.norm(w[:, j])] for j in live}
    alphas: dict[int, list[float]] = {j: [] for j in live}
    betas: dict[int, list[float]] = {j: [] for j in live}
    for step in range(max_steps):
        if not live:
            break
        block = np.stack([vs[j][-1] for j in live], axis=1)
        x = op.matmat(op.rmatmat(block))  # C·v = W·(Wᵀ·v), float32 products with W as stored
        x -= up @ (up.T @ x)
        still: list[int] = []
        for col, j in enumerate(live):
            xj = x[:, col]
            a = float(vs[j][-1] @ xj)
            alphas[j].append(a)
            basis = np.stack(vs[j], axis=1)
            for _ in range(2):  # full reorthogonalisation (Lanczos loses orthogonality within a few steps)
                xj = xj - basis @ (basis.T @ xj)
            b = float(np.linalg.norm(xj))
            betas[j].append(b)
            done = b <= 1e-10 * max(hi, 1e-300)  # an invariant subspace: μ has exactly step+1 atoms
            if done or (step + 1) % LANCZOS_CHECK_EVERY == 0 or step + 1 == max_steps:
                al, be = np.asarray(alphas[j]), np.asarray(betas[j])
                if done:
                    t = np.diag(al) + np.diag(be[:-1], 1) + np.diag(be[:-1], -1)
                    _theta, vec = np.linalg.eigh(t)
                    weight = float(np.max(vec[0] ** 2))  # Gauss weights are the atoms' masses, exactly
                else:
                    weight = min(1.0, _max_inverse_k(al, be, hi))
                bounds[j] = (rho[j] - slack) * np.sqrt(weight) + slack
                if done or bounds[j] < target:
                    continue
            vs[j].append(xj / b)
            still.append(j)
        live = still
    return bounds
