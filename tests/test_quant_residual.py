"""QLoRA merge residual ‖W₁₆ − deq(Q(W₁₆))‖ / ‖s·B·A‖: against bitsandbytes' own quantise/de-quantise round trip,
and through ``gradience audit --qlora`` on a real PEFT adapter over a 16-bit base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradience.quant.residual import quantization_residual, residual_issue, residual_rows, trained_on_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_residual_matches_bitsandbytes_round_trip(quant_type: str) -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    expect = float(torch.linalg.norm(w.float() - functional.dequantize_4bit(q, state).float()))
    ours = quantization_residual(w.float().numpy(), quant_type, 64, "bfloat16")
    assert ours == pytest.approx(expect, rel=1e-6)


def test_residual_is_zero_on_representable_weights() -> None:
    # every block holds its absmax and values of the NF4 table times it: Q is exact
    from gradience.quant.bnb4 import NF4_CODE

    w = np.tile(np.asarray(NF4_CODE, np.float32) * 2.0, 8).reshape(8, 16)
    assert quantization_residual(w, "nf4", 64, "float32") == 0.0


def test_issue_names_worst_layer() -> None:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    rows = residual_rows([("a", w, 1e3), ("b", w, 1e-3)], dtype="float32")
    issue = residual_issue(rows)
    assert issue is not None and issue.modules == ["b"] and "worst" in issue.message
    assert rows[0].ratio is not None and rows[0].ratio < 1 < (rows[1].ratio or 0)
    assert trained_on_4bit({"base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"})
    assert not trained_on_4bit({"base_model_name_or_path": "meta-llama/Llama-3-8B"})


@pytest.mark.slow
def test_audit_qlora_flag(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    w = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg), lora)
    with torch.no_grad():  # a small update: the residual dominates
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-4)
    pm.save_pretrained(tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "-m", "gradience", "audit", str(tmp_path / "adapter"), "--base-model",
                           str(tmp_path / "base"), "--qlora", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    (row,) = summary["qlora"]["layers"]
    delta = next(r for r in summary["layers"])["delta_frob_norm"]
    assert row["residual_frob"] == pytest.approx(quantization_residual(w, "nf4", 64, "bfloat16"), rel=1e-6)
    assert row["ratio"] == pytest.approx(row["residual_frob"] / delta, rel=1e-6) and row["ratio"] > 1
    assert summary["qlora"]["merge_into"] == "dequantized_4bit"
    assert "qlora_merge_residual" in [i["code"] for i in summary["issues"]]
