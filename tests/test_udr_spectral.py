"""σ₁ by block Lanczos against dense float64 SVD on matrices with chosen spectra (flat, spiked, clustered)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.udr.spectral import frobenius_norm, largest_gram_eigen, spectral_norm

RTOL = 1e-4


def with_spectrum(rng: np.random.Generator, d_out: int, d_in: int, s: np.ndarray) -> np.ndarray:
    """W = U diag(s) Vᵀ with random orthonormal U, V, so the singular values are exactly ``s``."""
    u, _ = np.linalg.qr(rng.standard_normal((d_out, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, len(s))))
    return ((u * s) @ v.T).astype(np.float32)


def dense_sigma(w: np.ndarray) -> float:
    return float(np.linalg.svd(w.astype(np.float64), compute_uv=False)[0])


def spectra(k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        # a perfectly flat top: every singular value equal (a "change < tol" rule is trivially right here)
        "flat_exact": np.ones(k),
        # nearly flat: tiny random spread, the classic trap for power iteration
        "flat_noisy": 2.0 + rng.uniform(0.0, 1e-3, k),
        # one dominant direction
        "spiked": np.r_[10.0, np.linspace(1.0, 0.1, k - 1)],
        # a cluster of 6 almost-equal top values above a decaying bulk
        "clustered": np.r_[3.0 + 1e-4 * np.arange(6), np.linspace(2.9, 0.01, k - 6)],
        # slow geometric decay (gap ratio 0.999)
        "slow_decay": 0.999 ** np.arange(k),
        # a few near-ties then a gap
        "near_ties": np.r_[1.0, 0.99995, 0.9999, np.linspace(0.95, 0.0, k - 3)],
    }


@pytest.mark.parametrize("shape", [(160, 240), (240, 160), (200, 200)])
def test_sigma_matches_dense_svd_on_constructed_spectra(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    d_out, d_in = shape
    for name, s in spectra(min(shape), rng).items():
        w = with_spectrum(rng, d_out, d_in, s)
        result = spectral_norm(w)
        ref = dense_sigma(w)
        assert result.converged, name
        assert abs(result.sigma_max - ref) / ref <= RTOL, (name, result, ref)
        assert result.iterations >= 1 and result.products >= result.iterations


def test_gaussian_matrix_marchenko_pastur_edge() -> None:
    # Random weights have a flat, densely packed top spectrum: the hard case for iterative methods.
    rng = np.random.default_rng(3)
    for shape in [(300, 700), (700, 300)]:
        w = rng.standard_normal(shape).astype(np.float32)
        result = spectral_norm(w)
        ref = dense_sigma(w)
        assert abs(result.sigma_max - ref) / ref <= RTOL
        assert result.rel_error_bound <= RTOL


def test_block_size_one_and_large_blocks_agree() -> None:
    rng = np.random.default_rng(11)
    w = with_spectrum(rng, 120, 90, np.r_[5.0, 4.9995, np.linspace(4.0, 0.1, 88)])
    ref = dense_sigma(w)
    for block in (1, 3, 8, 16):
        assert abs(spectral_norm(w, block=block).sigma_max - ref) / ref <= RTOL


def test_degenerate_inputs() -> None:
    assert spectral_norm(np.zeros((50, 40), np.float32)).sigma_max == 0.0
    assert spectral_norm(np.zeros((0, 5), np.float32)).sigma_max == 0.0
    one = np.array([[-3.0]], np.float32)
    assert spectral_norm(one).sigma_max == pytest.approx(3.0)
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.standard_normal(64), rng.standard_normal(48)).astype(np.float32)
    assert spectral_norm(rank1).sigma_max == pytest.approx(dense_sigma(rank1), rel=RTOL)
    row = rng.standard_normal((1, 500)).astype(np.float32)  # a vector: σ₁ is its Euclidean norm
    assert spectral_norm(row).sigma_max == pytest.approx(float(np.linalg.norm(row.astype(np.float64))), rel=RTOL)
    with pytest.raises(ValueError):
        spectral_norm(np.zeros((2, 2, 2), np.float32))


def test_float64_and_float16_inputs_are_handled_in_float32() -> None:
    rng = np.random.default_rng(5)
    w = with_spectrum(rng, 80, 60, np.linspace(2.0, 0.5, 60))
    ref = dense_sigma(w)
    assert spectral_norm(w.astype(np.float64)).sigma_max == pytest.approx(ref, rel=RTOL)
    w16 = w.astype(np.float16)
    assert spectral_norm(w16).sigma_max == pytest.approx(dense_sigma(w16.astype(np.float32)), rel=RTOL)


def test_operator_form_reports_iterations_and_stops_on_residual() -> None:
    # A diagonal Gram operator with a flat top: eigenvalues 1, 1-1e-6, ... A "value stopped changing" rule
    # would stop after the first steps; the residual rule must still land within rtol of the true σ₁ = 1.
    lam = np.r_[1.0, 1.0 - 1e-6 * np.arange(1, 50), np.linspace(0.9, 0.0, 450)]

    def gram(x: np.ndarray) -> np.ndarray:
        return lam[:, None] * x

    result = largest_gram_eigen(gram, lam.size, block=2)
    assert result.converged
    assert abs(result.sigma_max - 1.0) <= RTOL
    assert result.iterations > 1


def test_frobenius_norm_is_exact_in_float64() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1000, 517)).astype(np.float32)
    assert frobenius_norm(w) == pytest.approx(float(np.linalg.norm(w.astype(np.float64))), rel=1e-12)
    assert frobenius_norm(np.zeros((0, 3), np.float32)) == 0.0
    big = np.full((3, 3), 1e30, np.float32)  # float32 squares would overflow
    assert frobenius_norm(big) == pytest.approx(3e30, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 60), d_in=st.integers(1, 60), seed=st.integers(0, 2**16),
    decay=st.floats(0.5, 1.0),
)
def test_property_random_shapes_and_decays(d_out: int, d_in: int, seed: int, decay: float) -> None:
    rng = np.random.default_rng(seed)
    k = min(d_out, d_in)
    w = with_spectrum(rng, d_out, d_in, decay ** np.arange(k) * rng.uniform(0.1, 10.0))
    ref = dense_sigma(w)
    assert abs(spectral_norm(w).sigma_max - ref) <= RTOL * ref + 1e-12


@pytest.mark.parametrize("spread", [3e-4, 1e-3, 3e-3])
@pytest.mark.parametrize("cluster", [2, 6, 10])
def test_clusters_of_near_equal_top_values(spread: float, cluster: int) -> None:
    # The regime where single-vector Lanczos settles inside the cluster with a small residual and misses σ₁ by
    # up to the cluster's width (measured: up to 2e-3). The block method must stay within rtol.
    rng = np.random.default_rng(int(spread * 1e5) + cluster)
    top = 1.0 - spread * np.sort(rng.uniform(0.0, 1.0, cluster))
    top[0] = 1.0
    s = np.r_[top, np.linspace(0.94, 0.01, 200 - cluster)]
    w = with_spectrum(rng, 200, 320, s)
    result = spectral_norm(w)
    assert abs(result.sigma_max - 1.0) <= RTOL
    assert abs(result.sigma_max - dense_sigma(w)) / dense_sigma(w) <= RTOL
