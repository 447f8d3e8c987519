"""merge math against an independent dense numpy computation on constructed adapters (no torch).

Adapters are written here from known factors (``support.synthetic.write_safetensors``), so the reference
ΔW = s·B·A uses the scale rule PEFT documents (alpha/r, alpha/√r with rsLoRA, rank_pattern / alpha_pattern by
module) computed in the test, not by gradience's reader. The merged adapter is read back from its file (raw
tensors + its config), again without gradience's reader.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.compress.policy import Policy
from gradience.merge import MergeOptions, merge
from support import synthetic

D_OUT, D_IN = 24, 40
MODS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj")


def _write(out: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], config: dict[str, Any]) -> Path:
    """PEFT layout: base_model.model.<name>.lora_A.weight (r, d_in) / lora_B.weight (d_out, r)."""
    out.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    synthetic.write_safetensors(out / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": "tiny/base", "target_modules": ["q_proj", "v_proj"],
           "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _factors(seed: int, ranks: dict[str, int], names: tuple[str, ...] = MODS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        r = ranks.get(name.rsplit(".", 1)[-1], ranks["default"])
        decay = 0.7 ** np.arange(r)
        out[name] = ((rng.standard_normal((r, D_IN)) * decay[:, None]).astype(np.float32),
                     (rng.standard_normal((D_OUT, r)) * 0.5).astype(np.float32))
    return out


def _dense(factors: dict[str, tuple[np.ndarray, np.ndarray]], scale: dict[str, float]) -> dict[str, np.ndarray]:
    return {n: scale[n] * b.astype(np.float64) @ a.astype(np.float64) for n, (a, b) in factors.items()}


def _read_out(out: Path) -> dict[str, np.ndarray]:
    """ΔW of every module of a merged adapter, from its raw tensors and config (scale = lora_alpha / r_i)."""
    from gradience.io.safetensors import SafetensorsFile

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and cfg["alpha_pattern"] == {}
    f = SafetensorsFile(out / "adapter_model.safetensors")
    res = {}
    names = f.keys()
    for key in names:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = np.asarray(f.read_f32(key), dtype=np.float64)
            b = np.asarray(f.read_f32(key.replace("lora_A", "lora_B")), dtype=np.float64)
            r = a.shape[0]
            leaf = name.rsplit(".", 1)[-1]
            pattern = cfg["rank_pattern"]
            want = pattern.get(name, pattern.get(leaf, cfg["r"]))
            assert want == r, (name, want, r)
            res[name] = cfg["lora_alpha"] / r * (b @ a)
    return res


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    den = float(np.linalg.norm(y))
    return float(np.linalg.norm(x - y)) / (den if den > 0 else 1.0)


def _best(m: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Adapter 1: r=8 (v_proj r=4 by rank_pattern), alpha 16, alpha_pattern v_proj 12. Adapter 2: r=6,
    alpha 10, rsLoRA. Reference ΔW computed here with PEFT's scale rules."""
    f1 = _factors(1, {"default": 8, "v_proj": 4})
    f2 = _factors(2, {"default": 6})
    p1 = _write(tmp_path / "one", f1, {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4},
                                        "alpha_pattern": {"v_proj": 12}})
    p2 = _write(tmp_path / "two", f2, {"r": 6, "lora_alpha": 10, "use_rslora": True})
    s1 = {n: (12 / 4 if "v_proj" in n else 16 / 8) for n in MODS}
    s2 = {n: 10 / math.sqrt(6) for n in MODS}
    return p1, p2, _dense(f1, s1), _dense(f2, s2)


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_linear_are_the_exact_weighted_sum(pair: Any, tmp_path: Path, method: str) -> None:
    p1, p2, d1, d2 = pair
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], tmp_path / "out",
                MergeOptions(method=method, weights=[0.7, -0.4]))
    got = _read_out(tmp_path / "out")
    assert set(got) == set(MODS)
    for name in MODS:
        assert _rel(got[name], 0.7 * d1[name] - 0.4 * d2[name]) < 1e-6
    doc = res.to_dict()
    rows = {r["name"]: r for r in doc["modules"]}
    assert rows[MODS[1]]["ranks_before"] == [4, 6] and rows[MODS[1]]["r_after"] == 10
    assert rows[MODS[0]]["r_after"] == 14 and rows[MODS[0]]["rel_frob_error"] == 0.0
    assert doc["schema"] == "gradience.merge/v1" and [i["weight"] for i in doc["inputs"]] == [0.7, -0.4]
    on_disk = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert on_disk["output"]["written"] is True and on_disk["inputs"][0]["sha256"] == doc["inputs"][0]["sha256"]
    import hashlib
    assert doc["inputs"][1]["sha256"] == hashlib.sha256((p2 / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_svd_is_the_best_rank_k_of_the_sum(pair: Any, tmp_path: Path, k: int) -> None:
    p1, p2, d1, d2 = pair
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], tmp_path / "out",
                MergeOptions(method="svd", weights="0.5,0.5", policy=Policy("rank", k)))
    got = _read_out(tmp_path / "out")
    rows = {r["name"]: r for r in res.to_dict()["modules"]}
    for name in MODS:
        full = 0.5 * d1[name] + 0.5 * d2[name]
        best = _best(full, k)
        assert _rel(got[name], best) < 1e-6
        s = np.linalg.svd(full, compute_uv=False)
        energy = float(np.sum(s[:k] ** 2) / np.sum(s ** 2))
        assert rows[name]["energy_retained"] == pytest.approx(energy, rel=1e-9)
        assert rows[name]["rel_frob_error"] == pytest.approx(_rel(best, full), rel=1e-6)


