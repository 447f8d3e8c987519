"""The one module-type classifier and the one layer-index extractor.

Every command (audit, check, monitor, compress, report) classifies PEFT target names through
``classify_module`` so that "attn" means the same thing everywhere. Classification looks at the whole
module path, not only the leaf: ``attn.c_proj`` (GPT-2) is attention while ``mlp.c_proj`` is MLP, and
BERT's ``attention.output.dense`` is attention while ``output.dense`` is MLP.
"""

from __future__ import annotations

from typing import Literal

ModuleType = Literal["attn", "mlp", "embed", "other"]
MODULE_TYPES: tuple[ModuleType, ...] = ("attn", "mlp", "embed", "other")

# Containers whose children are attention (resp. MLP) projections, lower-cased.
_ATTN_CONTAINERS = frozenset(
    {
        "attn", "self_attn", "attention", "self_attention", "selfattention", "encdecattention",
        "cross_attn", "crossattention", "cross_attention", "self_attn_layer", "attn_layer",
    }
)
_MLP_CONTAINERS = frozenset(
    {
        "mlp", "feed_forward", "feedforward", "ffn", "intermediate", "densereludense",
        "densegatedactdense", "block_sparse_moe", "experts", "moe", "shared_expert", "shared_experts",
    }
)
# Leaves that are attention (resp. MLP) projections on their own, whatever the container.
_ATTN_LEAVES = frozenset(
    {
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value",
        "q_lin", "k_lin", "v_lin", "out_lin", "query_key_value", "wqkv", "out_proj", "qkv",
        "q", "k", "v", "o", "in_proj", "kv_proj", "wq", "wk", "wv",
    }
)
_MLP_LEAVES = frozenset(
    {
        "gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "fc1", "fc2", "fc_in", "fc_out",
        "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "wi", "wo", "wi_0", "wi_1",
    }
)
_EMBED_LEAVES = frozenset(
    {
        "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
        "embed_in", "tok_embeddings", "embed_positions", "shared", "embeddings", "embedding",
    }
)
# Task heads and poolers: never counted as attention/MLP even when their leaf looks like one.
_HEAD_SEGMENTS = frozenset(
    {"lm_head", "classifier", "score", "pooler", "pre_classifier", "qa_outputs", "embed_out"}
)
_LAYER_CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "block", "transformer_blocks"})
_TENSOR_SUFFIXES = frozenset({"weight", "bias"})


def _segments(name: str) -> list[str]:
    segs = [s for s in name.lower().split(".") if s]
    if len(segs) > 1 and segs[-1] in _TENSOR_SUFFIXES:
        segs = segs[:-1]
    return segs


def classify_module(name: str) -> ModuleType:
    """Classify a module path (or a bare target name such as ``q_proj``) as attn / mlp / embed / other."""
    segs = _segments(name)
    if not segs:
        return "other"
    leaf = segs[-1]
    if leaf in _EMBED_LEAVES or "embed" in leaf:
        return "embed"
    if any(s in _HEAD_SEGMENTS for s in segs):
        return "other"
    # The container closest to the leaf decides (``experts.0.w1`` sits in an MLP block).
    for seg in reversed(segs[:-1]):
        if seg in _ATTN_CONTAINERS:
            return "attn"
        if seg in _MLP_CONTAINERS:
            return "mlp"
    if leaf in _ATTN_LEAVES:
        return "attn"
    if leaf in _MLP_LEAVES:
        return "mlp"
    # BERT/RoBERTa: ``layer.N.output.dense`` outside an attention block is the MLP's down projection.
    if leaf == "dense" and len(segs) >= 2 and segs[-2] == "output":
        return "mlp"
    return "other"


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module lives in (``model.layers.5.mlp`` -> 5), None when none.

    The first ``<container>.<N>`` wins, so T5's ``block.3.layer.1.SelfAttention`` is block 3.
    """
    segs = name.split(".")
    for i in range(len(segs) - 1):
        if segs[i].lower() in _LAYER_CONTAINERS and segs[i + 1].isdigit():
            return int(segs[i + 1])
    return None
