"""The one module classifier and layer-index extractor, on real module paths of each architecture."""

import pytest

from gradience.modules import classify_module, layer_index

CASES = [
    # Llama / Mistral / Qwen / Gemma
    ("model.layers.5.self_attn.q_proj", "attn"),
    ("model.layers.5.self_attn.o_proj", "attn"),
    ("model.layers.5.mlp.gate_proj", "mlp"),
    ("model.layers.5.mlp.down_proj", "mlp"),
    ("model.embed_tokens", "embed"),
    ("lm_head", "other"),
    # GPT-2: c_proj is attention or MLP depending on the container
    ("transformer.h.0.attn.c_attn", "attn"),
    ("transformer.h.0.attn.c_proj", "attn"),
    ("transformer.h.0.mlp.c_fc", "mlp"),
    ("transformer.h.0.mlp.c_proj", "mlp"),
    ("transformer.wte", "embed"),
    # BERT / RoBERTa: output.dense is attention inside attention, MLP outside
    ("bert.encoder.layer.3.attention.self.query", "attn"),
    ("bert.encoder.layer.3.attention.self.value", "attn"),
    ("bert.encoder.layer.3.attention.output.dense", "attn"),
    ("bert.encoder.layer.3.intermediate.dense", "mlp"),
    ("bert.encoder.layer.3.output.dense", "mlp"),
    ("bert.pooler.dense", "other"),
    ("classifier", "other"),
    # DistilBERT
    ("distilbert.transformer.layer.1.attention.q_lin", "attn"),
    ("distilbert.transformer.layer.1.attention.out_lin", "attn"),
    ("distilbert.transformer.layer.1.ffn.lin1", "mlp"),
    ("distilbert.transformer.layer.1.ffn.lin2", "mlp"),
    ("pre_classifier", "other"),
    # Falcon / GPT-NeoX / Bloom
    ("transformer.h.2.self_attention.query_key_value", "attn"),
    ("transformer.h.2.self_attention.dense", "attn"),
    ("transformer.h.2.mlp.dense_h_to_4h", "mlp"),
    ("gpt_neox.layers.2.attention.dense", "attn"),
    ("gpt_neox.layers.2.mlp.dense_4h_to_h", "mlp"),
    # Phi (old and new naming)
    ("transformer.h.0.mixer.Wqkv", "attn"),
    ("transformer.h.0.mixer.out_proj", "attn"),
    ("model.layers.0.self_attn.dense", "attn"),
    ("model.layers.0.mlp.fc1", "mlp"),
    ("model.layers.0.mlp.fc2", "mlp"),
    # Mixtral experts and router
    ("model.layers.1.block_sparse_moe.experts.3.w1", "mlp"),
    ("model.layers.1.block_sparse_moe.experts.3.w2", "mlp"),
    ("model.layers.1.block_sparse_moe.gate", "mlp"),
    # T5
    ("encoder.block.0.layer.0.SelfAttention.q", "attn"),
    ("decoder.block.1.layer.1.EncDecAttention.o", "attn"),
    ("encoder.block.0.layer.1.DenseReluDense.wi", "mlp"),
    ("decoder.block.0.layer.2.DenseReluDense.wo", "mlp"),
    ("shared", "embed"),
    # bare target names as they appear in target_modules
    ("q_proj", "attn"), ("c_attn", "attn"), ("query", "attn"), ("q_lin", "attn"),
    ("query_key_value", "attn"), ("Wqkv", "attn"), ("up_proj", "mlp"), ("c_fc", "mlp"),
    ("lin1", "mlp"), ("dense_h_to_4h", "mlp"), ("fc1", "mlp"), ("w1", "mlp"), ("wi", "mlp"),
    ("score", "other"), ("", "other"),
]


@pytest.mark.parametrize(("name", "expected"), CASES)
def test_classify_module(name: str, expected: str) -> None:
    assert classify_module(name) == expected


def test_tensor_suffix_is_ignored() -> None:
    assert classify_module("model.layers.0.mlp.up_proj.weight") == "mlp"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.5.self_attn.q_proj", 5),
        ("transformer.h.11.attn.c_attn", 11),
        ("bert.encoder.layer.7.output.dense", 7),
        ("encoder.block.3.layer.1.SelfAttention.q", 3),  # T5: block index, not sub-layer
        ("model.layers.2.block_sparse_moe.experts.7.w1", 2),  # expert index is not a layer
        ("vision.blocks.4.attn.qkv", 4),
        ("model.embed_tokens", None),
        ("lm_head", None),
        ("h.x.attn", None),
    ],
)
def test_layer_index(name: str, expected: int | None) -> None:
    assert layer_index(name) == expected