def test_energy_policy_and_default_rank(pair: Any, tmp_path: Path) -> None:
    p1, p2, d1, d2 = pair
    inputs = [load_adapter(str(p1)), load_adapter(str(p2))]
    res = merge(inputs, None, MergeOptions(method="svd", policy=Policy("energy", 0.9)))
    for row in res.to_dict()["modules"]:
        s = np.linalg.svd(d1[row["name"]] + d2[row["name"]], compute_uv=False)
        cum = np.cumsum(s ** 2) / np.sum(s ** 2)
        assert row["r_after"] == int(np.searchsorted(cum, 0.9 * (1 - 1e-12))) + 1
    # no policy: svd keeps the largest input rank of each module (PEFT's default for its svd combinations)
    res = merge(inputs, None, MergeOptions(method="svd"))
    assert {r["name"]: r["r_after"] for r in res.to_dict()["modules"]} == {MODS[0]: 8, MODS[1]: 6, MODS[2]: 8}


def test_per_layer_policy_is_the_audits_rule_on_the_merged_spectrum(pair: Any) -> None:
    """allowed rank >= margin·k@90% of the merged σ, rounded up to the allowed ranks, capped at sum(r_i)."""
    p1, p2, d1, d2 = pair
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], None,
                MergeOptions(method="svd", policy=Policy("per_layer", margin=1.5, allowed_ranks=(2, 4, 8, 16))))
    for row in res.to_dict()["modules"]:
        s = np.linalg.svd(d1[row["name"]] + d2[row["name"]], compute_uv=False)
        k90 = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.9 * (1 - 1e-12))) + 1
        want = min(next(a for a in (2, 4, 8, 16, 10**6) if a >= 1.5 * k90), row["r_sum"])
        assert row["r_after"] == want, row["name"]


def test_budget_and_uniform(pair: Any, tmp_path: Path) -> None:
    p1, p2, *_ = pair
    inputs = [load_adapter(str(p1)), load_adapter(str(p2))]
    doc = merge(inputs, None, MergeOptions(method="linear", policy=Policy("budget", "40%"))).to_dict()
    assert doc["summary"]["params_after"] <= 0.4 * doc["summary"]["params_sum"]
    assert doc["policy"]["budget_params_used"] == doc["summary"]["params_after"]
    doc = merge(inputs, tmp_path / "u", MergeOptions(method="svd", policy=Policy("energy", 0.8, uniform=True))
                ).to_dict()
    assert len(doc["summary"]["ranks_after"]) == 1 and doc["config"]["rank_pattern"] == {}
    assert doc["portability"]["vllm"]["ok"]
    # linear at a rank >= every module's sum(r_i), one rank everywhere: still the exact sum (zero-padded)
    doc = merge(inputs, tmp_path / "pad", MergeOptions(method="linear", policy=Policy("rank", 20, uniform=True))
                ).to_dict()
    assert doc["summary"]["ranks_after"] == [14] and doc["summary"]["rel_frob_error_max"] == 0.0
    got = _read_out(tmp_path / "pad")
    _p1, _p2, d1, d2 = pair
    for name in MODS:
        assert _rel(got[name], d1[name] + d2[name]) < 1e-6


