"""Intruder dimensions (issue 23) against a dense numpy reference: the Krylov top-k, the base-side certification,
the spectra cache and the mitigation formula (PEFT's, written densely here)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gradience.intruders.cache import SpectraCache, tensor_hash
from gradience.intruders.detect import BaseSpectrum, decide, layer_intruders, partial_base
from gradience.intruders.mitigate import scale_components
from gradience.intruders.solver import LowRankPlus, top_singular

M, N, SPIKES = 360, 240, 16


def _base(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spiked W (16 separated σ from 30 down to 6 over a random bulk of norm ~2): W, its U and V (float64)."""
    rng = np.random.default_rng(seed)
    x = np.linalg.qr(rng.standard_normal((M, SPIKES)))[0]
    y = np.linalg.qr(rng.standard_normal((N, SPIKES)))[0]
    w = rng.standard_normal((M, N)) / np.sqrt(N) + (x * np.linspace(30, 6, SPIKES)) @ y.T
    w32 = w.astype(np.float32)
    u, _s, vt = np.linalg.svd(w32.astype(np.float64), full_matrices=False)
    return w32, u, vt.T


def _bulk_direction(rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    g = rng.standard_normal(basis.shape[0])
    g -= basis[:, :SPIKES] @ (basis[:, :SPIKES].T @ g)
    return g / np.linalg.norm(g)


def _dense_reference(w: np.ndarray, l_fac: np.ndarray, r_fac: np.ndarray, s: float, k: int = 10,
                     eps: float = 0.5) -> tuple[list[int], np.ndarray, np.ndarray]:
    """PEFT's computation in numpy: dense SVDs of W and W + ΔW, best |cos| of the left vectors."""
    u0 = np.linalg.svd(w.astype(np.float64), full_matrices=False)[0]
    um, sm, _ = np.linalg.svd(w.astype(np.float64) + s * l_fac @ r_fac, full_matrices=False)
    cos = np.abs(um[:, :k].T @ u0).max(axis=1)
    return [int(i) for i in np.flatnonzero(cos < eps)], cos, sm[:k]


def _detect(w: np.ndarray, l_fac: np.ndarray, r_fac: np.ndarray, s: float, k: int = 10, eps: float = 0.5):
    top = top_singular(LowRankPlus(w, l_fac, r_fac, s), k)
    found, _ = layer_intruders(top, lambda p: partial_base(w, p), min(w.shape), k, eps)
    return found


def test_krylov_top_k_matches_dense_svd() -> None:
    w, _u, _v = _base()
    rng = np.random.default_rng(1)
    l_fac, r_fac = rng.standard_normal((M, 8)), rng.standard_normal((8, N))
    top = top_singular(LowRankPlus(w, l_fac, r_fac, 0.5), 10)
    dense = np.linalg.svd(w.astype(np.float64) + 0.5 * l_fac @ r_fac, full_matrices=False)
    assert top.converged
    np.testing.assert_allclose(top.sigma, dense.S[:10], rtol=1e-5)
    # Same singular vectors up to sign; the residual stop holds on what is returned.
    align = np.abs(np.sum(top.u * dense.U[:, :10], axis=0))
    assert align.min() > 1 - 1e-6
    res = np.linalg.norm((w.astype(np.float64) + 0.5 * l_fac @ r_fac) @ top.v - top.u * top.sigma, axis=0)
    assert res.max() <= 1e-4 * top.sigma[0]
    assert top.products < 2 * 40  # far fewer than a dense SVD's work


def test_solver_small_and_degenerate_inputs() -> None:
    # k beyond min(m, n), a rank-2 matrix and the zero matrix: padded zero triplets, no error.
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((12, 2)) @ rng.standard_normal((2, 7))).astype(np.float32)
    top = top_singular(LowRankPlus(w), 10)
    assert top.sigma.shape == (7,)
    np.testing.assert_allclose(top.sigma[:2], np.linalg.svd(w.astype(np.float64))[1][:2], rtol=1e-5)
    assert np.all(top.sigma[2:] < 1e-5 * top.sigma[0])
    zero = top_singular(LowRankPlus(np.zeros((5, 4), np.float32)), 3)
    assert np.all(zero.sigma == 0)


