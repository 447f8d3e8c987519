"""compare's cross metrics (cos, overlap_left/right) against dense numpy on small shapes (SPEC §13).

Adapters are written to disk as real safetensors with explicit factors and compared through the library
entry point, so the whole path (reader, audit rows, matching, shared-basis reduction, factored_svd) is
exercised; the references are dense ΔW = s·B·A and numpy's full SVD.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.compare import CompareOptions, compare
from gradience.compare.subspace import compare_factors
from support.synthetic import write_safetensors

D_OUT, D_IN = 24, 20


def write_adapter(out: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], *, r: int, alpha: float,
                  use_rslora: bool = False, base: str | None = "org/base",
                  prefix: str = "base_model.model.model.layers.{i}.self_attn.q_proj") -> Path:
    """A PEFT-layout adapter whose modules ``prefix.format(i=...)`` have exactly the given (A, B) factors."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for key, (a, b) in factors.items():
        tensors[f"{key}.lora_A.weight"] = np.asarray(a, dtype=np.float32)
        tensors[f"{key}.lora_B.weight"] = np.asarray(b, dtype=np.float32)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    ranks = {key: a.shape[0] for key, (a, _) in factors.items()}
    rank_pattern = {k.removeprefix("base_model.model."): v for k, v in ranks.items() if v != r}
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
           "target_modules": ["q_proj"], "rank_pattern": rank_pattern, "alpha_pattern": {},
           "base_model_name_or_path": base}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def key(i: int = 0) -> str:
    return f"base_model.model.model.layers.{i}.self_attn.q_proj"


