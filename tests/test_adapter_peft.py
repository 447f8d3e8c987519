"""Adapter reading against real PEFT: adapters written by PEFT's ``save_pretrained`` and compared, module by
module, with the LoRA layers PEFT itself builds (ranks, scales, factor values, ΔW orientation); pickled weights
(safe and malicious); in-memory state dicts of torch tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from gradience.adapter import adapter_from_state_dict, list_adapters, load_adapter, pattern_key  # noqa: E402
from gradience.errors import InputError, MissingDependencyError  # noqa: E402
from support.synthetic import read_safetensors_header  # noqa: E402

ROOT = "base_model.model."


def _lora_layers(peft_model: Any, adapter: str = "default") -> dict[str, Any]:
    """PEFT's own LoRA layers by base-model module path."""
    out = {}
    for name, module in peft_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling:
            out[name.removeprefix(ROOT)] = module
    return out


def _peft_factors(module: Any, adapter: str = "default") -> tuple[np.ndarray, np.ndarray]:
    if adapter in getattr(module, "lora_embedding_A", {}):
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    else:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return a.detach().float().numpy(), b.detach().float().numpy()


def _assert_matches_peft(adapter: Any, peft_model: Any, adapter_name: str = "default") -> None:
    """Every pair equals PEFT's layer: same modules, rank, scale, factor values; ΔW = s·B·A equals PEFT's delta."""
    layers = _lora_layers(peft_model, adapter_name)
    assert sorted(p.name for p in adapter.pairs) == sorted(layers)
    for pair in adapter.pairs:
        module = layers[pair.name]
        assert pair.r == module.r[adapter_name]
        assert pair.scale == pytest.approx(module.scaling[adapter_name], rel=1e-12)
        assert pair.alpha == module.lora_alpha[adapter_name]
        a, b = pair.load_factors()
        ref_a, ref_b = _peft_factors(module, adapter_name)
        np.testing.assert_array_equal(a, ref_a.reshape(pair.r, -1))
        np.testing.assert_array_equal(b, ref_b.reshape(-1, pair.r))
        delta = pair.scale * (b.astype(np.float64) @ a.astype(np.float64))
        ref = module.get_delta_weight(adapter_name).detach().double().numpy()
        if pair.kind == "embedding" or getattr(module, "fan_in_fan_out", False):
            ref = ref.T  # PEFT returns the embedding delta (vocab, dim) and Conv1D deltas as (in, out)
        np.testing.assert_allclose(delta, ref.reshape(delta.shape), rtol=1e-5, atol=1e-6)


def _reload(base_dir: Path, adapter_dir: Path, cls: Any = None) -> Any:
    cls = cls or transformers.AutoModelForCausalLM
    base = cls.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def _tiny_llama() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


# -- adapters written by PEFT, read back, compared with PEFT's reload ----------------------------------------
def test_llama_lora_matches_peft(llama_adapter_dir: Path, tiny_llama_dir: Path) -> None:
    ad = load_adapter(str(llama_adapter_dir))
    assert len(ad.pairs) == 2 * 7 and ad.issues == [] and ad.non_lora.count == 0
    assert ad.config["peft_type"] == "LORA" and ad.config["r"] == 8
    names = {p.name for p in ad.pairs}
    assert "model.layers.1.self_attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
    k = next(p for p in ad.pairs if p.name == "model.layers.0.self_attn.k_proj")
    assert (k.peft_prefix, k.kind, k.dora, k.d_in, k.d_out, k.scale) == (
        "base_model.model.model.layers.0.self_attn.k_proj", "linear", False, 32, 16, 2.0)
    _assert_matches_peft(ad, _reload(tiny_llama_dir, llama_adapter_dir))


def test_rslora_rank_and_alpha_patterns_match_peft(llama_adapter_patterns_dir: Path, tiny_llama_dir: Path) -> None:
    ad = load_adapter(str(llama_adapter_patterns_dir))
    assert ad.issues == []
    ranks = {p.name: p.r for p in ad.pairs}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.1.mlp.down_proj"] == 2
    assert ranks["model.layers.0.mlp.down_proj"] == 8
    _assert_matches_peft(ad, _reload(tiny_llama_dir, llama_adapter_patterns_dir))


def test_regex_patterns_and_precedence_match_peft(tmp_path: Path) -> None:
    config = LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={r"layers\.0\.self_attn\.(q|k)_proj": 2, "v_proj": 6, "model.layers.1.mlp.down_proj": 3},
        alpha_pattern={r".*\.mlp\..*": 5, "q_proj": 7, "layers.1.mlp.up_proj": 1})  # mlp regex listed first: wins
    pm = get_peft_model(_tiny_llama(), config)
    pm.save_pretrained(str(tmp_path))
    ad = load_adapter(str(tmp_path))
    _assert_matches_peft(ad, pm)
    by_name = {p.name: p for p in ad.pairs}
    assert by_name["model.layers.1.mlp.up_proj"].alpha == 5
    assert by_name["model.layers.0.self_attn.k_proj"].r == 2 and by_name["model.layers.1.self_attn.k_proj"].r == 8