def test_injected_direction_orthogonal_to_w_spectrum_is_found() -> None:
    w, u0, v0 = _base()
    rng = np.random.default_rng(3)
    a_dir, b_dir = _bulk_direction(rng, v0), _bulk_direction(rng, u0)
    l_fac = np.stack([40.0 * b_dir, 0.01 * rng.standard_normal(M)], axis=1)
    r_fac = np.stack([a_dir, 0.01 * rng.standard_normal(N)])
    expected, cos, sigma = _dense_reference(w, l_fac, r_fac, 1.0)
    assert expected == [0]  # the reference agrees that it is an intruder (σ 40 > every spike)
    found = _detect(w, l_fac, r_fac, 1.0)
    assert found.indices == expected
    np.testing.assert_allclose(found.sigma, sigma, rtol=1e-5)
    np.testing.assert_allclose(found.cos, cos, atol=1e-4)   # decided on the dense path: exact cosines
    assert found.decided_by == "dense"                      # the mass bound cannot certify a bulk direction


def test_update_inside_the_top_subspace_is_not_an_intruder_and_the_partial_svd_decides() -> None:
    w, u0, v0 = _base()
    rng = np.random.default_rng(4)
    mix = np.linalg.qr(rng.standard_normal((SPIKES, 4)))[0]
    l_fac = u0[:, :SPIKES] @ mix * 10.0
    r_fac = (v0[:, :SPIKES] @ np.linalg.qr(rng.standard_normal((SPIKES, 4)))[0]).T
    expected, cos, _ = _dense_reference(w, l_fac, r_fac, 1.0)
    assert expected == []
    found = _detect(w, l_fac, r_fac, 1.0)
    assert found.indices == [] and found.decided_by == "partial"
    # cos over the partial SVD is a lower bound of the dense best |cos|, the reported upper bound is above it.
    assert np.all(np.asarray(found.cos) <= cos + 1e-6) and np.all(np.asarray(found.cos_upper) >= cos - 1e-6)


def test_decide_mass_bound_hand_cases() -> None:
    e = np.eye(6)
    base = BaseSpectrum(e[:, :2], np.array([2.0, 1.0]), complete=False)
    inside = e[:, [0]]                                     # cos 1 with base vector 0: not an intruder
    spread = np.full((6, 1), 1 / np.sqrt(6))              # |cos| 0.41 on both, rest √(4/6)=0.82: undecided
    captured = (0.7 * e[:, 0] + 0.7 * e[:, 1] + np.sqrt(0.02) * e[:, 2])[:, None]  # 0.7 < ε? no: ≥ 0.5
    mostly = (0.45 * e[:, 0] + 0.45 * e[:, 1] + np.sqrt(1 - 0.405) * e[:, 2])[:, None]
    u = np.concatenate([inside, spread, captured, mostly], axis=1)
    intruder, decided, best, upper = decide(u, base, 0.5)
    assert decided.tolist() == [True, False, True, False]
    assert intruder.tolist() == [False, False, False, False]
    np.testing.assert_allclose(best, [1.0, 1 / np.sqrt(6), 0.7, 0.45])
    np.testing.assert_allclose(upper[1], np.sqrt(4 / 6))
    # A certified intruder: every |cos| small and the rest's mass below ε².
    small = e[:, :5].sum(axis=1, keepdims=True) / np.sqrt(5)   # |cos| 0.447 on 4 base vectors, rest √0.2
    wide = BaseSpectrum(e[:, :4], np.ones(4), complete=False)
    intruder, decided, _best, upper = decide(small, wide, 0.5)
    assert decided.all() and intruder.all() and upper[0] < 0.5
    # A complete base decides exactly (PEFT's rule).
    intruder, decided, _b, _u = decide(spread, BaseSpectrum(e, np.ones(6), complete=True), 0.5)
    assert decided.all() and intruder.all()


def test_spectra_cache_roundtrip_corrupt_and_bounded(tmp_path: Path) -> None:
    w, _u, _v = _base()
    spec = partial_base(w, 32)
    cache = SpectraCache.at(tmp_path / "c")
    key = tensor_hash(w, "f32", w.shape, False)
    assert cache.get(key, M, 32) is None
    cache.put(key, spec)
    hit = cache.get(key, M, 32)
    assert hit is not None and cache.hits == 1 and not hit.complete
    np.testing.assert_allclose(hit.u, spec.u, atol=1e-6)
    assert cache.get(key, M, 64) is None   # fewer vectors than asked: recomputed
    w2 = w.copy()
    w2[0, 0] += 1.0
    assert tensor_hash(w2, "f32", w.shape, False) != key   # a changed tensor is another key, never stale
    (tmp_path / "c" / f"{key}.npz").write_bytes(b"not a zip")
    assert cache.get(key, M, 32) is None and cache.issues[-1].code == "intruder_cache_corrupt"
    # Size bound: the oldest file goes first.
    small = SpectraCache(tmp_path / "d", max_bytes=int(1.5 * (M * 32 * 4)))
    small.put("a" * 40, spec)
    os.utime(tmp_path / "d" / f"{'a' * 40}.npz", (1, 1))
    small.put("b" * 40, spec)
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == [f"{'b' * 40}.npz"]


