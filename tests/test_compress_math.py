"""compress math without torch: truncated factors vs a dense numpy SVD, policy definitions on hand-computed
spectra, the budget allocation vs brute force, the bf16 encoder and the streaming writer."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from gradience.audit.spectrum import factor_grams
from gradience.compress.budget import BudgetLayer, allocate, parse_budget, retained
from gradience.compress.factors import rescaled_factors, truncated_factors
from gradience.compress.policy import Policy, apply_modifiers, budget_candidates, raw_rank, validate
from gradience.errors import InputError
from gradience.io.safetensors import SafetensorsFile
from gradience.io.safetensors_write import TensorSpec, encode_float, f32_to_bf16_bits, write_safetensors


def _factors(rng: np.random.Generator, d_out: int, d_in: int, r: int, decay: float = 0.5,
             rank_deficient: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (r, d_in), B (d_out, r) float32 with singular values decaying like decay**i (and some zero columns)."""
    a = rng.standard_normal((r, d_in)).astype(np.float32)
    scales = (decay ** np.arange(r)).astype(np.float32)
    b = (rng.standard_normal((d_out, r)) * scales).astype(np.float32)
    if rank_deficient:
        b[:, -rank_deficient:] = 0.0
    return a, b


def _dense_truncated(a: np.ndarray, b: np.ndarray, s: float, k: int) -> np.ndarray:
    dw = s * (b.astype(np.float64) @ a.astype(np.float64))
    u, sig, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * sig[:k]) @ vt[:k]


CASES = [
    ("well conditioned", dict(decay=0.8), "gram"),
    ("steep spectrum", dict(decay=0.05), "qr"),
    ("rank deficient", dict(decay=0.7, rank_deficient=3), "qr"),
]


