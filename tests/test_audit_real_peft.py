"""The audit on real PEFT adapters (made by PEFT's save_pretrained), checked against PEFT's own ΔW.

The reference is independent of our reader: PEFT loads the adapter onto the tiny base model (float64), and
each LoRA module's ``get_delta_weight`` (PEFT's scaling, fan_in_fan_out handling, patterns) is densely
SVD-ed with numpy. Per-layer rank suggestions are applied back through a real ``LoraConfig``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit import AuditOptions, run_audit

pytest.importorskip("peft")
TOL = 1e-8


def _arch(adapter_dir: Path) -> str:
    import json

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return "gpt2" if "gpt2" in base else "distilbert" if "distilbert" in base else "llama"


def _load_base(base_dir: str, seq_cls: bool = False) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        return AutoModelForSequenceClassification.from_pretrained(base_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(base_dir)
    except ValueError:
        return AutoModel.from_pretrained(base_dir)


def peft_deltas(adapter_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, int]]:
    """{module name: dense float64 ΔW}, {name: PEFT scaling}, {name: PEFT r} from PEFT itself."""
    import json

    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = _load_base(cfg["base_model_name_or_path"], seq_cls=cfg.get("task_type") == "SEQ_CLS")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(torch.float64)
    deltas, scales, ranks = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            key = name.removeprefix("base_model.model.")
            with torch.no_grad():
                deltas[key] = module.get_delta_weight("default").detach().cpu().numpy().astype(np.float64)
            scales[key] = float(module.scaling["default"])
            ranks[key] = int(module.r["default"])
    return deltas, scales, ranks


def _reference_metrics(delta: np.ndarray, scale: float, r: int) -> dict[str, Any]:
    s = np.linalg.svd(delta, compute_uv=False)[:r] / abs(scale)
    s = np.pad(s, (0, r - s.size))
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    p = s[s > 1e-14 * s[0]] / s.sum()
    return {
        "sigma": s, "sigma_max": s[0], "frob_norm": float(np.linalg.norm(delta)) / abs(scale),
        "delta_frob_norm": float(np.linalg.norm(delta)), "delta_sigma_max": float(s[0] * abs(scale)),
        "stable_rank": float(np.sum(s ** 2) / s[0] ** 2), "utilization": float(np.sum(s ** 2) / s[0] ** 2) / r,
        "effective_rank": math.exp(-float(np.sum(p * np.log(p)))),
        "k": [int(np.searchsorted(energy, t - 1e-12) + 1) for t in (0.9, 0.95, 0.99)],
    }


ADAPTERS = ["llama_adapter_dir", "llama_adapter_bf16_dir", "llama_adapter_patterns_dir", "llama_adapter_trained_dir",
            "gpt2_adapter_dir", "llama_adapter_dora_dir", "distilbert_seqcls_adapter_dir"]


@pytest.mark.slow
@pytest.mark.parametrize("fixture_name", ADAPTERS)
def test_audit_matches_peft_delta_weights(fixture_name: str, request: pytest.FixtureRequest) -> None:
    adapter_dir: Path = request.getfixturevalue(fixture_name)
    deltas, scales, ranks = peft_deltas(adapter_dir)
    summary = run_audit(load_adapter(str(adapter_dir))).to_summary()
    rows = {row["name"]: row for row in summary["layers"]}
    assert set(rows) == set(deltas), "every PEFT LoRA module is audited, under its base-model name"
    for name, delta in deltas.items():
        row = rows[name]
        assert row["r"] == ranks[name]
        assert row["scale"] == pytest.approx(scales[name], rel=1e-12)
        ref = _reference_metrics(delta, scales[name], ranks[name])
        np.testing.assert_allclose(row["singular_values"], ref["sigma"], rtol=0, atol=TOL * ref["sigma_max"])
        for key in ("sigma_max", "frob_norm", "delta_frob_norm", "delta_sigma_max", "stable_rank", "utilization",
                    "effective_rank"):
            assert row[key] == pytest.approx(ref[key], rel=TOL), (name, key)
        assert [row["energy_rank_90"], row["energy_rank_95"], row["energy_rank_99"]] == ref["k"], name
        if fixture_name == "llama_adapter_dora_dir":
            assert row["dora"] is True
    if fixture_name == "distilbert_seqcls_adapter_dir":
        assert summary["non_lora_tensors"]["count"] > 0
        assert any(i["code"] == "non_lora_tensors" for i in summary["issues"])
    assert summary["total_lora_params"] == sum(row["params"] for row in rows.values())


@pytest.mark.slow
def test_zero_init_adapter_is_reported_as_zero_update(llama_adapter_zero_dir: Path) -> None:
    summary = run_audit(load_adapter(str(llama_adapter_zero_dir))).to_summary()
    issue = next(i for i in summary["issues"] if i["code"] == "zero_update")
    assert sorted(issue["modules"]) == sorted(row["name"] for row in summary["layers"])
    assert summary["suggested_r_global_median"] is None
    assert all(row["stable_rank"] == 0 and row["energy_rank_90"] == 0 for row in summary["layers"])


def _apply_suggestion(base_dir: str, adapter_dir: Path, rs: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """Build a LoraConfig from the audit JSON, apply it with real PEFT, return {module: (r, scaling)}."""
    import json

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    config = LoraConfig(r=rs["default_r"], lora_alpha=rs["lora_alpha"], rank_pattern=rs["rank_pattern"],
                        alpha_pattern=rs["alpha_pattern"], use_rslora=rs["use_rslora"],
                        target_modules=cfg["target_modules"], fan_in_fan_out=cfg.get("fan_in_fan_out", False))
    model = get_peft_model(_load_base(base_dir), config)
    return {name.removeprefix("base_model.model."): (int(m.r["default"]), float(m.scaling["default"]))
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r}


@pytest.mark.slow
@pytest.mark.parametrize("fixture_name,allowed,margin", [
    ("llama_adapter_patterns_dir", (1, 2, 3, 4, 5, 6, 7, 8), 1.0),   # rsLoRA + rank/alpha patterns
    ("llama_adapter_trained_dir", (1, 2, 3, 4, 5, 6, 7, 8), 1.0),
    ("llama_adapter_dir", (1, 2, 4, 8), 0.4),
    ("gpt2_adapter_dir", (1, 2, 3, 4, 5, 6, 7, 8), 1.0),
])
def test_per_layer_suggestion_round_trips_through_real_peft(
    fixture_name: str, allowed: tuple[int, ...], margin: float, request: pytest.FixtureRequest,
    tiny_llama_dir: Path, tiny_gpt2_dir: Path,
) -> None:
    adapter_dir: Path = request.getfixturevalue(fixture_name)
    base_dir = str(tiny_gpt2_dir if fixture_name.startswith("gpt2") else tiny_llama_dir)
    _, original_scales, _ = peft_deltas(adapter_dir)
    opts = AuditOptions(suggest_per_layer=True, allowed_ranks=allowed, margin=margin)
    rs = run_audit(load_adapter(str(adapter_dir)), opts).to_summary()["rank_suggestions"]
    expected_r = {row["name"]: row["suggested_r"] for row in rs["layers"]}
    assert len(set(expected_r.values())) > 1, "the case must exercise rank_pattern"
    applied = _apply_suggestion(base_dir, adapter_dir, rs)
    assert set(applied) == set(expected_r)
    for name, (r, scaling) in applied.items():
        assert r == expected_r[name], name
        assert scaling == pytest.approx(original_scales[name], rel=1e-12), name
    # the suggestion never raises a rank and honours the margin
    for row in rs["layers"]:
        assert row["suggested_r"] <= row["current_r"]
        assert row["suggested_r"] in allowed or row["suggested_r"] == row["current_r"]
        assert row["suggested_r"] >= min(margin * row["energy_rank_90"], row["current_r"])
    assert rs["params_at_suggested"] == sum(row["params_at_suggested"] for row in rs["layers"])


@pytest.mark.slow
def test_audit_state_dict_matches_file_audit(llama_adapter_dir: Path) -> None:
    """The in-memory entry point (training callbacks) gives the same numbers as auditing the saved files."""
    import json

    from safetensors.numpy import load_file

    from gradience.audit import audit_state_dict

    tensors = load_file(str(adapter_dir_weights := llama_adapter_dir / "adapter_model.safetensors"))
    assert adapter_dir_weights.exists()
    config = json.loads((llama_adapter_dir / "adapter_config.json").read_text())
    mem = audit_state_dict(tensors, config).to_summary(include_layers=True)
    disk = run_audit(load_adapter(str(llama_adapter_dir))).to_summary()
    assert "layers" not in audit_state_dict(tensors, config).to_summary(include_layers=False)
    for a, b in zip(sorted(mem["layers"], key=lambda r: r["name"]), sorted(disk["layers"], key=lambda r: r["name"]), strict=True):
        assert a["name"] == b["name"]
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-12)
    assert mem["stable_rank_mean"] == pytest.approx(disk["stable_rank_mean"], rel=1e-12)