def test_pattern_key_agrees_with_peft_get_pattern_key() -> None:
    keys_lists = [["q_proj"], ["proj"], ["layers.1.self_attn.q_proj"], [r"layers\.[0-9]+\.mlp\..*"],
                  ["self_attn"], ["v_proj", "layers.0.self_attn.v_proj"], ["layers.0.self_attn.v_proj", "v_proj"],
                  [r".*_proj"], ["model.layers.1.mlp.down_proj"], [r"(q|k)_proj"], ["embed_tokens"]]
    names = [name for name, _ in _tiny_llama().named_modules() if name]
    for keys in keys_lists:
        for name in names:
            peft_key = get_pattern_key(keys, name)  # PEFT returns the name itself when no key matches
            matched = peft_key != name or name in keys
            expected = peft_key if matched else None
            assert pattern_key(keys, name) == expected, (keys, name)


def test_dora_adapter(llama_adapter_dora_dir: Path, tiny_llama_dir: Path) -> None:
    ad = load_adapter(str(llama_adapter_dora_dir))
    assert all(p.dora for p in ad.pairs) and len(ad.pairs) == 14
    assert ad.non_lora.count == 0  # magnitudes are DoRA parts of their pair, not non-LoRA tensors
    header = read_safetensors_header(llama_adapter_dora_dir / "adapter_model.safetensors")
    for p in ad.pairs:
        assert p.magnitude_key is not None and p.magnitude_key.endswith(".lora_magnitude_vector")
        assert header[p.magnitude_key]["shape"] == [p.d_out]
    _assert_matches_peft(ad, _reload(tiny_llama_dir, llama_adapter_dora_dir))


def test_bf16_adapter_factors(llama_adapter_bf16_dir: Path, tiny_llama_dir: Path) -> None:
    header = read_safetensors_header(llama_adapter_bf16_dir / "adapter_model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    ad = load_adapter(str(llama_adapter_bf16_dir))
    _assert_matches_peft(ad, _reload(tiny_llama_dir, llama_adapter_bf16_dir))  # PEFT upcasts bf16 exactly too


def test_gpt2_conv1d_names_and_orientation(gpt2_adapter_dir: Path, tiny_gpt2_dir: Path) -> None:
    ad = load_adapter(str(gpt2_adapter_dir))
    by_name = {p.name: p for p in ad.pairs}
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.d_in, c_attn.d_out, c_attn.a_shape, c_attn.b_shape) == (32, 96, (8, 32), (96, 8))
    assert "transformer.h.1.mlp.c_proj" in by_name and "transformer.h.1.attn.c_proj" in by_name
    assert "transposed_factors" not in {i.code for i in ad.issues}
    _assert_matches_peft(ad, _reload(tiny_gpt2_dir, gpt2_adapter_dir))


def test_embedding_lora_matches_peft(tmp_path: Path) -> None:
    pm = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                  target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(str(tmp_path))
    ad = load_adapter(str(tmp_path))
    emb = next(p for p in ad.pairs if p.name == "model.embed_tokens")
    assert (emb.kind, emb.r, emb.d_in, emb.d_out, emb.scale) == ("embedding", 4, 64, 32, 3.0)
    _assert_matches_peft(ad, pm)
    # PEFT also saves the embedding's base weight (save_embedding_layers): a non-LoRA tensor, not a pair.
    assert ad.non_lora.names == ["base_model.model.model.embed_tokens.base_layer.weight"]


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        return self.head(self.conv(x).mean((2, 3)))


def test_conv_lora_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pm = get_peft_model(_ConvNet(), LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                               target_modules=["conv", "head"]))
    pm.save_pretrained(str(tmp_path))
    ad = load_adapter(str(tmp_path))
    conv = next(p for p in ad.pairs if p.name == "conv")
    assert (conv.kind, conv.r, conv.d_in, conv.d_out, conv.a_shape, conv.b_shape) == (
        "conv", 2, 27, 8, (2, 3, 3, 3), (8, 2, 1, 1))
    _assert_matches_peft(ad, pm)


def test_multi_adapter_directory(multi_adapter_dir: Path) -> None:
    assert list_adapters(str(multi_adapter_dir)) == ["default", "second"]
    top = load_adapter(str(multi_adapter_dir))
    assert {p.r for p in top.pairs} == {8}
    assert [i.code for i in top.issues] == ["other_adapters"]
    second = load_adapter(str(multi_adapter_dir), adapter_name="second")
    assert {p.r for p in second.pairs} == {4} and {p.scale for p in second.pairs} == {2.0}
    assert second.peft_dir == str(multi_adapter_dir / "second") and second.adapter_name == "second"
    assert sorted(p.name for p in second.pairs) == sorted(p.name for p in top.pairs)


