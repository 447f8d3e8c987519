"""The batched MoE expert audit (one stacked parameter measured at once) against the per-pair path it replaces and
against dense numpy: same rows, same keys, same numbers (1e-6 relative), on a real PEFT ``target_parameters``
adapter and on stacked factors with the awkward cases (zero, NaN, huge F64, BF16, several chunks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit.layers import _layer_from_pair, audit_pairs
from gradience.audit.spectrum import (
    effective_rank,
    pair_grams,
    singular_values_many,
    spectrum_metrics,
    spectrum_metrics_many,
)
from gradience.audit.stacked import stacked_pair_grams

torch = pytest.importorskip("torch")


def _per_pair_rows(pairs: list[Any]) -> list[dict[str, Any]]:
    """The per-pair path as it was before batching: each pair's own Gram pass, then per-row metrics."""
    grams = [pair_grams(*pair.load_factors()) for pair in pairs]
    overflow: dict[int, int] = {}
    sigmas, _ = singular_values_many(grams, lambda i: pairs[i].load_factors(), overflow)
    return [_layer_from_pair(p, s, out_of_range=i in overflow).to_row()
            for i, (p, s) in enumerate(zip(pairs, sigmas, strict=True))]


def _assert_rows_match(got: list[dict[str, Any]], want: list[dict[str, Any]], rtol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), g["name"]
        for key, wv in w.items():
            gv = g[key]
            if isinstance(wv, float) and isinstance(gv, float):
                if math.isnan(wv):
                    assert math.isnan(gv), (g["name"], key)
                else:
                    assert gv == pytest.approx(wv, rel=rtol, abs=1e-300), (g["name"], key)
            elif key == "singular_values" and wv is not None:
                np.testing.assert_allclose(gv, wv, rtol=rtol, atol=rtol * max(wv[0], 1e-300))
            else:
                assert gv == wv, (g["name"], key)


# -- a real PEFT target_parameters adapter ------------------------------------------------------------------


def _peft_qwen3_moe(out: Path, dtype: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=12, decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    lora = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(model, lora)
    pm.to(dtype)
    pm.save_pretrained(out)
    return pm.double()  # the saved (e.g. bf16) values, exactly: PEFT's delta then in float64


def _peft_deltas(pm: Any) -> dict[str, np.ndarray]:
    """PEFT's own get_delta_weight per wrapper, sliced per expert (Qwen3-MoE stores (E, out, in))."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in pm.named_modules():
        if isinstance(module, ParamWrapper):
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            delta = module.get_delta_weight("default").detach().double().numpy()
            for e in range(module.num_experts):
                out[f"{clean}.{module.parameter_name}[{e}]"] = delta[e]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_rows_equal_per_pair_and_dense_peft(tmp_path: Path, dtype: str) -> None:
    pm = _peft_qwen3_moe(tmp_path, getattr(torch, dtype))
    deltas = _peft_deltas(pm)
    pairs = load_adapter(str(tmp_path)).pairs
    assert sum(p.expert is not None for p in pairs) == len(deltas) == 2 * 2 * 6
    got = [la.to_row() for la in audit_pairs(pairs)]
    _assert_rows_match(got, _per_pair_rows(pairs))
    rows = {row["name"]: row for row in got}
    for name, delta in deltas.items():  # dense numpy reference, independent of both paths
        sigma = np.linalg.svd(delta, compute_uv=False)[:3]
        row = rows[name]
        np.testing.assert_allclose(np.asarray(row["singular_values"]) * row["scale"], sigma, rtol=1e-5,
                                   atol=1e-6 * sigma[0])
        stable = float(np.sum(sigma**2) / sigma[0] ** 2)
        assert row["stable_rank"] == pytest.approx(stable, rel=1e-5)
        assert row["utilization"] == pytest.approx(stable / 3, rel=1e-5)
        p = sigma / sigma.sum()
        assert row["effective_rank"] == pytest.approx(math.exp(-float(np.sum(p * np.log(p)))), rel=1e-5)
        assert row["expert"] == int(name.rpartition("[")[2][:-1]) and row["num_experts"] == 6


# -- stacked factors with the awkward cases ------------------------------------------------------------------


def _stacked_adapter(out: Path, experts: int, r: int, d_in: int, d_out: int, dtype: Any) -> dict[str, np.ndarray]:
    """One expert wrapper as PEFT saves it: A (r·E, in), B (out, r·E) with expert e's B every E-th column.
    Expert 1: B = 0 (never routed); expert 2: A rank-deficient (refined path); the rest graded spectra."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(7)
    a = rng.standard_normal((experts, r, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal((d_out, r, experts)) * np.exp(-np.arange(r) / 1.5)[None, :, None] * 0.02
    b[:, :, 1] = 0.0
    a[2, -1] = a[2, 0]  # two equal rows: a rank-deficient A_2
    tensors = {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": a.reshape(experts * r, d_in),
               "base_model.model.model.layers.0.mlp.experts.lora_B.weight": b.reshape(d_out, r * experts)}
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [],
        "target_parameters": ["mlp.experts.down_proj"]}))
    return {"a": a, "b": b}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("chunk", [200, 60])
