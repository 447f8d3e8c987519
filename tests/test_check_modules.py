"""The module classifier on the bare target names people put in ``target_modules`` (SPEC §2 architectures)."""

from __future__ import annotations

import pytest

from gradience.modules import classify_module


@pytest.mark.parametrize(("name", "expected"), [
    # Llama / Mistral / Qwen / Gemma
    ("q_proj", "attn"), ("k_proj", "attn"), ("v_proj", "attn"), ("o_proj", "attn"),
    ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"),
    # GPT-2 (bare c_proj is ambiguous: see test_check_rules.test_analyze_targets)
    ("c_attn", "attn"), ("c_fc", "mlp"), ("attn.c_proj", "attn"), ("mlp.c_proj", "mlp"),
    # BERT / RoBERTa
    ("query", "attn"), ("key", "attn"), ("value", "attn"), ("attention.output.dense", "attn"),
    ("intermediate.dense", "mlp"), ("output.dense", "mlp"),
    # DistilBERT
    ("q_lin", "attn"), ("k_lin", "attn"), ("v_lin", "attn"), ("out_lin", "attn"), ("lin1", "mlp"), ("lin2", "mlp"),
    # Falcon / GPT-NeoX / Bloom
    ("query_key_value", "attn"), ("self_attention.dense", "attn"), ("dense_h_to_4h", "mlp"),
    ("dense_4h_to_h", "mlp"),
    # Phi
    ("Wqkv", "attn"), ("out_proj", "attn"), ("fc1", "mlp"), ("fc2", "mlp"),
    # Mixtral experts
    ("w1", "mlp"), ("w2", "mlp"), ("w3", "mlp"), ("block_sparse_moe.experts.0.w1", "mlp"),
    # T5
    ("q", "attn"), ("k", "attn"), ("v", "attn"), ("o", "attn"), ("wi", "mlp"), ("wo", "mlp"),
    ("SelfAttention.q", "attn"), ("DenseReluDense.wi", "mlp"),
    # embeddings and heads
    ("embed_tokens", "embed"), ("wte", "embed"), ("lm_head", "other"), ("classifier", "other"),
    ("score", "other"),
])
def test_bare_target_names(name: str, expected: str) -> None:
    assert classify_module(name) == expected