def test_modules_to_save_heads_are_non_lora(distilbert_seqcls_adapter_dir: Path) -> None:
    ad = load_adapter(str(distilbert_seqcls_adapter_dir))
    assert ad.non_lora.count > 0
    assert all("classifier" in n for n in ad.non_lora.names)
    header = read_safetensors_header(distilbert_seqcls_adapter_dir / "adapter_model.safetensors")
    assert ad.non_lora.params == sum(int(np.prod(header[n]["shape"])) for n in ad.non_lora.names)
    assert {p.name.rsplit(".", 1)[1] for p in ad.pairs} == {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}


# -- pickled weights ------------------------------------------------------------------------------------------
def test_bin_weights_via_torch_save(tmp_path: Path, llama_adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    bin_dir = tmp_path / "bin_adapter"
    bin_dir.mkdir()
    shutil.copy(llama_adapter_dir / "adapter_config.json", bin_dir)
    torch.save(load_file(str(llama_adapter_dir / "adapter_model.safetensors")), bin_dir / "adapter_model.bin")
    from_bin = load_adapter(str(bin_dir))
    from_st = load_adapter(str(llama_adapter_dir))
    assert from_bin.adapter_weights_path == str(bin_dir / "adapter_model.bin")
    assert [(p.name, p.r, p.scale) for p in from_bin.pairs] == [(p.name, p.r, p.scale) for p in from_st.pairs]
    for pb, ps in zip(from_bin.pairs, from_st.pairs, strict=True):
        for x, y in zip(pb.load_factors(), ps.load_factors(), strict=True):
            np.testing.assert_array_equal(x, y)
    # The same state dict saved with the legacy (non-zip) format, as a .pt file.
    legacy = tmp_path / "legacy.pt"
    torch.save(load_file(str(llama_adapter_dir / "adapter_model.safetensors")), legacy,
               _use_new_zipfile_serialization=False)
    assert len(load_adapter(weights=str(legacy), adapter_config=str(bin_dir / "adapter_config.json")).pairs) == 14


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_without_executing(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "adapter_model.bin"
    payload = {"base_model.model.x.lora_A.weight": _Payload(marker)}
    if writer == "torch_save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(InputError) as err:
        load_adapter(str(tmp_path))
    assert not marker.exists()
    assert err.value.path == str(path)
    assert "refusing to load" in err.value.problem
    if writer == "torch_save":
        assert "system" in err.value.problem  # torch names the blocked global


def test_corrupt_or_odd_bin_files(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(os.urandom(256))
    with pytest.raises(InputError) as err:
        load_adapter(str(tmp_path))
    assert err.value.path == str(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InputError, match="not a state dict"):
        load_adapter(str(tmp_path))


def test_bin_without_torch_names_the_extra(tmp_path: Path, llama_adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(llama_adapter_dir / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from gradience.adapter import load_adapter\n"
            "from gradience.errors import MissingDependencyError\n"
            "try:\n    load_adapter(sys.argv[1])\n"
            "except MissingDependencyError as e:\n    print('MISSING', e.package, e.extra)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "MISSING torch hf"
    assert issubclass(MissingDependencyError, Exception)


# -- in-memory state dicts ------------------------------------------------------------------------------------
def test_state_dict_of_torch_parameters_matches_peft(tmp_path: Path) -> None:
    pm = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj"], use_dora=True))
    params = dict(pm.named_parameters())   # in-memory keys: ...lora_A.default.weight, requires_grad=True
    assert any(p.requires_grad for p in params.values())
    ad = adapter_from_state_dict(params, pm.peft_config["default"])  # a LoraConfig object is accepted too
    _assert_matches_peft(ad, pm)
    assert all(p.dora for p in ad.pairs)
    # Base weights are counted as non-LoRA tensors, not paired; each pair owns its DoRA magnitude.
    assert ad.non_lora.count == len(params) - 3 * len(ad.pairs)
    # PEFT's saved-layout state dict gives the same pairs.
    saved = adapter_from_state_dict(get_peft_model_state_dict(pm), json.loads(json.dumps(
        pm.peft_config["default"].to_dict(), default=list)))
    assert [(p.name, p.scale) for p in saved.pairs] == [(p.name, p.scale) for p in ad.pairs]


def test_state_dict_conversion_is_lazy_and_handles_bf16() -> None:
    a = torch.randn(4, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 4, dtype=torch.bfloat16)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    ad = adapter_from_state_dict({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
                                 {"r": 4, "lora_alpha": 4})
    got_a, got_b = ad.pairs[0].load_factors()
    assert got_a.dtype == np.float32
    np.testing.assert_array_equal(got_a, a.float().numpy())
    np.testing.assert_array_equal(got_b, b.float().numpy())
    # Meta tensors have shapes but no data: building the adapter works, reading the factors cannot.
    meta = adapter_from_state_dict({f"{prefix}.lora_A.weight": torch.empty(4, 16, device="meta"),
                                    f"{prefix}.lora_B.weight": torch.empty(16, 4, device="meta")}, None)
    assert (meta.pairs[0].r, meta.pairs[0].scale) == (4, 1.0)
    with pytest.raises((NotImplementedError, RuntimeError)):
        meta.pairs[0].load_factors()
