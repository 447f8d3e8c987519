"""The shared fixtures are real: files exist with the dtypes/layouts claimed, and PEFT/transformers load them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support import synthetic
from support.synthetic import read_safetensors_header

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file as np_load_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402


def tensor_headers(path: Path) -> dict[str, dict]:
    header = read_safetensors_header(path)
    header.pop("__metadata__", None)
    return header


def lora_prefixes(keys) -> set[str]:
    return {k.split(".lora_A.")[0] for k in keys if ".lora_A." in k}


def load_base(base_dir: Path):
    return transformers.AutoModel.from_pretrained(str(base_dir)) if "distilbert" in str(base_dir) else \
        transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))


def assert_peft_roundtrip(base_dir: Path, adapter_dir: Path, model=None) -> dict[str, torch.Tensor]:
    """PEFT loads the adapter onto the base and holds exactly the factors that are in the file."""
    file_sd = torch_load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = model if model is not None else load_base(base_dir)
    loaded = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    peft_sd = peft.get_peft_model_state_dict(loaded)
    assert set(peft_sd) == set(file_sd)
    for key, value in file_sd.items():
        torch.testing.assert_close(peft_sd[key].float(), value.float(), rtol=0, atol=0)
    return file_sd


# -- numpy synthetic writer ----------------------------------------------------------------------------------
def test_bf16_rounding_hand_cases():
    one_plus_half_ulp = 1 + 2.0**-8  # exact tie between 0x3F80 and 0x3F81: rounds to even
    one_plus_1p5_ulp = 1 + 3 * 2.0**-8  # tie between 0x3F81 and 0x3F82: rounds to even 0x3F82
    x = np.array([1.0, one_plus_half_ulp, one_plus_1p5_ulp, -2.0, np.inf, np.nan, 1 + 2.0**-8 + 2.0**-20],
                 dtype=np.float32)
    bits = synthetic.f32_to_bf16_bits(x)
    assert [hex(b) for b in bits[:5]] == ["0x3f80", "0x3f80", "0x3f82", "0xc000", "0x7f80"]
    assert np.isnan(synthetic.bf16_bits_to_f32(bits[5:6]))[0]
    assert bits[6] == 0x3F81  # just above the tie rounds up


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 100
    ours = synthetic.f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_write_safetensors_read_by_reference_library(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), dtype=np.float32) * 0.5}
    path = synthetic.write_safetensors(tmp_path / "x.safetensors", tensors, dtypes={"b": "F16"})
    loaded = np_load_file(str(path))
    np.testing.assert_array_equal(loaded["a"], tensors["a"])
    assert loaded["b"].dtype == np.float16
    np.testing.assert_array_equal(loaded["b"], tensors["b"])
    assert read_safetensors_header(path)["__metadata__"] == {"format": "pt"}


def test_synthetic_adapter_layout_and_spectrum(synthetic_adapter_dir):
    cfg = json.loads((synthetic_adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    weights = np_load_file(str(synthetic_adapter_dir / "adapter_model.safetensors"))
    assert len(weights) == 4 * 7 * 2
    assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in weights
    assert weights["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (8, 64)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 128)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    expected = {f"base_model.model.{n}" for n in synthetic.synthetic_pair_keys(4, synthetic.llama_targets(64, 128))}
    assert lora_prefixes(weights) == expected
    ratios = []
    for prefix in expected:
        a, b = weights[prefix + ".lora_A.weight"], weights[prefix + ".lora_B.weight"]
        assert np.abs(b).max() > 0
        sigma = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)[:8]
        assert np.all(np.diff(sigma) <= 0) and sigma[-1] > 0
        ratios.append(sigma[0] / sigma[-1])
    assert min(ratios) > 2  # decaying, never flat
    assert max(ratios) > 2 * min(ratios)  # and the decay differs from pair to pair


def test_synthetic_bf16_is_bf16_and_rounds_the_f32_file(synthetic_adapter_dir, synthetic_bf16_adapter_dir):
    path = synthetic_bf16_adapter_dir / "adapter_model.safetensors"
    assert {h["dtype"] for h in tensor_headers(path).values()} == {"BF16"}
    bf16 = torch_load_file(str(path))
    f32 = np_load_file(str(synthetic_adapter_dir / "adapter_model.safetensors"))
    for key, value in bf16.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, torch.from_numpy(f32[key]).to(torch.bfloat16), rtol=0, atol=0)


def test_synthetic_rank_pattern_and_zero_b(tmp_path):
    out = synthetic.write_synthetic_adapter(
        tmp_path / "a", layers=2, targets=synthetic.llama_targets(16, 32), r=8, alpha=8, zero_b=True,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 4}, use_rslora=True)
    headers = tensor_headers(out / "adapter_model.safetensors")
    shape = {k: tuple(v["shape"]) for k, v in headers.items()}
    assert shape["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (2, 16)
    assert shape["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] == (32, 4)
    assert shape["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] == (32, 8)
    weights = np_load_file(str(out / "adapter_model.safetensors"))
    assert all(not v.any() for k, v in weights.items() if ".lora_B." in k)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True


def test_synthetic_adapter_loads_in_peft(tmp_path, tiny_llama_dir):
    """Synthetic files with the tiny Llama's shapes are accepted by PEFT itself: the layout is PEFT's."""
    out = synthetic.write_synthetic_adapter(tmp_path / "syn", layers=2,
                                            targets=synthetic.llama_targets(32, 64, kv_out=16), r=4, alpha=8,
                                            base_model_name_or_path=str(tiny_llama_dir))
    assert_peft_roundtrip(tiny_llama_dir, out)


# -- tiny base models ----------------------------------------------------------------------------------------
def test_sharded_model_has_index_covering_all_shards(tiny_llama_sharded_dir, tiny_llama_dir):
    index = json.loads((tiny_llama_sharded_dir / "model.safetensors.index.json").read_text())
    shards = sorted(tiny_llama_sharded_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    in_shards = set().union(*(tensor_headers(p).keys() for p in shards))
    assert set(index["weight_map"]) == in_shards == set(tensor_headers(tiny_llama_dir / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_sharded_dir))
    assert model.config.num_hidden_layers == 2


def test_bf16_model_file_is_bf16(tiny_llama_bf16_dir):
    dtypes = {h["dtype"] for h in tensor_headers(tiny_llama_bf16_dir / "model.safetensors").values()}
    assert dtypes == {"BF16"}


def test_tiny_models_load_and_have_expected_modules(tiny_gpt2_dir, tiny_distilbert_dir, tiny_distilbert_seqcls_dir):
    gpt2 = tensor_headers(tiny_gpt2_dir / "model.safetensors")
    assert gpt2["transformer.h.0.attn.c_attn.weight"]["shape"] == [32, 96]  # Conv1D: (d_in, d_out)
    bert = tensor_headers(tiny_distilbert_dir / "model.safetensors")
    assert any(k.endswith("transformer.layer.1.ffn.lin2.weight") for k in bert)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_distilbert_seqcls_dir))
    assert seq.config.num_labels == 2


# -- real PEFT adapters --------------------------------------------------------------------------------------
def test_llama_random_adapter_roundtrips_through_peft(tiny_llama_dir, llama_adapter_dir):
    sd = assert_peft_roundtrip(tiny_llama_dir, llama_adapter_dir)
    assert len(lora_prefixes(sd)) == 2 * 7
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in sd
    assert sd["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 8)
    assert all(v.abs().max() > 0 for v in sd.values())
    cfg = json.loads((llama_adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_zero_and_trained_adapters(tiny_llama_dir, llama_adapter_zero_dir, llama_adapter_trained_dir):
    zero = assert_peft_roundtrip(tiny_llama_dir, llama_adapter_zero_dir)
    assert all(not v.any() for k, v in zero.items() if ".lora_B." in k)
    assert all(v.any() for k, v in zero.items() if ".lora_A." in k)
    trained = torch_load_file(str(llama_adapter_trained_dir / "adapter_model.safetensors"))
    assert set(trained) == set(zero)
    assert all(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k)


def test_bf16_adapter_holds_bf16(tiny_llama_dir, llama_adapter_bf16_dir):
    path = llama_adapter_bf16_dir / "adapter_model.safetensors"
    assert {h["dtype"] for h in tensor_headers(path).values()} == {"BF16"}
    assert_peft_roundtrip(tiny_llama_dir, llama_adapter_bf16_dir)


def test_patterns_adapter(tiny_llama_dir, llama_adapter_patterns_dir):
    cfg = json.loads((llama_adapter_patterns_dir / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["alpha_pattern"] == {"v_proj": 4}
    sd = assert_peft_roundtrip(tiny_llama_dir, llama_adapter_patterns_dir)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (2, 64)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 64)


def test_dora_adapter_has_magnitudes(tiny_llama_dir, llama_adapter_dora_dir):
    sd = assert_peft_roundtrip(tiny_llama_dir, llama_adapter_dora_dir)
    magnitudes = [k for k in sd if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len(lora_prefixes(sd)) == 14
    assert json.loads((llama_adapter_dora_dir / "adapter_config.json").read_text())["use_dora"] is True


def test_gpt2_adapter(tiny_gpt2_dir, gpt2_adapter_dir):
    sd = assert_peft_roundtrip(tiny_gpt2_dir, gpt2_adapter_dir)
    prefixes = lora_prefixes(sd)
    assert "base_model.model.transformer.h.0.attn.c_proj" in prefixes
    assert "base_model.model.transformer.h.0.mlp.c_proj" in prefixes
    assert len(prefixes) == 2 * 4
    # LoRA factors are stored (r, d_in) / (d_out, r) even though Conv1D weights are (d_in, d_out).
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 8)
    assert json.loads((gpt2_adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_distilbert_adapters(tiny_distilbert_dir, distilbert_adapter_dir, tiny_distilbert_seqcls_dir,
                             distilbert_seqcls_adapter_dir):
    sd = assert_peft_roundtrip(tiny_distilbert_dir, distilbert_adapter_dir)
    assert len(lora_prefixes(sd)) == 2 * 6
    seq_base = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_distilbert_seqcls_dir))
    file_sd = torch_load_file(str(distilbert_seqcls_adapter_dir / "adapter_model.safetensors"))
    non_lora = {k for k in file_sd if ".lora_" not in k}
    assert "base_model.model.classifier.weight" in non_lora
    loaded = peft.PeftModel.from_pretrained(seq_base, str(distilbert_seqcls_adapter_dir))
    assert set(peft.get_peft_model_state_dict(loaded)) == set(file_sd)


def test_multi_adapter_layout(tiny_llama_dir, multi_adapter_dir):
    assert (multi_adapter_dir / "adapter_model.safetensors").is_file()
    assert (multi_adapter_dir / "second" / "adapter_model.safetensors").is_file()
    r_root = json.loads((multi_adapter_dir / "adapter_config.json").read_text())["r"]
    r_second = json.loads((multi_adapter_dir / "second" / "adapter_config.json").read_text())["r"]
    assert (r_root, r_second) == (8, 4)
    second = tensor_headers(multi_adapter_dir / "second" / "adapter_model.safetensors")
    assert second["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [4, 32]
    assert_peft_roundtrip(tiny_llama_dir, multi_adapter_dir / "second")


def test_hf_cache_layout_is_loadable_by_transformers(hf_cache_snapshot, fixture_root):
    repo = hf_cache_snapshot.parent.parent
    assert repo.name == "models--org--tiny-llama"
    assert (repo / "refs" / "main").read_text() == hf_cache_snapshot.name
    weights = hf_cache_snapshot / "model.safetensors"
    assert weights.resolve().parent == repo / "blobs"
    model = transformers.AutoModelForCausalLM.from_pretrained("org/tiny-llama", cache_dir=str(fixture_root / "hf_cache"),
                                                              local_files_only=True)
    assert model.config.hidden_size == 32
