"""Mutated-base initialisations (SPEC §2): PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA saved without conversion.

Such an adapter's s·B·A holds components of the base weight (PEFT rewrote W ← W − s·B₀A₀ at init), so it is not
a delta from the published base: the audit warns (``mutated_base_init``) and computes no UDR. An adapter saved
with PEFT's ``path_initial_model_for_weight_conversion`` (rank 2r, ``init_lora_weights: true``) is a plain delta;
its UDR is checked against the merged model minus the *original* base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.adapter.config import mutated_base_init
from gradience.audit.core import AuditOptions, run_audit
from gradience.audit.render import render_text


def _llama(base_dir: Path) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


def _perturb_b(peft_model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _audit(adapter: Path, base: Path, tmp_path: Path) -> dict[str, Any]:
    opts = AuditOptions(udr=True, base_model=str(base), base_norms_cache=str(tmp_path / "norms.json"))
    return run_audit(load_adapter(str(adapter)), opts).to_summary()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_unconverted_mutated_init_warns_and_skips_udr(init: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_llama(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=init, lora_dropout=0.0))
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == init
    summary = _audit(tmp_path / "adapter", tiny_llama_dir, tmp_path)
    issue = next(i for i in summary["issues"] if i["code"] == "mutated_base_init")
    assert issue["severity"] == "warning" and issue["init_lora_weights"] == init
    assert "not a change to the published base" in issue["message"] and "UDR/SDI are not computed" in issue["message"]
    assert "path_initial_model_for_weight_conversion" in issue["message"]
    assert summary["udr_requested"] is False and summary["udr_median"] is None
    assert all(row["udr"] is None and row["base_sigma_max"] is None for row in summary["layers"])
    # The rank metrics still stand (the factors are real; PiSSA's s·B·A is a rank-4 slice of W).
    assert all(row["energy_rank_90"] is not None for row in summary["layers"])
    assert "mutated_base_init" in render_text(summary, top_wasteful=3)


def test_converted_pissa_is_a_plain_delta_with_correct_udr(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """PEFT's documented conversion flow; the converted adapter's UDR equals that of merged − original base."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import load_file

    pm = get_peft_model(_llama(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights="pissa", lora_dropout=0.0))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    _perturb_b(pm, 0)
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    assert mutated_base_init(cfg) is None

    summary = _audit(tmp_path / "converted", tiny_llama_dir, tmp_path)
    assert "mutated_base_init" not in {i["code"] for i in summary["issues"]}
    assert summary["n_layers_with_udr"] == 4
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    merged = PeftModel.from_pretrained(_llama(tiny_llama_dir), str(tmp_path / "converted")).merge_and_unload()
    state = {k: v.to(torch.float64).numpy() for k, v in merged.state_dict().items()}
    for row in summary["layers"]:
        w = original[row["name"] + ".weight"].astype(np.float64)
        delta = state[row["name"] + ".weight"] - w
        sv = np.linalg.svd(delta, compute_uv=False)
        assert row["udr"] == pytest.approx(sv[0] / np.linalg.svd(w, compute_uv=False)[0], rel=1e-3)


def test_config_values_with_real_lora_configs() -> None:
    """Every init PEFT accepts, through its own LoraConfig (so the saved spelling is PEFT's)."""
    from peft import LoraConfig

    def cfg(**kw: Any) -> dict[str, Any]:
        return json.loads(json.dumps(LoraConfig(r=4, target_modules=["q_proj"], **kw).to_dict(), default=str))

    mutated = {"pissa": cfg(init_lora_weights="pissa"), "pissa_niter_16": cfg(init_lora_weights="pissa_niter_16"),
               "olora": cfg(init_lora_weights="olora"), "corda": cfg(init_lora_weights="corda"),
               # LoraConfig refuses LoftQ without scipy (not a dependency here): its saved form, as PEFT writes it.
               "loftq": {**cfg(), "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
               "lora_ga": cfg(init_lora_weights="lora_ga")}
    for init, config in mutated.items():
        assert mutated_base_init(config) == init, init
    for init in (True, False, "gaussian", "eva", "orthogonal", "mica"):
        assert mutated_base_init(cfg(init_lora_weights=init)) is None, init
    assert mutated_base_init({}) is None and mutated_base_init({"init_lora_weights": 3}) is None
    assert mutated_base_init({"init_lora_weights": "PiSSA"}) == "PiSSA"


def test_loftq_adapter_file_warns_with_its_own_reason(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    rng = np.random.default_rng(0)
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "init_lora_weights": "loftq",
                                                              "peft_type": "LORA"}))
    result = run_audit(load_adapter(str(tmp_path)), AuditOptions(udr=False))
    issue = next(i for i in result.issues if i.code == "mutated_base_init")
    assert "quantized" in issue.message and issue.severity == "warning"