def test_cache_trim_leaves_files_it_did_not_write(tmp_path: Path) -> None:
    """A directory given as --intruder-cache may hold the user's own .npz files: over the size bound, only
    files named like this cache's keys are deleted."""
    w, _u, _v = _base()
    spec = partial_base(w, 32)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "results.npz").write_bytes(b"x" * (M * 32 * 8))   # the user's, older and larger than the bound
    os.utime(root / "results.npz", (1, 1))
    small = SpectraCache(root, max_bytes=int(1.5 * (M * 32 * 4)))
    small.put("a" * 40, spec)
    os.utime(root / f"{'a' * 40}.npz", (2, 2))
    small.put("b" * 40, spec)
    assert sorted(p.name for p in root.iterdir()) == [f"{'b' * 40}.npz", "results.npz"]


def test_mitigation_matches_peft_formula_densely() -> None:
    w, _u0, _v0 = _base()
    rng = np.random.default_rng(5)
    r, s, lam = 6, 2.0, 0.75
    a, b = rng.standard_normal((r, N)), rng.standard_normal((M, r)) * 3
    merged = w.astype(np.float64) + s * b @ a
    um, sm, vmt = np.linalg.svd(merged, full_matrices=False)
    idx = [0, 2, 3]
    # PEFT: W_mit = W + ΔW + (λ − 1)·U_I S_I V_Iᵀ; dW = (W_mit − W)/s; rank-r SVD with √S on both sides.
    dw = (merged + (lam - 1) * (um[:, idx] * sm[idx]) @ vmt[idx] - w.astype(np.float64)) / s
    ud, sd, vdt = np.linalg.svd(dw, full_matrices=False)
    expected = (ud[:, :r] * sd[:r]) @ vdt[:r]
    out = scale_components(a, b, s, um[:, idx], sm[idx], vmt[idx].T, lam)
    np.testing.assert_allclose(out.b @ out.a, expected, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(out.energy_retained, np.sum(sd[:r] ** 2) / np.sum(sd ** 2), rtol=1e-9)
    np.testing.assert_allclose(out.rel_change, np.linalg.norm(expected - b @ a) / np.linalg.norm(b @ a), rtol=1e-7)
    # λ = 1 changes nothing.
    same = scale_components(a, b, s, um[:, idx], sm[idx], vmt[idx].T, 1.0)
    np.testing.assert_allclose(same.b @ same.a, b @ a, atol=1e-9 * np.abs(b @ a).max())
    assert same.rel_change < 1e-6 and same.energy_retained == pytest.approx(1.0)


def test_torch_operator_matches_numpy() -> None:
    pytest.importorskip("torch")
    from gradience.intruders.solver import TorchOperator

    w, _u, _v = _base()
    rng = np.random.default_rng(6)
    l_fac, r_fac = rng.standard_normal((M, 4)), rng.standard_normal((4, N))
    a = top_singular(LowRankPlus(w, l_fac, r_fac, 1.0), 5)
    t = top_singular(TorchOperator(w, l_fac, r_fac, 1.0, device="cpu"), 5)
    np.testing.assert_allclose(a.sigma, t.sigma, rtol=1e-5)


def test_lanczos_bound_is_an_upper_bound_and_certifies_a_spread_direction() -> None:
    from gradience.intruders.lanczos import remaining_cos_bound

    rng = np.random.default_rng(7)
    m = 300
    s = np.sort(rng.uniform(0.5, 3.0, m))[::-1]
    s[:3] = [9.0, 8.0, 7.0]
    w = np.diag(s).astype(np.float32)        # singular vectors are the unit vectors: c_j = |u_j|, known exactly
    base = BaseSpectrum(np.eye(m)[:, :3], s[:3], complete=False)
    spread = rng.standard_normal((m, 4))
    spread /= np.linalg.norm(spread, axis=0)
    peaked = spread.copy()
    peaked[:, 1] = 0.2 * spread[:, 1] + np.eye(m)[:, 150]   # one remaining cosine ≈ 0.98
    peaked /= np.linalg.norm(peaked, axis=0)
    for u in (spread, peaked):
        bound = remaining_cos_bound(LowRankPlus(w), base, u, target=0.0, max_steps=36)
        true = np.abs(u[3:]).max(axis=0)
        assert np.all(bound >= true - 1e-6)
    bound = remaining_cos_bound(LowRankPlus(w), base, spread, target=0.45)
    assert np.all(bound < 0.45)              # a direction spread over the bulk is certified
    assert remaining_cos_bound(LowRankPlus(w), base, peaked[:, [1]], target=0.45)[0] > 0.9


def test_bulk_intruder_of_a_wide_weight_is_certified_by_lanczos_not_a_dense_svd() -> None:
    w, u0, v0 = _base()
    w, u0, v0 = np.ascontiguousarray(w.T), v0, u0     # m ≤ n: W·Wᵀ has no null space
    rng = np.random.default_rng(3)
    l_fac = np.stack([40.0 * _bulk_direction(rng, u0), 0.01 * rng.standard_normal(w.shape[0])], axis=1)
    r_fac = np.stack([_bulk_direction(rng, v0), 0.01 * rng.standard_normal(w.shape[1])])
    expected, cos, _ = _dense_reference(w, l_fac, r_fac, 1.0)
    top = top_singular(LowRankPlus(w, l_fac, r_fac, 1.0), 10)
    found, _ = layer_intruders(top, lambda p: partial_base(w, p), min(w.shape), 10, 0.5, w_op=LowRankPlus(w))
    assert expected == [0] and found.indices == expected and found.decided_by == "lanczos"
    assert found.cos_upper[0] < 0.5 and found.cos_upper[0] >= cos[0] - 1e-6


def test_light_core_intruders_import_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, gradience.intruders, gradience.intruders.mitigate, gradience.intruders.lanczos; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_zero_singular_directions_are_never_intruders() -> None:
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((12, 2)) @ rng.standard_normal((2, 7))).astype(np.float32)
    found = _detect(w, np.zeros((12, 1)), np.zeros((1, 7)), 1.0, k=7)
    assert found.indices == [] and found.decided_by == "dense"
    assert all(s < 1e-4 * found.sigma[0] for s in found.sigma[2:])


