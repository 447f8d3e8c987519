"""llama.cpp facts the engine table and ``verify``/``export`` share (re-read at every llama.cpp release).

Sources: ``convert_lora_to_gguf.py`` (``LoraModel.get_tensors``/``modify_tensors``, ``get_base_tensor_name``)
and ``src/llama-adapter.cpp`` (``llama_adapter_lora_init_impl``), plus the ``gguf`` package's key names.
The ``export``/``verify`` engineer checks the llama_cpp rows of :mod:`gradience.engines.table` through the
``gguf`` reader on a converted file: see :data:`CHECK_HOOK`.
"""

from __future__ import annotations

# GGUF key/value names (gguf.Keys.General.TYPE, gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA).
KV_GENERAL_TYPE = "general.type"          # must be "adapter" (llama_adapter_lora_init_impl)
KV_ADAPTER_TYPE = "adapter.type"          # must be "lora"
KV_LORA_ALPHA = "adapter.lora.alpha"      # float32: the config's lora_alpha, stored once
# Tensor names: "<gguf base tensor>.lora_a" / ".lora_b" (modify_tensors); token_embd's lora_a is transposed.
LORA_A_SUFFIX = ".lora_a"
LORA_B_SUFFIX = ".lora_b"
# Norm tensors that pass the converter end in "_norm.weight" after the GGUF mapping and are skipped by
# llama_adapter_lora_init_impl ("TODO: add support for norm vector"): dropped without a message.
RUNTIME_SKIPPED_SUFFIX = "_norm.weight"
# What the rows of the table name when verify/export confirm them on a converted file with the gguf reader.
CHECK_HOOK = "gradience.engines.llama_cpp: rows llama_cpp.* are to be confirmed through gguf.GGUFReader"


def gguf_pair_names(base_tensor: str) -> tuple[str, str]:
    """The two GGUF tensor names of the LoRA pair for the GGUF base tensor ``base_tensor`` (``blk.0.attn_q.weight``)."""
    return base_tensor + LORA_A_SUFFIX, base_tensor + LORA_B_SUFFIX


def runtime_scale(lora_alpha: float, rank: int, user_scale: float = 1.0) -> float:
    """The scale llama.cpp applies to one pair: ``user_scale * alpha / rank`` with the rank read from the tensor
    (lora_b's ne[0]); ``alpha == 0`` means ``user_scale`` alone (llama_adapter_lora_weight::get_scale)."""
    return user_scale * lora_alpha / rank if lora_alpha else user_scale