@pytest.mark.parametrize(("label", "kw", "method"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_truncated_factors_match_dense_svd(label: str, kw: dict, method: str, k: int) -> None:
    rng = np.random.default_rng(7)
    a, b = _factors(rng, 40, 24, 8, **kw)
    s, alpha = 2.5, 16.0
    coef = s * k / alpha
    a_new, b_new, used = truncated_factors(a, b, k, coef, factor_grams(a, b))
    assert a_new.shape == (k, 24) and b_new.shape == (40, k)
    got = (alpha / k) * (b_new @ a_new)
    want = _dense_truncated(a, b, s, k)
    assert np.linalg.norm(got - want) <= 1e-9 * np.linalg.norm(want)
    assert used == method or (label == "steep spectrum" and k == 1)
    # balanced: B' and A' carry the same singular values (U Σ^½, Σ^½ Vᵀ)
    nb, na = np.linalg.norm(b_new, axis=0), np.linalg.norm(a_new, axis=1)
    assert np.allclose(nb, na, rtol=1e-7, atol=1e-12)


def test_qr_path_without_grams_and_negative_scale() -> None:
    rng = np.random.default_rng(1)
    a, b = _factors(rng, 30, 50, 6)
    s, alpha, k = -1.5, 8.0, 4
    a_new, b_new, used = truncated_factors(a, b, k, s * k / alpha, None)
    assert used == "qr"
    got = (alpha / k) * (b_new @ a_new)
    want = _dense_truncated(a, b, s, k)
    assert np.linalg.norm(got - want) <= 1e-9 * np.linalg.norm(want)


def test_rank_above_numerical_rank_pads_with_zero_directions() -> None:
    rng = np.random.default_rng(2)
    a, b = _factors(rng, 20, 20, 6, rank_deficient=4)  # rank 2
    a_new, b_new, _ = truncated_factors(a, b, 4, 1.0, factor_grams(a, b))
    assert np.linalg.norm(b_new @ a_new - b.astype(np.float64) @ a) <= 1e-9 * np.linalg.norm(b @ a)


def test_rescaled_factors_pad_and_keep_delta() -> None:
    rng = np.random.default_rng(3)
    a, b = _factors(rng, 12, 10, 3)
    s, alpha, k = 0.7, 4.0, 5
    a_new, b_new = rescaled_factors(a, b, k, s * k / alpha)
    assert a_new.shape == (5, 10) and not a_new[3:].any() and not b_new[:, 3:].any()
    np.testing.assert_allclose((alpha / k) * b_new @ a_new, s * b.astype(np.float64) @ a, rtol=1e-12, atol=1e-12)


# -- policies ----------------------------------------------------------------------------------------------
SIG = np.array([4.0, 2.0, 1.0, 1.0])  # σ² = 16, 4, 1, 1 (total 22); Σσ = 8


@pytest.mark.parametrize(("name", "value", "k"), [
    ("rank", 3, 3),
    ("energy", 16 / 22, 1), ("energy", 0.8, 2), ("energy", 21 / 22, 3), ("energy", 1.0, 4),
    ("sv_fro", math.sqrt(20 / 22), 2), ("sv_fro", 0.95, 2), ("sv_fro", 0.96, 3),  # ‖ΔW_k‖_F ≥ T‖ΔW‖_F ⇔ Σσ² ≥ T²·22
    ("sv_cumulative", 0.5, 1), ("sv_cumulative", 0.75, 2), ("sv_cumulative", 0.76, 3),
    ("sv_ratio", 2.0, 2), ("sv_ratio", 4.0, 4), ("sv_ratio", 3.9, 2),
])
def test_policy_definitions(name: str, value: float, k: int) -> None:
    policy = Policy(name=name, value=value)
    validate(policy)
    assert raw_rank(policy, SIG, 4) == k


@pytest.mark.parametrize(("policy", "msg"), [
    (Policy("energy", 1.5), "fraction"), (Policy("energy", 0.0), "fraction"), (Policy("rank", 0), ">= 1"),
    (Policy("sv_ratio", 0.5), ">= 1"), (Policy("rank", 2, min_rank=4, max_rank=2), "above"),
    (Policy("per_layer", margin=-1.0), "margin"),
])
def test_policy_usage_errors(policy: Policy, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        validate(policy)


def test_modifiers_order() -> None:
    p = Policy("rank", 3, min_rank=2, max_rank=12)
    assert apply_modifiers(3, 16, p, round_to=(4, 8, 16)) == 4      # rounded up
    assert apply_modifiers(9, 16, p, round_to=(4, 8, 16)) == 12     # max-rank wins over rounding
    assert apply_modifiers(1, 16, p, round_to=None) == 2            # min-rank
    assert apply_modifiers(3, 2, p, round_to=None) == 2             # never above r
    assert apply_modifiers(0, 8, Policy("energy", 0.9), round_to=None) == 1  # zero update: one direction


# -- budget ------------------------------------------------------------------------------------------------
def _brute_force(layers: list[BudgetLayer], budget: int) -> float:
    best = -1.0
    for ranks in itertools.product(*(layer.candidates for layer in layers)):
        if sum(k * layer.cost for k, layer in zip(ranks, layers, strict=True)) <= budget:
            best = max(best, sum(retained(layer.sigma, k) for k, layer in zip(ranks, layers, strict=True)))
    return best


def _random_layers(rng: np.random.Generator, n: int, equal_cost: bool, r: int = 5) -> list[BudgetLayer]:
    out = []
    for _ in range(n):
        sigma = np.sort(rng.gamma(1.0, size=r) ** rng.uniform(1, 4))[::-1]
        cost = 10 if equal_cost else int(rng.integers(5, 40))
        out.append(BudgetLayer(sigma=sigma, cost=cost, candidates=tuple(range(1, r + 1))))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_budget_greedy_is_optimal_with_equal_step_costs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = _random_layers(rng, 4, equal_cost=True)
    budget = int(rng.integers(40, 200))
    res = allocate(layers, budget)
    assert res.params <= budget
    assert res.objective == pytest.approx(_brute_force(layers, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_budget_greedy_bounds_with_unequal_costs(seed: int) -> None:
    """Different step costs per layer make it a knapsack: greedy never exceeds the budget, is optimal for the
    parameters of its prefix, and is within one step's gain of the optimum (the reported LP bound holds)."""
    rng = np.random.default_rng(100 + seed)
    layers = _random_layers(rng, 4, equal_cost=False)
    floor = sum(layer.cost for layer in layers)
    budget = int(rng.integers(floor, floor * 5))
    res = allocate(layers, budget)
    assert res.params <= budget
    opt = _brute_force(layers, budget)
    assert res.objective <= opt + 1e-12 <= res.upper_bound + 2e-12
    assert res.objective >= _brute_force(layers, res.prefix_params) - 1e-12
    max_step = max(retained(la.sigma, k + 1) - retained(la.sigma, k) for la in layers for k in range(1, 5))
    assert opt - res.objective <= max_step + 1e-12


def test_budget_with_allowed_ranks_and_errors() -> None:
    p = Policy("budget", "50%", allowed_ranks=(2, 4, 8))
    assert budget_candidates(8, p) == (2, 4, 8)
    assert budget_candidates(6, Policy("budget", "1", min_rank=3, allowed_ranks=(2, 4, 8))) == (4, 6)
    layers = [BudgetLayer(sigma=np.array([3.0, 2, 1, 0.5]), cost=10, candidates=(1, 2, 3, 4))] * 2
    with pytest.raises(InputError, match="below the minimum"):
        allocate(layers, 19)
    assert parse_budget("25%", 1000) == 250 and parse_budget("123", 1000) == 123
    for bad in ("abc", "0", "150%", "-3"):
        with pytest.raises(InputError, match="--budget"):
            parse_budget(bad, 1000)


# -- encoding and writing ----------------------------------------------------------------------------------
def test_bf16_round_to_nearest_even() -> None:
    # 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to even (1.0); just above rounds up.
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 2**-8 + 2**-20, 1.0 + 3 * 2**-8, -2.5, np.inf, np.nan], dtype=np.float32)
    bits = f32_to_bf16_bits(x)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert back[0] == 1.0 and back[1] == 1.0 and back[2] == np.float32(1 + 2**-7)
    assert back[3] == np.float32(1 + 4 * 2**-8)  # tie between 1+2·2^-8 (odd) and 1+4·2^-8 (even)
    assert back[4] == -2.5 and np.isinf(back[5]) and np.isnan(back[6])
    with pytest.raises(ValueError, match="range"):
        encode_float(np.array([1e39], dtype=np.float64), "BF16")
    with pytest.raises(ValueError, match="range"):
        encode_float(np.array([70000.0]), "F16")


def test_streaming_writer_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    bf = rng.standard_normal((4,)).astype(np.float32)
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    specs = [TensorSpec("a", "F32", (3, 5), lambda: f32), TensorSpec("b", "BF16", (4,), lambda: encode_float(bf, "BF16")),
             TensorSpec("c", "I64", (2, 3), lambda: ints), TensorSpec("empty", "F32", (0, 4), lambda: np.zeros((0, 4), np.float32))]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, specs, {"source": "abc"})
    sf = SafetensorsFile(path)
    assert sf.metadata == {"source": "abc"}
    np.testing.assert_array_equal(sf.read("a"), f32)
    np.testing.assert_array_equal(sf.read("b"), (f32_to_bf16_bits(bf).astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(sf.read("c"), ints)
    assert sf.read("empty").shape == (0, 4)
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "bad.safetensors", [TensorSpec("a", "F32", (2,), lambda: f32)])