def test_bulk_intruder_of_a_tall_weight_is_certified_without_a_dense_svd() -> None:
    # m > n (gate/up as stored): W·Wᵀ has a null space that is not among PEFT's n base vectors; the old path went
    # dense here. The Lanczos bound on the projection onto range(W) decides it, with the dense reference's count.
    w, u0, v0 = _base()
    assert w.shape[0] > w.shape[1]
    rng = np.random.default_rng(3)
    l_fac = np.stack([40.0 * _bulk_direction(rng, u0), 0.01 * rng.standard_normal(M)], axis=1)
    r_fac = np.stack([_bulk_direction(rng, v0), 0.01 * rng.standard_normal(N)])
    expected, cos, _ = _dense_reference(w, l_fac, r_fac, 1.0)
    top = top_singular(LowRankPlus(w, l_fac, r_fac, 1.0), 10)
    found, _ = layer_intruders(top, lambda p: partial_base(w, p), min(w.shape), 10, 0.5, w_op=LowRankPlus(w))
    assert expected == [0] and found.indices == expected and found.decided_by == "lanczos"
    assert cos[0] - 1e-6 <= found.cos_upper[0] < 0.5
    # The direction's mass outside the top-16 is mostly in W's null space (|Pu|² ≈ n/m of it): the leftover-mass
    # bound alone (> 0.5) could not have decided it.
    u = top.u[:, 0]
    assert np.sqrt(1.0 - np.sum((u0[:, :16].T @ u) ** 2)) > 0.5


