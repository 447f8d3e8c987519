"""Audit math checked against an independent dense SVD of s·B·A, and against hand-computed spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradience.adapter.model import LoadedAdapter, LoraPair, NonLoraTensors
from gradience.audit import AuditOptions, run_audit
from gradience.audit.spectrum import (
    effective_rank,
    energy_rank,
    singular_values,
    singular_values_qr,
    spectrum_metrics,
)

TOL = 1e-8


def make_pair(name: str, a: np.ndarray, b: np.ndarray, *, scale: float = 2.0, alpha: float | None = None,
              kind: str = "linear") -> LoraPair:
    r = a.shape[0]
    return LoraPair(
        name=name, peft_prefix="base_model.model." + name, kind=kind, dora=False, r=r,  # type: ignore[arg-type]
        alpha=alpha if alpha is not None else scale * r, scale=scale,
        a_key=f"base_model.model.{name}.lora_A.weight", b_key=f"base_model.model.{name}.lora_B.weight",
        a_shape=a.shape, b_shape=b.shape, d_in=a.shape[1], d_out=b.shape[0], loader=lambda: (a, b),
    )


def adapter_of(pairs: list[LoraPair], config: dict | None = None) -> LoadedAdapter:
    return LoadedAdapter(peft_dir=None, adapter_config_path=None, adapter_weights_path=None,
                         config=config or {}, pairs=pairs, non_lora=NonLoraTensors(), issues=[])


# ---- independent reference: dense SVD of s·B·A ------------------------------------------------------
def reference(a: np.ndarray, b: np.ndarray, scale: float) -> dict:
    r = a.shape[0]
    dense = scale * (b.astype(np.float64) @ a.astype(np.float64))
    s_all = np.linalg.svd(dense, compute_uv=False)
    s = np.zeros(r)
    s[: min(r, s_all.size)] = s_all[:r]
    s_unscaled = s / abs(scale)
    fro = float(np.linalg.norm(dense / abs(scale)))
    out: dict = {"sigma": s_unscaled, "frob_norm": fro, "sigma_max": float(s_unscaled[0]),
                 "delta_frob_norm": float(np.linalg.norm(dense)), "delta_sigma_max": float(s[0])}
    if s[0] == 0:
        out.update(stable_rank=0.0, utilization=0.0, effective_rank=0.0, k90=0, k95=0, k99=0)
        return out
    out["stable_rank"] = fro ** 2 / s_unscaled[0] ** 2
    out["utilization"] = out["stable_rank"] / r
    p = s[s > 1e-14 * s[0]] / s.sum()
    out["effective_rank"] = math.exp(-sum(x * math.log(x) for x in p))
    e = np.cumsum(s ** 2) / np.sum(s ** 2)
    for key, level in (("k90", 0.90), ("k95", 0.95), ("k99", 0.99)):
        out[key] = next(i + 1 for i, v in enumerate(e) if v >= level - 1e-12)
    return out


def structured_cases() -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(42)
    cases = []
    for r, d_in, d_out in ((1, 7, 5), (4, 24, 16), (8, 40, 32), (16, 64, 48), (8, 5, 40), (16, 12, 9)):
        a = rng.standard_normal((r, d_in)).astype(np.float32)
        b = rng.standard_normal((d_out, r)).astype(np.float32)
        cases.append((f"random_r{r}_{d_in}x{d_out}", a, b, 2.0))
        # rank-deficient: only 2 directions of B are used
        b_def = b.copy()
        b_def[:, 2:] = 0.0
        cases.append((f"rankdef_r{r}_{d_in}x{d_out}", a, b_def, 0.5))
        # one dominant direction plus tiny noise (steep spectrum: exercises the QR refinement)
        u = rng.standard_normal((d_out, 1)).astype(np.float32)
        b_dom = (u @ rng.standard_normal((1, r)) + 1e-5 * rng.standard_normal((d_out, r))).astype(np.float32)
        cases.append((f"dominant_r{r}_{d_in}x{d_out}", a, b_dom, 1.0))
        # negative scale, decaying spectrum
        decay = np.logspace(0, -3, r).astype(np.float32)
        cases.append((f"negscale_r{r}_{d_in}x{d_out}", a * decay[:, None], b, -3.0))
        # rsLoRA-style scale alpha/sqrt(r)
        cases.append((f"rslora_r{r}_{d_in}x{d_out}", a, b, 16 / math.sqrt(r)))
    # exactly rank-1 product from rank-8 factors whose directions cancel
    a = rng.standard_normal((8, 30)).astype(np.float32)
    b = np.zeros((20, 8), np.float32)
    b[:, 0] = rng.standard_normal(20)
    cases.append(("rank1_exact", a, b, 2.0))
    # a "bf16-stored" factor: values representable in bf16, upcast to float32 as the reader does
    a16 = rng.standard_normal((8, 32)).astype(np.float32)
    a16 = (a16.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    b16 = ((rng.standard_normal((24, 8)).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000))
           .view(np.float32))
    cases.append(("bf16_values", a16, b16, 2.0))
    return cases


CASES = structured_cases()


@pytest.mark.parametrize("name,a,b,scale", CASES, ids=[c[0] for c in CASES])
def test_every_metric_matches_dense_svd(name: str, a: np.ndarray, b: np.ndarray, scale: float) -> None:
    ref = reference(a, b, scale)
    result = run_audit(adapter_of([make_pair("model.layers.0.self_attn.q_proj", a, b, scale=scale)]))
    layer = result.layers[0]
    s1 = ref["sigma_max"]
    assert layer.singular_values is not None
    np.testing.assert_allclose(layer.singular_values, ref["sigma"], rtol=0, atol=TOL * s1)
    for key in ("frob_norm", "sigma_max", "delta_frob_norm", "delta_sigma_max", "stable_rank", "utilization",
                "effective_rank"):
        assert getattr(layer, key) == pytest.approx(ref[key], rel=TOL, abs=1e-300), key
    assert (layer.energy_rank_90, layer.energy_rank_95, layer.energy_rank_99) == (ref["k90"], ref["k95"], ref["k99"])
    assert layer.status == "ok"


def test_random_sweep_against_dense_svd() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        r = int(rng.choice([1, 2, 3, 4, 8, 16, 32]))
        d_in, d_out = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        a = rng.standard_normal((r, d_in)).astype(np.float32) * np.logspace(0, -rng.uniform(0, 8), r)[:, None]
        b = rng.standard_normal((d_out, r)).astype(np.float32)
        s = singular_values(a.astype(np.float32), b)
        ref = reference(a.astype(np.float32), b, 1.0)
        np.testing.assert_allclose(s, ref["sigma"], rtol=0, atol=TOL * ref["sigma_max"])
        m = spectrum_metrics(s, r)
        assert m.effective_rank == pytest.approx(ref["effective_rank"], rel=TOL)
        assert (m.energy_rank_90, m.energy_rank_95, m.energy_rank_99) == (ref["k90"], ref["k95"], ref["k99"])


def test_qr_path_agrees_with_gram_path_on_well_conditioned_factors() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    b = rng.standard_normal((48, 8)).astype(np.float32)
    np.testing.assert_allclose(singular_values(a, b), singular_values_qr(a, b), rtol=1e-12)


def test_hand_computed_energy_and_effective_rank() -> None:
    # σ² = (9, 1) -> energy share (0.9, 0.1): exactly 90% at k=1, 95% and 99% need k=2
    sigma = np.array([3.0, 1.0])
    assert energy_rank(sigma, 0.90) == 1
    assert energy_rank(sigma, 0.95) == 2
    assert energy_rank(sigma, 0.99) == 2
    # equal σ: effective rank = number of them; energy ranks ceil(τ·n)
    flat = np.ones(10)
    assert effective_rank(flat) == pytest.approx(10.0)
    assert [energy_rank(flat, t) for t in (0.9, 0.95, 0.99)] == [9, 10, 10]
    # p = (0.5, 0.25, 0.25): H = 1.5 ln 2 -> exp(H) = 2^1.5
    assert effective_rank(np.array([2.0, 1.0, 1.0, 0.0])) == pytest.approx(2 ** 1.5)
    m = spectrum_metrics(np.array([2.0, 1.0, 1.0, 0.0]), 4)
    assert m.stable_rank == pytest.approx(6 / 4)
    assert m.utilization == pytest.approx(6 / 16)
    assert m.frob_norm == pytest.approx(math.sqrt(6))


def test_diagonal_factors_give_known_singular_values() -> None:
    # B·A = diag(5, 3, 0, 0) padded: σ = (5, 3, 0, 0) exactly
    a = np.zeros((4, 6), np.float32)
    a[0, 0], a[1, 1] = 5.0, 1.0
    b = np.zeros((7, 4), np.float32)
    b[0, 0], b[1, 1] = 1.0, 3.0
    np.testing.assert_allclose(singular_values(a, b), [5.0, 3.0, 0.0, 0.0], atol=1e-12)


def test_zero_update_and_non_finite_rows_and_issues() -> None:
    rng = np.random.default_rng(0)
    good = make_pair("model.layers.0.self_attn.q_proj", rng.standard_normal((4, 16)).astype(np.float32),
                     rng.standard_normal((16, 4)).astype(np.float32))
    zero = make_pair("model.layers.0.self_attn.v_proj", rng.standard_normal((4, 16)).astype(np.float32),
                     np.zeros((16, 4), np.float32))
    a_nan = rng.standard_normal((4, 16)).astype(np.float32)
    a_nan[1, 3] = np.nan
    bad = make_pair("model.layers.1.self_attn.q_proj", a_nan, rng.standard_normal((16, 4)).astype(np.float32))
    b_inf = rng.standard_normal((16, 4)).astype(np.float32)
    b_inf[0, 0] = np.inf
    bad2 = make_pair("model.layers.1.self_attn.v_proj", rng.standard_normal((4, 16)).astype(np.float32), b_inf)
    result = run_audit(adapter_of([good, zero, bad, bad2]))
    summary = result.to_summary()
    rows = {row["name"]: row for row in summary["layers"]}
    z = rows["model.layers.0.self_attn.v_proj"]
    assert z["status"] == "zero_update"
    for key in ("frob_norm", "sigma_max", "stable_rank", "utilization", "effective_rank", "energy_rank_90",
                "energy_rank_95", "energy_rank_99", "delta_frob_norm", "delta_sigma_max"):
        assert z[key] == 0, key
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        row = rows[name]
        assert row["status"] == "non_finite"
        assert row["stable_rank"] is None and row["singular_values"] is None and row["energy_rank_90"] is None
    codes = {i["code"]: i for i in summary["issues"]}
    assert codes["zero_update"]["modules"] == ["model.layers.0.self_attn.v_proj"]
    assert sorted(codes["non_finite_weights"]["modules"]) == ["model.layers.1.self_attn.q_proj",
                                                              "model.layers.1.self_attn.v_proj"]
    # non-finite rows are excluded from the means, zero rows count as 0
    good_sr = rows["model.layers.0.self_attn.q_proj"]["stable_rank"]
    assert summary["stable_rank_mean"] == pytest.approx(good_sr / 2)
    # JSON: strict (dumps refuses NaN), non-finite rows come back as nulls
    import json

    from gradience import jsonio
    back = json.loads(jsonio.dumps(summary))
    assert back["layers"][2]["frob_norm"] is None


def test_batched_path_equals_single_pair_path() -> None:
    rng = np.random.default_rng(5)
    pairs, singles = [], []
    for i in range(12):
        r = [4, 8][i % 2]
        a = rng.standard_normal((r, 20 + i)).astype(np.float32)
        b = rng.standard_normal((30, r)).astype(np.float32) * np.logspace(0, -2 * (i % 3), r).astype(np.float32)
        pairs.append(make_pair(f"model.layers.{i}.mlp.up_proj", a, b))
        singles.append(singular_values(a, b))
    layers = run_audit(adapter_of(pairs)).layers
    for layer, s in zip(layers, singles, strict=True):
        np.testing.assert_allclose(layer.singular_values, s, rtol=1e-13, atol=1e-15 * s[0])


def test_factors_are_read_once_unless_refined() -> None:
    rng = np.random.default_rng(9)
    calls = {"n": 0}
    a = rng.standard_normal((8, 32)).astype(np.float32)
    b = rng.standard_normal((32, 8)).astype(np.float32)

    def loader() -> tuple[np.ndarray, np.ndarray]:
        calls["n"] += 1
        return a, b

    pair = make_pair("model.layers.0.self_attn.q_proj", a, b)
    pair.loader = loader
    run_audit(adapter_of([pair]), AuditOptions())
    assert calls["n"] == 1