def test_disjoint_modules_are_merged_with_zero_elsewhere(tmp_path: Path) -> None:
    f1 = _factors(3, {"default": 4}, names=MODS[:2])
    f2 = _factors(4, {"default": 2}, names=MODS[1:])
    p1 = _write(tmp_path / "one", f1, {"r": 4, "lora_alpha": 8})
    p2 = _write(tmp_path / "two", f2, {"r": 2, "lora_alpha": 2})
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], tmp_path / "out", MergeOptions(weights=[2.0, 3.0]))
    got = _read_out(tmp_path / "out")
    d1 = _dense(f1, dict.fromkeys(MODS, 2.0))
    d2 = _dense(f2, dict.fromkeys(MODS, 1.0))
    assert _rel(got[MODS[0]], 2 * d1[MODS[0]]) < 1e-6
    assert _rel(got[MODS[1]], 2 * d1[MODS[1]] + 3 * d2[MODS[1]]) < 1e-6
    assert _rel(got[MODS[2]], 3 * d2[MODS[2]]) < 1e-6
    doc = res.to_dict()
    assert doc["partial_modules"] == [MODS[0], MODS[2]]
    assert any(i["code"] == "partial_modules" for i in doc["issues"])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(MODS)


def test_identical_and_opposite_inputs(tmp_path: Path) -> None:
    f = _factors(5, {"default": 4})
    neg = {n: (a, -b) for n, (a, b) in f.items()}
    p = _write(tmp_path / "one", f, {"r": 4, "lora_alpha": 8})
    q = _write(tmp_path / "same", f, {"r": 4, "lora_alpha": 8})
    o = _write(tmp_path / "neg", neg, {"r": 4, "lora_alpha": 8})
    d = _dense(f, dict.fromkeys(MODS, 2.0))
    res = merge([load_adapter(str(p)), load_adapter(str(q))], tmp_path / "same_out",
                MergeOptions(method="svd", weights=[0.5, 0.5], policy=Policy("rank", 4)))
    got = _read_out(tmp_path / "same_out")
    for name in MODS:  # the sum of two identical rank-4 updates is rank 4: svd at 4 is exact (rank-deficient stack)
        assert _rel(got[name], d[name]) < 1e-6
    for row in res.to_dict()["modules"]:
        pair_row = row["interference"]["pairs"][0]
        assert pair_row["cos"] == pytest.approx(1.0, abs=1e-9) and pair_row["overlap"] == pytest.approx(1.0, abs=1e-6)
        assert row["interference"]["conflict_max"] == pytest.approx(0.0, abs=1e-6)
        assert row["energy_retained"] == pytest.approx(1.0, abs=1e-9)
    res = merge([load_adapter(str(p)), load_adapter(str(o))], tmp_path / "neg_out", MergeOptions(method="linear"))
    got = _read_out(tmp_path / "neg_out")
    doc = res.to_dict()
    for name in MODS:
        assert np.linalg.norm(got[name]) < 1e-6 * np.linalg.norm(d[name])
    for row in doc["modules"]:
        assert row["interference"]["conflict_max"] == pytest.approx(1.0, abs=1e-6)
        assert row["interference"]["cos_min"] == pytest.approx(-1.0, abs=1e-9)
    assert doc["summary"]["most_interfering"]
    assert any(i["code"] == "zero_update" for i in doc["issues"])


def _ties_ref(updates: list[np.ndarray], weights: list[float], density: float) -> tuple[np.ndarray, float]:
    trimmed = []
    for t in updates:
        keep = int(density * t.size)
        flat = np.sort(np.abs(t).ravel())
        thr = flat[t.size - keep] if keep > 0 else np.inf
        trimmed.append(np.where(np.abs(t) >= thr, t, 0.0))
    vals = np.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    gamma = np.sign(vals.sum(0))
    agree = (np.sign(vals) == gamma) & (vals != 0)
    merged = np.where(agree, vals, 0).sum(0) / np.maximum(agree.sum(0), 1)
    nz = (vals != 0).sum(0)
    several = nz >= 2
    conflict = several & ((vals > 0).sum(0) > 0) & ((vals < 0).sum(0) > 0)
    return merged, conflict.sum() / several.sum()