def test_tall_lanczos_bound_is_an_upper_bound_against_a_null_space_heavy_direction() -> None:
    from gradience.intruders.lanczos import range_projection, remaining_cos_bound

    rng = np.random.default_rng(11)
    m, n = 420, 200
    s = np.sort(rng.uniform(0.5, 3.0, n))[::-1]
    s[:3] = [9.0, 8.0, 7.0]
    w = np.zeros((m, n), np.float32)
    w[np.arange(n), np.arange(n)] = s          # left singular vectors e_1 … e_n; e_{n+1} … e_m span the null space
    base = BaseSpectrum(np.eye(m)[:, :3], s[:3], complete=False)
    null_heavy = rng.standard_normal((m, 3))
    null_heavy[:n] *= 0.2                      # ~97 % of the mass in the null space
    null_heavy /= np.linalg.norm(null_heavy, axis=0)
    null_heavy[:, 2] = 0.6 * null_heavy[:, 2] + 0.8 * np.eye(m)[:, 120]   # one remaining base cosine ≈ 0.8
    null_heavy /= np.linalg.norm(null_heavy, axis=0)
    proj = range_projection(LowRankPlus(w), null_heavy, 9.0)
    assert proj is not None
    np.testing.assert_allclose(proj[n:], 0.0, atol=1e-12)
    np.testing.assert_allclose(proj[:n], null_heavy[:n], atol=1e-10)
    bound = remaining_cos_bound(LowRankPlus(w), base, null_heavy, target=0.0, max_steps=36)
    true = np.abs(null_heavy[3:n]).max(axis=0)
    assert np.all(bound >= true - 1e-6)
    assert np.all(remaining_cos_bound(LowRankPlus(w), base, null_heavy[:, :2], target=0.45) < 0.45)
    assert remaining_cos_bound(LowRankPlus(w), base, null_heavy[:, [2]], target=0.45)[0] > 0.75
    # A rank-deficient tall W has no safe projection (PEFT's U₀ holds arbitrary null vectors): no certificate.
    w[n - 1, n - 1] = 0.0
    assert range_projection(LowRankPlus(w), null_heavy, 9.0) is None


def test_range_projection_torch_path_matches_numpy() -> None:
    torch = pytest.importorskip("torch")
    from gradience.intruders.lanczos import _range_projection_torch, range_projection

    rng = np.random.default_rng(12)
    w = rng.standard_normal((300, 120)).astype(np.float32)
    x = rng.standard_normal((300, 3))
    ref = w.astype(np.float64) @ np.linalg.lstsq(w.astype(np.float64), x, rcond=None)[0]  # P·x, dense
    got = range_projection(LowRankPlus(w), x, 30.0)
    assert got is not None
    np.testing.assert_allclose(got, ref, atol=1e-10)
    via_torch = _range_projection_torch(torch.from_numpy(w), x, 30.0)
    assert via_torch is not None
    np.testing.assert_allclose(via_torch, ref, atol=1e-10)
    w[:, -1] = w[:, 0]                          # rank deficient: no certificate on either path
    assert _range_projection_torch(torch.from_numpy(w), x, 30.0) is None
    assert range_projection(LowRankPlus(w), x, 30.0) is None


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2752, 1024), (1024, 2752)])
def test_7b_like_layers_at_quarter_scale_match_dense_without_the_dense_path(shape: tuple[int, int]) -> None:
    # make_base.py's outlier spectrum (i.i.d. 0.02 bulk + 4 directions 1.1–1.4× the bulk edge) and a trained-like
    # r=16 update (make_adapters.trained_pair: B = 0.02·G·diag(e^(−i/τ))·Q, A Gaussian/√n, s = 2), gate/up (tall)
    # and down (wide) proportions: several intruders, PEFT's dense count, decided by the Lanczos certificate.
    m, n = shape
    rng = np.random.default_rng(0)
    edge = 0.02 * (np.sqrt(m) + np.sqrt(n))
    x, y = np.linalg.qr(rng.standard_normal((m, 4)))[0], np.linalg.qr(rng.standard_normal((n, 4)))[0]
    w = (0.02 * rng.standard_normal((m, n)) + (x * edge * np.array([1.4, 1.3, 1.2, 1.1])) @ y.T).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    l_fac = (0.02 * rng.standard_normal((m, 16)) * np.exp(-np.arange(16) / 6.0)) @ q
    r_fac = rng.standard_normal((16, n)) / np.sqrt(n)
    expected, _cos, _ = _dense_reference(w, l_fac, r_fac, 2.0)
    top = top_singular(LowRankPlus(w, l_fac, r_fac, 2.0), 10, start=l_fac)
    found, _ = layer_intruders(top, lambda p: partial_base(w, p), min(w.shape), 10, 0.5, w_op=LowRankPlus(w))
    assert len(expected) >= 2
    assert found.indices == expected and found.decided_by == "lanczos"
