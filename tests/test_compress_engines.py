"""Engine claims of compress against the engines that run here (issue 17 item 5).

PEFT rows with real PEFT on a tiny Llama; the vLLM rows against PEFTHelper's documented behaviour
(tests/test_engines.py); llama.cpp rows through the gguf reader belong to verify/export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main

pytest.importorskip("peft")


def _bias_adapter(base_dir: Path, out: Path, **lora: Any) -> Path:
    """A real PEFT adapter with lora_bias=True whose A, B and lora_B biases are all random (non-zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    _save_peft(model, out, seed=3, randomize="lora_", lora_bias=True, **lora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _lora_modules(adapter: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).to(torch.float64).eval()
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.r}, model


def _biased_llama(out: Path) -> Path:
    """A 2-layer tiny Llama whose attention and MLP projections have biases (PEFT merges lora_B's bias into
    the base layer's bias, so the base needs one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    return out


@pytest.mark.slow
def test_lora_bias_is_scaled_like_the_factors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT multiplies lora_B's bias by the module scale (forward and merge): after compress changes the scale
    to α/k, each module's bias term s·b must be what it was (issue 17: it was applied r/k times too strongly)."""
    import torch

    base = _biased_llama(tmp_path / "base")
    src = _bias_adapter(base, tmp_path / "in", r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "out"
    assert main(["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["non_lora_tensors"]["lora_biases_rescaled"] == len(doc["layers"]) > 0
    before, _ = _lora_modules(src)
    after, model_after = _lora_modules(out)
    assert set(before) == set(after)
    for name, mod_in in before.items():
        mod_out = after[name]
        x0 = torch.zeros(1, mod_in.in_features, dtype=torch.float64)
        with torch.no_grad():
            # forward on x = 0: the LoRA path contributes exactly scaling · lora_B.bias
            lora_in = mod_in(x0) - mod_in.base_layer(x0)
            lora_out = mod_out(x0) - mod_out.base_layer(x0)
        np.testing.assert_allclose(lora_out.numpy(), lora_in.numpy(), rtol=1e-6, atol=1e-9)
        assert mod_out.r["default"] == 3 and mod_out.scaling["default"] == pytest.approx(16 / 3)
    # merge: the merged base bias moves by the same s·b as with the input adapter
    _, model_in = _lora_modules(src)
    merged_in = model_in.merge_and_unload()
    merged_out = model_after.merge_and_unload()
    for name in before:
        b_in = merged_in.get_submodule(name).bias.detach().numpy()
        b_out = merged_out.get_submodule(name).bias.detach().numpy()
        np.testing.assert_allclose(b_out, b_in, rtol=1e-6, atol=1e-9)
    port = doc["portability"]
    assert port["peft"]["ok"]
    assert not port["vllm"]["ok"] and "rejected outright" in port["vllm"]["reason"]
    assert "vllm.lora_bias" in port["vllm"]["rules"]
    assert not port["llama_cpp"]["ok"] and "llama_cpp.lora_bias" in port["llama_cpp"]["rules"]

    # kept at its rank but rescaled (rsLoRA input: scale α/√r becomes α/r): ΔW and the bias term unchanged
    rs = _bias_adapter(base, tmp_path / "rs", r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"])
    out_rs = tmp_path / "out_rs"
    assert main(["compress", "--peft-dir", str(rs), "--out", str(out_rs), "--rank", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {row["method"] for row in doc["layers"]} == {"rescale"}
    assert doc["non_lora_tensors"]["lora_biases_rescaled"] == len(doc["layers"])
    before, _ = _lora_modules(rs)
    after, _ = _lora_modules(out_rs)
    for name, mod_in in before.items():
        mod_out = after[name]
        x0 = torch.zeros(1, mod_in.in_features, dtype=torch.float64)
        with torch.no_grad():
            np.testing.assert_allclose((mod_out(x0) - mod_out.base_layer(x0)).numpy(),
                                       (mod_in(x0) - mod_in.base_layer(x0)).numpy(), rtol=1e-6, atol=1e-9)
            want = mod_in.get_delta_weight("default").numpy()
            # the rescaled factors are stored as float32 again: float32 rounding of the products
            np.testing.assert_allclose(mod_out.get_delta_weight("default").numpy(), want, rtol=0,
                                       atol=1e-6 * np.abs(want).max())


def _save_peft(model: Any, out: Path, *, seed: int = 5, randomize: str = "lora_B", **lora: Any) -> Path:
    """Wrap ``model`` with PEFT LoRA, set every parameter whose name holds ``randomize`` to seeded N(0, 0.3²),
    save to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if randomize in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_score_head_and_saved_norm_verdicts(tiny_llama_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A real PEFT classification adapter (modules_to_save = score) is fine for current vLLM and stops the
    llama.cpp converter; a saved norm passes the converter and is dropped at run time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=3, dtype=torch.float32)
    head = _save_peft(cls, tmp_path / "cls", r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["q_proj"])
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    norm = _save_peft(lm, tmp_path / "norm", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    verdicts = {}
    for src in (head, norm):
        assert main(["compress", "--peft-dir", str(src), "--dry-run", "--rank", "2", "--json"]) == 0
        verdicts[src.name] = json.loads(capsys.readouterr().out)["portability"]
    v = verdicts["cls"]
    assert v["peft"]["ok"] and v["vllm"]["ok"] and v["vllm"]["version"] == ">= 0.33.0"
    assert not v["llama_cpp"]["ok"] and v["llama_cpp"]["rules"] == ["llama_cpp.non_lora_tensor"]
    v = verdicts["norm"]
    assert not v["llama_cpp"]["ok"] and v["llama_cpp"]["rules"] == ["llama_cpp.norm_dropped"]
    assert "silently dropped at run time" in v["llama_cpp"]["reason"]
    assert not v["vllm"]["ok"] and v["vllm"]["rules"] == ["vllm.modules_to_save"]