def _splitmix(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _dare_ref(updates: list[np.ndarray], weights: list[float], p: float, seed: int, name: str) -> np.ndarray:
    """DARE with the documented counter-based mask: entry (r, c) of input i is kept when
    (splitmix64(key_i + r·d_in + c) >> 11)·2⁻⁵³ >= p, key_i = splitmix64(splitmix64(splitmix64(seed) ^ i) ^ crc32)."""
    out = np.zeros_like(updates[0])
    crc = zlib.crc32(name.encode())
    for i, (w, t) in enumerate(zip(weights, updates, strict=True)):
        key = _splitmix(_splitmix(_splitmix(seed) ^ i) ^ crc)
        u = np.array([(_splitmix(key + c) >> 11) / float(1 << 53) for c in range(t.size)]).reshape(t.shape)
        out += w * np.where(u >= p, t / (1 - p), 0.0)
    return out


def test_ties_and_dare_match_a_dense_reference(pair: Any, tmp_path: Path) -> None:
    p1, p2, d1, d2 = pair
    inputs = [load_adapter(str(p1)), load_adapter(str(p2))]
    full = min(D_OUT, D_IN)  # re-factored at full rank: the written adapter is the element-wise merge itself
    res = merge(inputs, tmp_path / "ties", MergeOptions(method="ties", weights=[1.0, 0.5], density=0.3,
                                                         policy=Policy("rank", full)))
    got = _read_out(tmp_path / "ties")
    rows = {r["name"]: r for r in res.to_dict()["modules"]}
    for name in MODS:
        ref, conflict = _ties_ref([d1[name], d2[name]], [1.0, 0.5], 0.3)
        assert _rel(got[name], ref) < 1e-6
        assert rows[name]["sign_conflict_rate"] == pytest.approx(conflict)
        assert rows[name]["rel_frob_error"] == pytest.approx(_rel(ref, d1[name] + 0.5 * d2[name]), rel=1e-6)
    res = merge(inputs, tmp_path / "dare", MergeOptions(method="dare", weights=[1.0, 1.0], drop_rate=0.6, seed=7,
                                                         policy=Policy("rank", full)))
    got = _read_out(tmp_path / "dare")
    for name in MODS:
        assert _rel(got[name], _dare_ref([d1[name], d2[name]], [1.0, 1.0], 0.6, 7, name)) < 1e-6
    # truncated: the best rank-k approximation of the element-wise merge, retained energy of that step
    res = merge(inputs, None, MergeOptions(method="dare", drop_rate=0.6, seed=7, policy=Policy("rank", 5)))
    for row in res.to_dict()["modules"]:
        ref = _dare_ref([d1[row["name"]], d2[row["name"]]], [1.0, 1.0], 0.6, 7, row["name"])
        s = np.linalg.svd(ref, compute_uv=False)
        assert row["energy_retained"] == pytest.approx(float(np.sum(s[:5] ** 2) / np.sum(s ** 2)), rel=1e-9)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_elementwise_refactor_equals_numpy_truncation(shape: tuple[int, int]) -> None:
    """The slab/Gram re-factorisation of M = the numpy SVD truncation (both orientations, several slabs)."""
    from gradience.merge import elementwise
    from gradience.merge.factored import stack

    rng = np.random.default_rng(0)
    d_out, d_in = shape
    parts = []
    for i in range(2):
        a = rng.standard_normal((20, d_in)) * (0.7 ** np.arange(20))[:, None]
        parts.append((i, a, rng.standard_normal((d_out, 20)), 1.0, 0.5))
    st = stack("m", parts)
    slabs = elementwise.Slabs(d_out, d_in)
    slabs.spans = [slice(i, min(i + 7, max(shape))) for i in range(0, max(shape), 7)]  # several slabs
    ew = elementwise.prepare(st, "m", slabs, "dare", density=1.0, drop=0.0, seed=0)   # p = 0: M = the sum
    m = sum(0.5 * b @ a for _i, a, b, _w, _s in parts)
    sigma = elementwise.spectrum_of_gram(elementwise.merged_gram(st, slabs, ew))
    # the Gram route resolves σ to ~eps·σ₁²/σ: absolute accuracy relative to σ₁ (what energies use)
    ref = np.linalg.svd(m, compute_uv=False)
    assert np.allclose(sigma, ref, rtol=1e-8, atol=1e-8 * ref[0])
    sig, vecs = elementwise.eigh_desc(elementwise.merged_gram(st, slabs, ew))
    vec = np.ascontiguousarray(vecs[:, :6])
    a, b, err, norm = elementwise.factors(st, slabs, ew, sig, vec, 6, 3.0)
    assert _rel((3.0 / 6) * b @ a, _best(m, 6)) < 1e-10
    assert err / norm == pytest.approx(_rel(_best(m, 6), m), rel=1e-8)


def test_subspace_iteration_path_gives_the_best_rank_k(pair: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Large modules take the subspace-iteration path (no m×m eigen-decomposition): forced here on small ones,
    the written ties adapter is the best rank-k approximation of the dense TIES reference."""
    monkeypatch.setattr("gradience.policy.thresholds.MERGE_EXACT_EIGH_MAX", 4)
    monkeypatch.setattr("gradience.policy.thresholds.MERGE_SUBSPACE_OVERSAMPLE", 2)
    p1, p2, d1, d2 = pair
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], tmp_path / "t",
                MergeOptions(method="ties", density=0.5, policy=Policy("rank", 3)))
    got = _read_out(tmp_path / "t")
    rows = {r["name"]: r for r in res.to_dict()["modules"]}
    for name in MODS:
        ref, _ = _ties_ref([d1[name], d2[name]], [1.0, 1.0], 0.5)
        best = _best(ref, 3)
        assert _rel(got[name], best) < 1e-5, name
        row = rows[name]
        assert row["factor_method"] == "subspace" and row["subspace"]["converged"]
        s = np.linalg.svd(ref, compute_uv=False)
        assert row["energy_retained"] == pytest.approx(float(np.sum(s[:3] ** 2) / np.sum(s ** 2)), rel=1e-9)
        assert row["rel_frob_error"] == pytest.approx(_rel(best, d1[name] + d2[name]), rel=1e-6)
    # a σ-based policy on the same path: the Gram's eigenvalues decide k, its top-k vectors the factors
    res = merge([load_adapter(str(p1)), load_adapter(str(p2))], tmp_path / "e",
                MergeOptions(method="ties", density=0.5, policy=Policy("energy", 0.8)))
    got = _read_out(tmp_path / "e")
    for row in res.to_dict()["modules"]:
        ref, _ = _ties_ref([d1[row["name"]], d2[row["name"]]], [1.0, 1.0], 0.5)
        s = np.linalg.svd(ref, compute_uv=False)
        k = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.8 * (1 - 1e-12))) + 1
        assert row["r_after"] == k
        assert _rel(got[row["name"]], _best(ref, k)) < 1e-5


def test_ties_threshold_is_the_exact_order_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES' trim threshold without a dense buffer: radix selection over slabs equals np.partition on the whole
    |τ|, with ties, zeros, negative values and one repeated value; a tiny gather limit forces every radix pass."""
    from gradience.merge import elementwise

    rng = np.random.default_rng(7)
    cases = [rng.standard_normal((37, 53)), np.round(rng.standard_normal((40, 30)) * 2) / 2,
             np.zeros((9, 11)), np.full((8, 8), -0.25), rng.standard_normal((60, 70)) * np.logspace(-30, 30, 70)]
    cases[2][3, 4] = -2.0
    for limit in (1 << 20, 3):
        monkeypatch.setattr(elementwise, "_CHUNK_ELEMS", limit)
        for m in cases:
            spans = [slice(i, min(i + 13, m.shape[1])) for i in range(0, m.shape[1], 13)]
            ref = np.sort(np.abs(m).ravel())
            for rank in sorted({0, m.size // 3, m.size // 2, m.size - 1}):
                got = elementwise.order_statistic(lambda span, m=m: m[:, span].copy(), spans, rank)
                assert got == ref[rank], (m.shape, rank, limit)
