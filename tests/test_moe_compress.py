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

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

E, R = 4, 4
_MODELS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=12, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=E, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
}


def _base(model_type: str) -> Any:
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=12,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, **_MODELS[model_type])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def make_moe_adapter(model_type: str, out: Path, *, seed: int = 0, r: int = R, use_rslora: bool = False) -> None:
    """A PEFT target_parameters adapter whose experts have different spectra: expert e's rank-j direction is
    scaled by decay_e^j (so an energy policy asks a different k per expert) and expert E-1 is left untrained
    (B_e = 0, as PEFT's init leaves an expert no token was routed to)."""
    lora = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj"], use_rslora=use_rslora,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(_base(model_type), lora)
    from peft.tuners.lora.layer import ParamWrapper

    gen = torch.Generator().manual_seed(seed)
    decays = [0.9, 0.3, 0.05, 1.0]
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, ParamWrapper):
                w_b = module.lora_B["default"].weight  # (out, r·E): expert e's rank-j column at j·E + e
                w_b.copy_(torch.randn(w_b.shape, generator=gen))
                module.lora_A["default"].weight.copy_(torch.randn(module.lora_A["default"].weight.shape,
                                                                  generator=gen))
                for e in range(module.num_experts):
                    for j in range(r):
                        w_b[:, j * module.num_experts + e] *= decays[e] ** j if e < module.num_experts - 1 else 0.0
    pm.save_pretrained(out)


def peft_expert_deltas(adapter: Path, model_type: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PEFT's get_delta_weight per expert, in (out, in) orientation, and each parameter's rank."""
    from peft.tuners.lora.layer import ParamWrapper

    pm = peft.PeftModel.from_pretrained(_base(model_type), str(adapter))
    deltas, ranks = {}, {}
    for name, module in pm.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        param = f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{module.parameter_name}"
        ranks[param] = module.r["default"]
        delta = module.get_delta_weight("default").detach().double().numpy()
        for e in range(module.num_experts):
            deltas[f"{param}[{e}]"] = delta[e] if module._did_swap_in_out_features else delta[e].T
    return deltas, ranks


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


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(_MODELS))
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


@pytest.mark.slow
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