def test_batched_rows_equal_per_pair_over_several_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         dtype: str, chunk: int) -> None:
    import gradience.audit.stacked as stacked

    # 200: several expert chunks of A (whole rows) and row chunks of B; 60: A in column blocks, B row by row
    monkeypatch.setattr(stacked, "_STACK_CHUNK_ELEMS", chunk)
    _stacked_adapter(tmp_path, experts=11, r=4, d_in=37, d_out=29, dtype=getattr(torch, dtype))
    pairs = load_adapter(str(tmp_path)).pairs
    assert [p.expert for p in pairs] == list(range(11))
    got = [la.to_row() for la in audit_pairs(pairs)]
    _assert_rows_match(got, _per_pair_rows(pairs))
    assert got[1]["status"] == "zero_update" and got[0]["status"] == "ok"
    assert got[2]["energy_rank_99"] <= 3  # the rank-deficient expert: its zero direction found


def test_stacked_grams_non_finite_and_huge_experts_take_the_per_pair_gram(tmp_path: Path) -> None:
    """NaN in one expert's B, F64 factors ~1e200 in another (Gram overflows: power-of-two rescale), and an
    underflowing ~1e-170 one: each expert's Gram is the one :func:`pair_grams` gives for its own slices."""
    rng = np.random.default_rng(3)
    e, r, d_in, d_out = 5, 3, 9, 7
    a = rng.standard_normal((e, r, d_in))
    b = rng.standard_normal((d_out, r, e))
    b[4, 1, 0] = np.nan
    a[1] *= 1e200
    b[:, :, 1] *= 1e150
    a[3] *= 1e-170
    stacked = stacked_pair_grams(a, b)
    for i, (ga, gb) in enumerate(stacked):
        wa, wb = pair_grams(a[i], b[:, :, i])
        for got, want in ((ga, wa), (gb, wb)):
            assert (got.exp, got.finite) == (want.exp, want.finite)
            np.testing.assert_allclose(got.g, want.g, rtol=1e-12, atol=0)
    assert not stacked[0][1].finite and stacked[1][0].exp > 0 and stacked[3][0].exp < 0
    sig, _ = singular_values_many(stacked, lambda i: (a[i], b[:, :, i]))
    dense = np.linalg.svd(b[:, :, 2] @ a[2], compute_uv=False)[:r]
    np.testing.assert_allclose(sig[2], dense, rtol=1e-10)
    assert np.isnan(sig[0]).all()


def test_stacked_grams_refuse_mismatched_stacks() -> None:
    with pytest.raises(ValueError):
        stacked_pair_grams(np.zeros((4, 2, 5)), np.zeros((3, 2, 5)))


def test_spectrum_metrics_many_equals_per_row() -> None:
    rng = np.random.default_rng(5)
    rows = [np.sort(rng.random(6))[::-1] for _ in range(20)]
    rows += [np.zeros(6), np.array([2.0, 1.0, 1.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
             np.array([1e-300, 1e-301, 0.0, 0.0, 0.0, 0.0]), np.array([3.0, 0.0, 0.0, 0.0, 0.0, 0.0])]
    many = spectrum_metrics_many(np.stack(rows), 6)
    for sigma, got in zip(rows, many, strict=True):
        want = spectrum_metrics(sigma, 6)
        for field in want.__dataclass_fields__:
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-12, abs=0), field
    # hand-computed: σ = (2, 1, 1, 0): stable rank 6/4, energy 4/6 then 5/6 then 1 -> k90 = 3
    m = spectrum_metrics_many(np.array([[2.0, 1.0, 1.0, 0.0]]), 4)[0]
    assert (m.stable_rank, m.utilization, m.energy_rank_90) == (1.5, 0.375, 3)
    assert m.effective_rank == pytest.approx(effective_rank(np.array([2.0, 1.0, 1.0])))
    assert spectrum_metrics_many(np.zeros((0, 4)), 4) == []


def test_float_stacks_equal_stack_slices(tmp_path: Path) -> None:
    from gradience.adapter.experts import expert_stack

    ref = _stacked_adapter(tmp_path, experts=4, r=2, d_in=6, d_out=5, dtype=torch.float32)
    for pair in load_adapter(str(tmp_path)).pairs:
        found = expert_stack(pair)
        assert found is not None
        group, e = found
        stack_a, stack_b = group.float_stacks()
        a, b = stack_a[e * 2:(e + 1) * 2], stack_b[e]
        np.testing.assert_array_equal(a, ref["a"][e].astype(np.float32))
        np.testing.assert_array_equal(b, ref["b"][:, :, e].astype(np.float32))
        la, lb = pair.load_factors()
        np.testing.assert_array_equal(a, la)
        np.testing.assert_array_equal(b, lb)


def test_in_memory_state_dict_takes_the_batched_path_too(tmp_path: Path) -> None:
    """A training callback's state dict (torch tensors, no mapped file): same rows as the saved adapter, and no
    whole-stack float copy is kept by either (memory holds one stacked parameter at a time)."""
    from peft import get_peft_model_state_dict

    from gradience.adapter import adapter_from_state_dict
    from gradience.adapter.experts import expert_stack

    pm = _peft_qwen3_moe(tmp_path, torch.float32)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from_file = load_adapter(str(tmp_path)).pairs
    in_memory = adapter_from_state_dict(get_peft_model_state_dict(pm), config).pairs
    got = [la.to_row() for la in audit_pairs(in_memory)]
    want = [la.to_row() for la in audit_pairs(from_file)]
    _assert_rows_match([{k: v for k, v in row.items() if k != "peft_prefix"} for row in got],
                       [{k: v for k, v in row.items() if k != "peft_prefix"} for row in want], rtol=1e-12)
    for pairs in (in_memory, from_file):
        groups = {id(found[0]): found[0] for p in pairs if (found := expert_stack(p)) is not None}
        assert len(groups) == 4 and all(g._factors is None for g in groups.values())
