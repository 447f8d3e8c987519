"""compress of MoE expert LoRA (PEFT target_parameters) against real PEFT on tiny transformers MoE models.

The reference is independent of our reader: PEFT's own ``get_delta_weight`` of every ParamWrapper of the input,
sliced per expert and truncated by a dense numpy SVD to the rank the output config gives that parameter; the
compressed adapter must load in PEFT and its ``get_delta_weight`` per expert must equal that truncation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from support.moe_models import MODELS, E, R, make_moe_adapter, peft_expert_deltas


def _truncate(dw: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _energy_rank(dw: np.ndarray, t: float) -> int:
    s2 = np.linalg.svd(dw, compute_uv=False) ** 2
    if s2.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), t * (1 - 1e-9)) + 1)


def _compress(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main(["compress", str(src), "--out", str(out), "--json", *flags]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_energy_compress_one_rank_per_stack_matches_peft(tmp_path: Path, model_type: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_moe_adapter(model_type, src, use_rslora=model_type == "gpt_oss")
    before, ranks_before = peft_expert_deltas(src, model_type)
    doc = _compress(src, out, capsys, "--energy", "0.9")
    after, ranks_after = peft_expert_deltas(out, model_type)
    assert set(after) == set(before) and len(before) == 2 * 2 * E
    rows = {row["name"]: row for row in doc["layers"]}
    for param, r_in in ranks_before.items():
        # K = the largest per-expert energy rank (dense numpy), the one rank PEFT gives the stack
        k = max(_energy_rank(before[f"{param}[{e}]"], 0.9) for e in range(E))
        assert ranks_after[param] == k < r_in
        for e in range(E):
            name = f"{param}[{e}]"
            ref = _truncate(before[name], k)
            np.testing.assert_allclose(after[name], ref, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(ref).max()))
            row = rows[name]
            assert (row["expert"], row["num_experts"], row["parameter"], row["r_after"]) == (e, E, param, k)
            s2 = np.linalg.svd(before[name], compute_uv=False) ** 2
            want = 1.0 if s2.sum() == 0 else s2[:k].sum() / s2.sum()
            assert row["energy_retained"] == pytest.approx(want, rel=1e-6)
    # the untrained expert stays exactly zero; the ordinary q_proj modules are compressed as before
    assert all(not after[f"{p}[{E - 1}]"].any() for p in ranks_before)
    assert any(row["name"].endswith("q_proj") and "expert" not in row for row in doc["layers"])


def test_rank_pattern_budget_and_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    make_moe_adapter("qwen3_moe", src, seed=1)
    before, _ = peft_expert_deltas(src, "qwen3_moe")
    # --rank R keeps every stack as it is: bytes copied
    doc = _compress(src, tmp_path / "same", capsys, "--rank", str(R))
    assert {row["method"] for row in doc["layers"]} == {"copy"}
    # --budget: each stack is one item; the result fits the budget and loads with its ranks
    doc = _compress(src, tmp_path / "budget", capsys, "--budget", "50%")
    assert doc["summary"]["params_after"] <= doc["policy"]["budget_params"]
    after, ranks_after = peft_expert_deltas(tmp_path / "budget", "qwen3_moe")
    cfg = json.loads((tmp_path / "budget" / "adapter_config.json").read_text())
    by_param: dict[str, set[int]] = {}
    for row in doc["layers"]:
        if "expert" in row:
            by_param.setdefault(row["parameter"], set()).add(row["r_after"])
    assert any(param in cfg["rank_pattern"] for param in by_param)  # a stack's own K, keyed as PEFT reads it
    for param, ks in by_param.items():
        assert len(ks) == 1 and ranks_after[param] == next(iter(ks))
        assert ranks_after[param] == cfg["rank_pattern"].get(param, cfg["r"])
        for e in range(E):
            np.testing.assert_allclose(after[f"{param}[{e}]"], _truncate(before[f"{param}[{e}]"], ranks_after[param]),
                                       rtol=1e-5, atol=1e-6)


def test_uniform_bf16_and_assumed_wrapper_pattern(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft.utils.other import get_pattern_key

    from gradience.adapter import load_adapter
    from gradience.audit.suggest import unique_pattern_key
    from gradience.compress.experts import rank_pattern

    src = tmp_path / "in"
    make_moe_adapter("gpt_oss", src, seed=2)
    before, _ = peft_expert_deltas(src, "gpt_oss")
    doc = _compress(src, tmp_path / "u", capsys, "--rank", "2", "--uniform", "--dtype", "bfloat16")
    cfg = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {} and doc["output"]["tensor_dtypes"] == {"BF16": 12}
    after, ranks = peft_expert_deltas(tmp_path / "u", "gpt_oss")
    assert set(ranks.values()) == {2}
    for name, dw in before.items():  # bf16 factors: rounding of the factors only
        ref = _truncate(dw, 2)
        assert np.linalg.norm(after[name] - ref) <= 1e-2 * max(np.linalg.norm(ref), 1e-12)
    # a module whose wrapper -> parameter assignment was assumed: one key that PEFT matches to both of its
    # parameters and to nothing else
    pairs = load_adapter(str(src)).pairs
    module = "model.layers.0.mlp.experts"
    ks = [3 if p.expert is not None and p.name.startswith(module + ".") else 2 for p in pairs]
    pattern = rank_pattern(pairs, ks, 2, {module}, unique_pattern_key, [])
    assert list(pattern.values()) == [3]
    (key,) = pattern
    for name, hit in ((f"{module}.gate_up_proj", True), (f"{module}.down_proj", True),
                      ("model.layers.1.mlp.experts.down_proj", False), (f"x.{module}.down_proj", False)):
        assert (get_pattern_key([key], name) == key) is hit, name


def test_mixed_factor_dtypes_keep_each_sides_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lora_B stored F64 next to an F32 lora_A (the writer orders tensors by dtype, so B is produced first): each
    side is written in its own stored dtype, for expert stacks and ordinary modules alike."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "in"
    make_moe_adapter("qwen3_moe", src, seed=3)
    before, _ = peft_expert_deltas(src, "qwen3_moe")
    weights = load_file(src / "adapter_model.safetensors")
    save_file({k: v.astype(np.float64) if ".lora_B." in k else v for k, v in weights.items()},
              src / "adapter_model.safetensors")
    _compress(src, tmp_path / "out", capsys, "--rank", "2")
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {k: v.dtype for k, v in out.items()} == {k: np.dtype("float64" if ".lora_B." in k else "float32")
                                                    for k in weights}
    after, _ = peft_expert_deltas(tmp_path / "out", "qwen3_moe")
    for name, dw in before.items():
        np.testing.assert_allclose(after[name], _truncate(dw, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coef", [0.7, -1.3])
def test_batched_gram_truncation_against_dense_svd(coef: float) -> None:
    """The batched per-expert Gram truncation: B'_e·A'_e = coef·(B_e·A_e)_k (dense numpy SVD) for every expert
    it takes; zero, NaN and rank-deficient experts are left to the one-pair path (ok False)."""
    from gradience.compress.factors import batched_gram_truncation

    rng = np.random.default_rng(5)
    n_exp, r, d_in, d_out, k = 6, 4, 20, 12, 2
    a3 = rng.standard_normal((n_exp, r, d_in)).astype(np.float32)
    b3 = rng.standard_normal((d_out, r, n_exp)).astype(np.float32)  # PEFT's B reshaped (out, r, E)
    b3[:, :, 1] = 0.0                                  # never adapted
    a3[2, 0, 3] = np.nan                               # broken
    b3[:, 1, 3] = b3[:, 0, 3]                          # rank-deficient B: ill-conditioned Gram
    a_new, b_new, ok = batched_gram_truncation(a3, b3, k, coef)
    assert ok.tolist() == [True, False, False, False, True, True]
    assert a_new.shape == (n_exp, k, d_in) and b_new.shape == (n_exp, d_out, k)
    for e in np.flatnonzero(ok):
        dense = b3[:, :, e].astype(np.float64) @ a3[e].astype(np.float64)
        np.testing.assert_allclose(b_new[e] @ a_new[e], coef * _truncate(dense, k), rtol=1e-10, atol=1e-12)
        # balanced split: both factors carry the same norm
        assert np.linalg.norm(a_new[e]) == pytest.approx(np.linalg.norm(b_new[e]), rel=1e-10)


def test_assumed_wrappers_share_one_rank_within_the_budget(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Parameters the reader cannot place by transformers' registration order (here ``w_in``/``w_out``): both
    wrappers of a module get one rank, and --budget counts them as one item (the result fits the budget)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    n_exp, r, hidden, inter = 4, 4, 16, 12
    tensors = {}
    for layer, decay in ((0, 0.9), (1, 0.1)):
        p = f"base_model.model.model.layers.{layer}.mlp.experts"
        for key, (d_in, d_out) in ((p + ".base_layer", (hidden, inter)), (p, (inter, hidden))):
            tensors[key + ".lora_A.weight"] = rng.standard_normal((r * n_exp, d_in)).astype(np.float32)
            b = rng.standard_normal((d_out, r, n_exp)) * (decay ** np.arange(r))[None, :, None]
            tensors[key + ".lora_B.weight"] = b.reshape(d_out, r * n_exp).astype(np.float32)
    src = tmp_path / "in"
    src.mkdir()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": [],
        "target_parameters": ["mlp.experts.w_in", "mlp.experts.w_out"]}))
    doc = _compress(src, tmp_path / "out", capsys, "--budget", "60%", "--dry-run")
    assert any(i["code"] == "expert_parameter_assumed" for i in doc["issues"])
    assert doc["summary"]["params_after"] <= doc["policy"]["budget_params"]
    by_module: dict[str, set[int]] = {}
    for row in doc["layers"]:
        by_module.setdefault(row["parameter"].rpartition(".")[0], set()).add(row["r_after"])
    assert all(len(ks) == 1 for ks in by_module.values()) and len(by_module) == 2
    ranks = {m: next(iter(ks)) for m, ks in by_module.items()}
    assert ranks["model.layers.0.mlp.experts"] > ranks["model.layers.1.mlp.experts"]  # the slow decay keeps more
    assert doc["config"]["rank_pattern"]  # the two modules' ranks differ: one is a pattern entry
    for key in doc["config"]["rank_pattern"]:
        assert key.startswith("^model\\.layers\\.") and key.endswith("\\.[^.]+")