def dense(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    return s * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def dense_overlaps(wa: np.ndarray, wb: np.ndarray, k: int) -> tuple[float, float, float]:
    cos = float(np.sum(wa * wb) / (np.linalg.norm(wa) * np.linalg.norm(wb)))
    ua, _, vta = np.linalg.svd(wa)
    ub, _, vtb = np.linalg.svd(wb)
    left = float(np.sum((ua[:, :k].T @ ub[:, :k]) ** 2)) / k
    right = float(np.sum((vta[:k] @ vtb[:k].T) ** 2)) / k
    return cos, left, right


def only_module(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["summary"]["n_matched"] == 1
    return doc["modules"][0]


def random_factors(rng: np.random.Generator, r: int, decay: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((r, D_IN)) * (decay ** np.arange(r))[:, None]
    b = rng.standard_normal((D_OUT, r))
    return a.astype(np.float32), b.astype(np.float32)


def test_identical_adapters_cos_and_overlap_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fac = {key(): random_factors(rng, 6)}
    a = write_adapter(tmp_path / "a", fac, r=6, alpha=12)
    b = write_adapter(tmp_path / "b", fac, r=6, alpha=12)
    for other in (a, b):  # the same directory twice, and an identical copy
        m = only_module(compare(str(a), str(other), CompareOptions(k=4)))
        assert m["cos"] == pytest.approx(1.0, abs=1e-12)
        assert m["overlap_left"] == pytest.approx(1.0, abs=1e-9)
        assert m["overlap_right"] == pytest.approx(1.0, abs=1e-9)
        assert m["k"] == 4
        assert all(v == 0 for v in m["delta"].values() if v is not None)


def test_negated_update_cos_minus_one_overlap_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a_f, b_f = random_factors(rng, 5)
    a = write_adapter(tmp_path / "a", {key(): (a_f, b_f)}, r=5, alpha=10)
    b = write_adapter(tmp_path / "b", {key(): (a_f, -b_f)}, r=5, alpha=10)
    m = only_module(compare(str(a), str(b), CompareOptions(k=3)))
    assert m["cos"] == pytest.approx(-1.0, abs=1e-12)
    assert m["overlap_left"] == pytest.approx(1.0, abs=1e-9)
    assert m["overlap_right"] == pytest.approx(1.0, abs=1e-9)
    # the same through a negative alpha (sign of the scale kept, as the cosine of the scaled updates says)
    c = write_adapter(tmp_path / "c", {key(): (a_f, b_f)}, r=5, alpha=-10)
    assert only_module(compare(str(a), str(c)))["cos"] == pytest.approx(-1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    q_out, _ = np.linalg.qr(rng.standard_normal((D_OUT, 8)))
    q_in, _ = np.linalg.qr(rng.standard_normal((D_IN, 8)))
    fa = (q_in[:, :4].T * 2.0, q_out[:, :4] @ np.diag([3.0, 2.0, 1.0, 0.5]))
    fb = (q_in[:, 4:].T, q_out[:, 4:] @ np.diag([1.0, 0.9, 0.8, 0.7]))
    a = write_adapter(tmp_path / "a", {key(): fa}, r=4, alpha=8)
    b = write_adapter(tmp_path / "b", {key(): fb}, r=4, alpha=8)
    m = only_module(compare(str(a), str(b), CompareOptions(k=4)))
    assert m["cos"] == pytest.approx(0.0, abs=1e-6)
    assert m["overlap_left"] == pytest.approx(0.0, abs=1e-6)
    assert m["overlap_right"] == pytest.approx(0.0, abs=1e-6)
    # only the left subspaces orthogonal: right overlap 1, cosine still 0
    fc = (fa[0], q_out[:, 4:] @ np.diag([3.0, 2.0, 1.0, 0.5]))
    c = write_adapter(tmp_path / "c", {key(): fc}, r=4, alpha=8)
    m = only_module(compare(str(a), str(c), CompareOptions(k=4)))
    assert m["overlap_left"] == pytest.approx(0.0, abs=1e-6)
    assert m["overlap_right"] == pytest.approx(1.0, abs=1e-6)
    assert m["cos"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("theta", "phi"), [(0.3, 0.0), (math.pi / 3, 0.2), (1.2, 1.0)])
def test_rotation_by_known_principal_angle(tmp_path: Path, theta: float, phi: float) -> None:
    """ΔW_A = σ·u₁v₁ᵀ, ΔW_B = σ·(cosθ·u₁ + sinθ·u₂)(cosφ·v₁ + sinφ·v₂)ᵀ: overlap_left = cos²θ,
    overlap_right = cos²φ, cos = cosθ·cosφ (k = 1)."""
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((D_OUT, 2)))
    v, _ = np.linalg.qr(rng.standard_normal((D_IN, 2)))
    u_rot = math.cos(theta) * u[:, 0] + math.sin(theta) * u[:, 1]
    v_rot = math.cos(phi) * v[:, 0] + math.sin(phi) * v[:, 1]
    u_perp = -math.sin(theta) * u[:, 0] + math.cos(theta) * u[:, 1]
    v_perp = -math.sin(phi) * v[:, 0] + math.cos(phi) * v[:, 1]
    # rank-2 factors whose second direction is weak (σ = 2, 0.01), so k = min(k@90%) = 1 by default
    fa = (np.stack([v[:, 0], 0.01 * v[:, 1]]), np.stack([2.0 * u[:, 0], u[:, 1]], axis=1))
    fb = (np.stack([v_rot, 0.01 * v_perp]), np.stack([2.0 * u_rot, u_perp], axis=1))
    fa, fb = tuple(x.astype(np.float32) for x in fa), tuple(x.astype(np.float32) for x in fb)
    a = write_adapter(tmp_path / "a", {key(): fa}, r=2, alpha=2)
    b = write_adapter(tmp_path / "b", {key(): fb}, r=2, alpha=2)
    m = only_module(compare(str(a), str(b)))
    assert m["k"] == 1
    assert m["overlap_left"] == pytest.approx(math.cos(theta) ** 2, abs=1e-6)  # float32 factors
    assert m["overlap_right"] == pytest.approx(math.cos(phi) ** 2, abs=1e-6)
    ref_cos, ref_left, ref_right = dense_overlaps(dense(*fa, 1.0), dense(*fb, 1.0), 1)
    assert m["cos"] == pytest.approx(ref_cos, abs=1e-9)
    assert m["overlap_left"] == pytest.approx(ref_left, abs=1e-9)
    assert m["overlap_right"] == pytest.approx(ref_right, abs=1e-9)


@pytest.mark.parametrize(("ra", "rb"), [(2, 7), (8, 3), (12, 12)])
def test_different_ranks_against_dense(tmp_path: Path, ra: int, rb: int) -> None:
    """Partially shared random updates of different rank (r_a + r_b may exceed d_out): every k."""
    rng = np.random.default_rng(10 * ra + rb)
    a_a, b_a = random_factors(rng, ra)
    a_b, b_b = random_factors(rng, rb)
    shared = min(ra, rb, 2)
    a_b[:shared] = a_a[:shared] + 0.3 * a_b[:shared]
    b_b[:, :shared] = b_a[:, :shared]
    a = write_adapter(tmp_path / "a", {key(): (a_a, b_a)}, r=ra, alpha=2 * ra)
    b = write_adapter(tmp_path / "b", {key(): (a_b, b_b)}, r=rb, alpha=16)
    wa, wb = dense(a_a, b_a, 2.0), dense(a_b, b_b, 16 / rb)
    for k in range(1, min(ra, rb) + 1):
        m = only_module(compare(str(a), str(b), CompareOptions(k=k)))
        ref = dense_overlaps(wa, wb, k)
        assert (m["cos"], m["overlap_left"], m["overlap_right"]) == pytest.approx(ref, abs=1e-8)
        assert m["a"]["r"] == ra and m["b"]["r"] == rb and m["delta"]["r"] == rb - ra
    # default k: min of the two sides' energy_rank_90, from the dense spectra
    m = only_module(compare(str(a), str(b)))

    def k90(w: np.ndarray) -> int:
        e = np.cumsum(np.linalg.svd(w, compute_uv=False) ** 2)
        return int(np.searchsorted(e, 0.9 * e[-1] * (1 - 1e-10)) + 1)

    assert m["k"] == min(k90(wa), k90(wb))
    assert m["a"]["energy_rank_90"] == k90(wa) and m["b"]["energy_rank_90"] == k90(wb)
    assert (m["overlap_left"], m["overlap_right"]) == pytest.approx(dense_overlaps(wa, wb, m["k"])[1:], abs=1e-8)
    # side metrics and deltas against the dense updates
    assert m["a"]["delta_frob_norm"] == pytest.approx(np.linalg.norm(wa), rel=1e-6)
    assert m["b"]["delta_sigma_max"] == pytest.approx(np.linalg.norm(wb, 2), rel=1e-6)
    assert m["delta"]["delta_frob_norm"] == pytest.approx(np.linalg.norm(wb) - np.linalg.norm(wa), rel=1e-5)


def test_rslora_versus_plain_scale(tmp_path: Path) -> None:
    """Same factors, rsLoRA (α/√r) vs plain (α/r): the updates are parallel (cos 1, overlaps 1) and differ
    in size by exactly √r; the scale and size deltas say so."""
    rng = np.random.default_rng(4)
    fac = {key(): random_factors(rng, 9)}
    plain = write_adapter(tmp_path / "plain", fac, r=9, alpha=18)
    rs = write_adapter(tmp_path / "rs", fac, r=9, alpha=18, use_rslora=True)
    m = only_module(compare(str(plain), str(rs), CompareOptions(k=3)))
    assert m["a"]["scale"] == pytest.approx(2.0) and m["b"]["scale"] == pytest.approx(6.0)
    assert m["delta"]["scale"] == pytest.approx(4.0)
    assert m["cos"] == pytest.approx(1.0, abs=1e-12)
    assert m["overlap_left"] == pytest.approx(1.0, abs=1e-9)
    wa = dense(*fac[key()], 2.0)
    assert m["b"]["delta_frob_norm"] == pytest.approx(3.0 * np.linalg.norm(wa), rel=1e-6)
    assert m["delta"]["delta_frob_norm"] == pytest.approx(2.0 * np.linalg.norm(wa), rel=1e-6)
    assert m["delta"]["utilization"] == pytest.approx(0.0, abs=1e-12)


def test_zero_update_gives_null_and_an_issue(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a_f, b_f = random_factors(rng, 4)
    a = write_adapter(tmp_path / "a", {key(0): (a_f, b_f), key(1): (a_f, b_f)}, r=4, alpha=8)
    b = write_adapter(tmp_path / "b", {key(0): (a_f, np.zeros_like(b_f)), key(1): (a_f, b_f)}, r=4, alpha=8)
    doc = compare(str(a), str(b))
    by_name = {m["name"]: m for m in doc["modules"]}
    zero = by_name["model.layers.0.self_attn.q_proj"]
    assert zero["cos"] is None and zero["overlap_left"] is None and zero["overlap_right"] is None
    issue = next(i for i in doc["issues"] if i["code"] == "zero_update" and "side" not in i)
    assert issue["modules"] == ["model.layers.0.self_attn.q_proj"]
    assert by_name["model.layers.1.self_attn.q_proj"]["cos"] == pytest.approx(1.0)
    assert doc["summary"]["cos_mean"] == pytest.approx(1.0)  # the null module is left out, not counted as 0


def test_k_larger_than_rank_is_clamped_with_an_issue(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    a_f, b_f = random_factors(rng, 4)
    b_f[:, 2:] = 0.0  # numerical rank 2
    a = write_adapter(tmp_path / "a", {key(): (a_f, b_f)}, r=4, alpha=8)
    b = write_adapter(tmp_path / "b", {key(): random_factors(rng, 6)}, r=6, alpha=8)
    doc = compare(str(a), str(b), CompareOptions(k=5))
    m = only_module(doc)
    assert m["k"] == 2
    assert any(i["code"] == "k_clamped" for i in doc["issues"])
    ref = dense_overlaps(dense(a_f, b_f, 2.0), dense(*_factors_of(b), 8 / 6), 2)
    assert (m["overlap_left"], m["overlap_right"]) == pytest.approx(ref[1:], abs=1e-8)


def _factors_of(adapter: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    return t[f"{key()}.lora_A.weight"], t[f"{key()}.lora_B.weight"]


def test_small_update_next_to_large_one_keeps_accuracy() -> None:
    """Each side is normalised before the shared basis: a 1e-6-sized update still gets exact subspaces."""
    rng = np.random.default_rng(7)
    a_a, b_a = random_factors(rng, 5)
    a_b, b_b = random_factors(rng, 5)
    a_b[:2], b_b[:, :2] = a_a[:2], b_a[:, :2]
    b_small = b_a * np.float32(1e-6)
    pc = compare_factors(a_a, b_small, 1.0, a_b, b_b, 1.0)
    ref = dense_overlaps(dense(a_a, b_small, 1.0), dense(a_b, b_b, 1.0), 3)
    assert pc.cos == pytest.approx(ref[0], abs=1e-9)
    assert pc.overlaps(3) == pytest.approx(ref[1:], abs=1e-8)


def test_shape_mismatch_is_null_not_an_error() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_factors(*random_factors(rng, 3), 1.0, rng.standard_normal((3, D_IN + 1)).astype(np.float32),
                        rng.standard_normal((D_OUT, 3)).astype(np.float32), 1.0)
