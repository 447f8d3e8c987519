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


# --- names and layout that ``export --to gguf`` writes and ``verify --gguf`` reads back (issue 20) ---------
# convert_hf_to_gguf.py ModelBase.register: the HF architectures whose llama.cpp names export writes. LlamaModel
# registers LlamaForCausalLM and MistralForCausalLM (arch "llama", undo_permute = True); Qwen2Model and Qwen3Model
# keep the HF row order. Other architectures are refused by name rather than guessed.
HF_ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                                    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# LlamaModel.modify_tensors permutes q_proj/k_proj rows (LlamaModel.permute, rope layout); for a LoRA the
# converter applies it to B's rows only (LoraTorchTensor.permute), A is unchanged.
PERMUTE_QK_ARCHS: frozenset[str] = frozenset({"llama"})
# convert_lora_to_gguf.py LoraModel.modify_tensors: adapters on a VL model's language model are renamed first.
LM_PREFIXES: tuple[tuple[str, str], ...] = (("model.language_model.", "model."), ("language_model.", ""))
# llama-adapter.cpp llama_adapter_lora_init_impl: the token embedding's pair is stored with A transposed.
TOKEN_EMBD = "token_embd.weight"


def strip_lm_prefix(name: str) -> str:
    """The checkpoint name the converter maps after its language-model prefix rewrite (first match only)."""
    for prefix, replacement in LM_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def is_lm_head(checkpoint_name: str) -> bool:
    return checkpoint_name == "lm_head.weight" or checkpoint_name.endswith(".lm_head.weight")


def is_token_embd(gguf_name: str) -> bool:
    return gguf_name.endswith(TOKEN_EMBD)


def qk_permute_heads(arch: str, checkpoint_name: str, n_head: int | None, n_head_kv: int | None) -> int | None:
    """The head count LlamaModel.permute splits this weight's rows by (n_head for q, n_head_kv for k), or None."""
    if arch not in PERMUTE_QK_ARCHS or n_head is None:
        return None
    if checkpoint_name.endswith("q_proj.weight"):
        return n_head
    if checkpoint_name.endswith("k_proj.weight"):
        return n_head_kv or n_head
    return None

# convert_lora_to_gguf.py LoraModel.get_tensors skips saved base-layer copies (PEFT's save_embedding_layers).
BASE_LAYER_SKIPPED = ".base_layer.weight"
