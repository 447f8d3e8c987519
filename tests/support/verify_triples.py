"""Constructed base / adapter / merged triples for ``gradience verify`` (numpy only, no torch).

A 1-block Llama-shaped base (q/k/v/o/gate/up/down, an embedding and norms), a PEFT-layout LoRA adapter over the
seven projections, and merged checkpoints written as W_base + c_i · s_i · B_i·A_i per module, rounded once to the
stored dtype: the way a correct merge (c = 1), a skipped module (c = 0), a double merge (c = 2) or an engine
scale mistake (c = √r, 1/√r) would leave them. The expected verdict of each module is known by construction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from support.synthetic import bf16_bits_to_f32, f32_to_bf16_bits, llama_targets, write_safetensors

HIDDEN, INTERMEDIATE, VOCAB = 256, 512, 64
TARGETS = llama_targets(HIDDEN, INTERMEDIATE)
PREFIX = "model.layers.0."
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_names() -> list[str]:
    return [f"{PREFIX}{_GROUP[t]}.{t}" for t in TARGETS]


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the float32 values a checkpoint in ``dtype`` holds (rounded once)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    if dtype == "F16":
        return np.asarray(x, np.float16).astype(np.float32)
    return np.asarray(x, np.float32)


def quantize_4bit(w: np.ndarray, block: int = 64) -> np.ndarray:
    """Blockwise absmax 4-bit round trip (16 symmetric levels per 64-value block, as bitsandbytes' int4 layout
    does): the de-quantized weights a QLoRA adapter is trained on."""
    flat = w.reshape(-1, block)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 7.0
    q = np.clip(np.round(flat / np.where(scale > 0, scale, 1.0)), -7, 7)
    return (q * scale).reshape(w.shape).astype(np.float32)


def make_base(out: Path, *, dtype: str = "BF16", seed: int = 0, weights: Mapping[str, np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
    """Write a base checkpoint dir; returns its tensors as the float32 values stored."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(0, 0.02, (VOCAB, HIDDEN))}
    for name, t in zip(module_names(), TARGETS, strict=True):
        d_out, d_in = TARGETS[t]
        tensors[name + ".weight"] = rng.normal(0, 0.02, (d_out, d_in))
    tensors[PREFIX + "input_layernorm.weight"] = 1 + rng.normal(0, 0.01, HIDDEN)
    tensors["model.norm.weight"] = 1 + rng.normal(0, 0.01, HIDDEN)
    if weights:
        tensors.update(weights)
    values = {k: stored(np.asarray(v, np.float32), dtype) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", values, dtype=dtype)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": VOCAB}))
    return values


def make_adapter(out: Path, *, r: int = 8, alpha: float = 16, seed: int = 1, use_rslora: bool = False,
                 rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
                 update_rel: float = 0.05, dtype: str = "F32") -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Write a PEFT LoRA adapter dir; returns {module: (A, B, scale)} with ΔW = scale·B·A ≈ update_rel·‖W‖."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    pairs: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for name, t in zip(module_names(), TARGETS, strict=True):
        d_out, d_in = TARGETS[t]
        rk = (rank_pattern or {}).get(t, r)
        al = (alpha_pattern or {}).get(t, alpha)
        s = al / math.sqrt(rk) if use_rslora else al / rk
        a = stored(rng.normal(0, 1 / math.sqrt(d_in), (rk, d_in)).astype(np.float32), dtype)
        b0 = rng.normal(0, 1.0, (d_out, rk))
        target = update_rel * 0.02 * math.sqrt(d_out * d_in)          # ‖W‖_F of N(0, 0.02) weights
        b = stored((b0 * target / (s * np.linalg.norm(b0 @ a))).astype(np.float32), dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        pairs[name] = (a, b, s)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors, dtype=dtype)
    config: dict[str, Any] = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
                              "target_modules": list(TARGETS), "rank_pattern": dict(rank_pattern or {}),
                              "alpha_pattern": dict(alpha_pattern or {}), "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return pairs


def make_merged(out: Path, base: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
                *, dtype: str = "BF16", factors: Mapping[str, float] | None = None,
                onto: Mapping[str, np.ndarray] | None = None,
                changed: Mapping[str, np.ndarray] | None = None) -> Path:
    """merged = round(W + c·s·B·A) per module (c from ``factors``, default 1); ``onto`` replaces W for the modules
    it names (a merge onto other weights); ``changed`` overwrites untouched tensors."""
    tensors = {}
    for key, w in base.items():
        module = key[: -len(".weight")]
        w = (onto or {}).get(key, w)
        if module in pairs:
            a, b, s = pairs[module]
            c = (factors or {}).get(module, 1.0)
            w = w.astype(np.float64) + c * s * (b.astype(np.float64) @ a.astype(np.float64))
        tensors[key] = stored(np.asarray(w, np.float32), dtype)
    tensors.update({k: stored(np.asarray(v, np.float32), dtype) for k, v in (changed or {}).items()})
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, dtype=dtype)
    return out
