"""The audit's spectra on the hard cases its fast path used to hand to Householder QR: steep (σ_r/σ₁ down to
1e-14, graded or in a rotated basis), rank-deficient, and factors at the edge of float64's range. Every σ is
checked against a dense float64 SVD of B·A (independent computation) to ~1e-12·σ₁ absolute; the synthetic
steep adapters the benchmark uses are checked to really be steep, so a regression cannot hide behind easy data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit import AuditOptions, run_audit
from gradience.audit.render import dumps_json
from gradience.audit.spectrum import (
    factored_svd,
    pair_grams,
    singular_values,
    singular_values_many,
)
from gradience.jsonio import dumps
from support import synthetic

ATOL = 1e-12  # times σ₁


def dense_sigma(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r = a.shape[0]
    s = np.linalg.svd(np.asarray(b, np.float64) @ np.asarray(a, np.float64), compute_uv=False)
    out = np.zeros(r)
    out[: min(r, s.size)] = s[:r]
    return out


def hard_case(rng: np.random.Generator, kind: str, r: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((r, d_in))
    b = rng.standard_normal((d_out, r))
    decay = np.logspace(0, -rng.uniform(4, 14), r)
    if kind == "steep_a":
        a *= decay[:, None]
    elif kind == "steep_b":
        b *= decay[None, :]
    elif kind == "steep_split":
        a *= np.sqrt(decay)[:, None]
        b *= np.sqrt(decay)[None, :]
    elif kind == "steep_rotated":
        m = min(r, d_out)
        u, _ = np.linalg.qr(rng.standard_normal((d_out, m)))
        q, _ = np.linalg.qr(rng.standard_normal((r, r)))
        b = (u * decay[:m]) @ q[:m]
    elif kind == "steep_both_rotated":
        q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
        q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
        a = q1 @ (a * np.sqrt(decay)[:, None])
        b = (b * np.sqrt(decay)[None, :]) @ q2
    elif kind == "rank_deficient":
        k = int(rng.integers(1, r))
        b = rng.standard_normal((d_out, k)) @ rng.standard_normal((k, r))
    elif kind == "duplicate_columns":
        k = int(rng.integers(1, r))
        b[:, k:] = b[:, np.arange(k, r) % k]
    return a.astype(np.float32), b.astype(np.float32)


KINDS = ("steep_a", "steep_b", "steep_split", "steep_rotated", "steep_both_rotated", "rank_deficient",
         "duplicate_columns")


@pytest.mark.parametrize("kind", KINDS)
def test_hard_spectra_match_dense_svd(kind: str) -> None:
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(25):
        r = int(rng.choice([2, 4, 8, 16, 32]))
        a, b = hard_case(rng, kind, r, int(rng.integers(r, 200)), int(rng.integers(r, 200)))
        ref = dense_sigma(a, b)
        got = singular_values(a, b)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL * ref[0])
        assert np.all(np.diff(got) <= 0) and got.min() >= 0


def test_rank_is_exact_on_rank_deficient_factors() -> None:
    rng = np.random.default_rng(3)
    for k in (1, 3, 7):
        a = rng.standard_normal((8, 50)).astype(np.float32)
        b = rng.standard_normal((40, 8)).astype(np.float32)
        b[:, k:] = b[:, np.arange(k, 8) % k]  # duplicated columns: rank(B·A) = k exactly
        s = singular_values(a, b)
        assert np.count_nonzero(s > 1e-10 * s[0]) == k
        np.testing.assert_allclose(s, dense_sigma(a, b), rtol=0, atol=ATOL * s[0])


def test_thin_shapes_smaller_than_the_rank() -> None:
    rng = np.random.default_rng(11)
    for d_in, d_out in ((3, 40), (40, 2), (1, 1), (5, 5)):
        a = rng.standard_normal((8, d_in)).astype(np.float32)
        b = rng.standard_normal((d_out, 8)).astype(np.float32)
        ref = dense_sigma(a, b)
        np.testing.assert_allclose(singular_values(a, b), ref, rtol=0, atol=ATOL * ref[0])


def test_batched_many_equals_one_by_one_and_rereads_only_hard_pairs() -> None:
    rng = np.random.default_rng(5)
    factors = [hard_case(rng, KINDS[i % len(KINDS)] if i % 2 else "plain", 8, 60, 70) for i in range(20)]
    reads: list[int] = []

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        reads.append(i)
        return factors[i]

    sigmas, n_refined = singular_values_many([pair_grams(a, b) for a, b in factors], load)
    assert n_refined == len(set(reads)) == len(reads) and 0 < n_refined <= 10
    assert all(i % 2 for i in reads)  # the plain (well-conditioned) pairs are never read twice
    for (a, b), s in zip(factors, sigmas, strict=True):
        ref = dense_sigma(a, b)
        np.testing.assert_allclose(s, ref, rtol=0, atol=ATOL * ref[0])


def test_factored_svd_contract_on_steep_factors() -> None:
    rng = np.random.default_rng(2)
    a, b = hard_case(rng, "steep_rotated", 8, 30, 25)
    svd = factored_svd(a, b)
    dense = b.astype(np.float64) @ a.astype(np.float64)
    assert svd.u.shape == (25, 8) and svd.vt.shape == (8, 30) and svd.sigma.dtype == np.float64
    np.testing.assert_allclose((svd.u * svd.sigma) @ svd.vt, dense, rtol=0, atol=1e-13 * svd.sigma[0])
    np.testing.assert_allclose(svd.sigma, singular_values(a, b), rtol=0, atol=ATOL * svd.sigma[0])


@pytest.mark.parametrize("exp_a,exp_b", [(200, 0), (0, -200), (180, -180), (-170, 0), (150, 150)])
def test_factors_beyond_float64_gram_range_are_computed_at_a_safe_scale(exp_a: int, exp_b: int) -> None:
    rng = np.random.default_rng(abs(exp_a - exp_b))
    a0 = rng.standard_normal((4, 20))
    b0 = rng.standard_normal((15, 4))
    a, b = a0 * 10.0 ** exp_a, b0 * 10.0 ** exp_b  # float64 factors: a Gram of 1e±400 over/underflows
    s = singular_values(a, b)
    ref = dense_sigma(a0, b0)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s / 10.0 ** (exp_a + exp_b), ref, rtol=1e-12, atol=ATOL * ref[0])


def test_huge_float64_factors_are_audited_not_non_finite() -> None:
    # float64 factors (an in-memory pair, e.g. from compress/compare or a float64 state dict) at 1e200 / 1e-190
    from gradience.adapter.model import LoadedAdapter, LoraPair, NonLoraTensors

    rng = np.random.default_rng(0)
    a0, b0 = rng.standard_normal((4, 10)), rng.standard_normal((12, 4))
    a, b = a0 * 1e200, b0 * 1e-190
    name = "model.layers.0.self_attn.q_proj"
    pair = LoraPair(name=name, peft_prefix="base_model.model." + name, kind="linear", dora=False, r=4, alpha=4.0,
                    scale=1.0, a_key=name + ".lora_A.weight", b_key=name + ".lora_B.weight", a_shape=a.shape,
                    b_shape=b.shape, d_in=10, d_out=12, loader=lambda: (a, b))
    loaded = LoadedAdapter(peft_dir=None, adapter_config_path=None, adapter_weights_path=None, config={},
                           pairs=[pair], non_lora=NonLoraTensors(), issues=[])
    result = run_audit(loaded)
    row = result.to_summary()["layers"][0]
    assert row["status"] == "ok" and not any(i.code == "non_finite_weights" for i in result.issues)
    assert row["sigma_max"] == pytest.approx(1e10 * dense_sigma(a0, b0)[0], rel=1e-12)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_synthetic_steep_adapter_is_steep_and_audited_exactly(tmp_path: Path, dtype: str) -> None:
    targets = synthetic.llama_targets(48, 96)
    d = synthetic.write_synthetic_adapter(tmp_path / dtype, layers=4, targets=targets, r=8, alpha=16, dtype=dtype,
                                          spectrum="steep")
    loaded = load_adapter(str(d))
    rows = run_audit(loaded, AuditOptions()).layers
    n_deficient = n_steep = 0
    for pair, row in zip(loaded.pairs, rows, strict=True):
        a, b = pair.load_factors()
        ref = dense_sigma(a, b)
        assert row.singular_values is not None
        np.testing.assert_allclose(row.singular_values, ref, rtol=0, atol=ATOL * ref[0])
        if ref[-1] <= 1e-12 * ref[0]:
            n_deficient += 1
        elif ref[-1] < 1e-4 * ref[0]:
            n_steep += 1
    # the generator's promise (what keeps the benchmark honest): every pair steep or rank-deficient ...
    if dtype == "F32":
        assert n_deficient + n_steep == len(rows)
    assert n_deficient >= len(rows) // synthetic.RANK_DEFICIENT_EVERY
    assert n_steep >= len(rows) // 2  # bf16 keeps the graded decays; the rotated ones are rounded away


def test_make_adapters_lists_steep_twins_of_the_flat_benchmarks() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_adapters

    steep = [n for n in make_adapters.ADAPTERS if make_adapters.spectrum_of(n) == "steep"]
    assert {"llama7b_r16_steep_f32", "llama7b_r64_steep_f32", "llama70b_r16_steep_f32"} <= set(steep)
    assert all(make_adapters.flat_twin(n) in make_adapters.ADAPTERS for n in steep)
    assert make_adapters.recipe("llama7b_r16_steep_f32")["spectrum"] == "steep"


def test_trained_like_spectra_take_the_refinement_path_and_stay_exact() -> None:
    """The benchmark's trained-like generator (issue 17 item 7: B = 0.02·G·diag(e^(−i/τ))·Q) on small shapes:
    about half the pairs need the refinement (τ small: steep in a rotated basis), and every σ, including those
    many decades down, matches a dense float64 SVD; the deeper refinement levels keep the top level's bound."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_adapters

    rng = np.random.default_rng(17)
    r = 16
    pairs = []
    taus = []
    for i in range(24):
        d_in, d_out = (96, 160) if i % 2 else (160, 96)
        a, b, tau = make_adapters.trained_pair(rng, d_out, d_in, r)
        pairs.append((a, b))
        taus.append(tau)
    assert min(taus) >= 0.4 and max(taus) <= r / 1.5
    sigmas, n_refined = singular_values_many([pair_grams(a, b) for a, b in pairs], lambda i: pairs[i])
    assert 4 <= n_refined <= 20
    for (a, b), s in zip(pairs, sigmas, strict=True):
        ref = dense_sigma(a, b)
        np.testing.assert_allclose(s, ref, rtol=0, atol=ATOL * ref[0])


def test_json_fast_path_is_the_same_document(synthetic_adapter_dir: Path) -> None:
    result = run_audit(load_adapter(str(synthetic_adapter_dir)), AuditOptions(top_wasteful=3))
    summary = result.to_summary()
    text = dumps_json(summary)
    assert json.loads(text) == json.loads(dumps(summary))
    lines = text.splitlines()
    first = lines.index('  "layers": [') + 1
    assert json.loads(lines[first].rstrip(","))["name"] == summary["layers"][0]["name"]  # one row per line
    multi = {"schema": "gradience.audit.multi/v1", "adapters": {"a": summary, "b": summary}}
    assert json.loads(dumps_json(multi)) == json.loads(dumps(multi))
