"""What ``check`` knows about the base model: its size, whether it is a recurrent / state-space hybrid, and how
many experts its MoE layers have. These facts scale or switch rules (issue 18): the harmful-lr bound depends
on size, SSM projections get a warning only on recurrent architectures, expert ranks only on MoE models.

Sources, most trusted first: ``--model-size``; a config key (``model_size`` / ``num_parameters``); the base
model's ``config.json`` when the model is a local directory (read by the bounded config reader, never a
model instantiation); the model name (``Llama-2-7b`` -> 7e9, ``Jamba`` -> hybrid). No torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from gradience.errors import InputError

# HF ``model_type`` values (and name fragments) of architectures with recurrent / state-space layers: pure SSMs
# and the sequential hybrids that interleave them with attention (Galim et al. 2024 tested Mamba and Jamba).
RECURRENT_MODEL_TYPES: tuple[str, ...] = (
    "mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "falcon_h1", "bamba", "granitemoehybrid",
    "nemotron_h", "recurrent_gemma", "recurrentgemma", "rwkv", "qwen3_next", "plamo2", "lfm2",
)
# Layer-type strings (``layer_types``, ``layers_block_type``, ``block_types``) that mark a recurrent layer.
_RECURRENT_LAYER_WORDS = ("mamba", "recurrent", "linear_attention", "ssm", "rwkv", "conv")
# Leaf names of the projections / parameters that compute the recurrence itself (Mamba's x_proj -> B, C, Δ and
# dt_proj -> Δ, conv1d, A_log, D, dt_bias; RecurrentGemma's RG-LRU gates and conv; Qwen3-Next's beta/alpha
# projection; RWKV's decay). The input/output projections around them (in_proj, out_proj) are ordinary linears.
SSM_TARGET_NAMES: frozenset[str] = frozenset({
    "x_proj", "dt_proj", "conv1d", "conv_1d", "a_log", "d", "dt_bias", "in_proj_ba", "rg_lru", "input_gate",
    "recurrent_gate", "time_decay", "time_first",
})
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_SIZE_KEYS = ("model_size", "num_parameters", "n_params")
_SIZE_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_SIZE_TEXT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
# A size token in a model name: "7b", "1.5B", "135M", "8x7b" (experts x size), not part of a longer word.
_NAME_SIZE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")
_MAX_PARAMS = 1e15


@dataclass
class ModelFacts:
    """Facts about the base model, each with where it came from (shown in rule evidence)."""

    params: float | None = None
    params_source: str | None = None
    model_type: str | None = None
    recurrent: bool = False
    recurrent_reason: str | None = None
    num_experts: int | None = None
    config_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "params_source": self.params_source, "model_type": self.model_type,
                "recurrent": self.recurrent, "recurrent_reason": self.recurrent_reason,
                "num_experts": self.num_experts, "config_path": self.config_path}


def parse_model_size(value: Any) -> float:
    """``7B``, ``1.5b``, ``135M``, ``7e9`` or a number -> parameters. Anything else is an InputError."""
    if isinstance(value, bool):
        raise InputError(f"model size {value!r} is not a number of parameters (e.g. 7B, 135M, 7e9)")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = _SIZE_TEXT.match(str(value))
        if m is None:
            raise InputError(f"model size {str(value)[:40]!r} is not a number of parameters (e.g. 7B, 135M, 7e9)")
        number = float(m.group(1)) * _SIZE_SUFFIX[m.group(2).lower()]
    if not math.isfinite(number) or number <= 0 or number > _MAX_PARAMS:
        raise InputError(f"model size {value!r} is out of range (a positive count up to 1e15 parameters)")
    return number


def size_from_name(name: str | None) -> float | None:
    """Parameters read from a size token in a model name (``Qwen2.5-0.5B`` -> 5e8), or None."""
    if not name:
        return None
    found = None
    for m in _NAME_SIZE.finditer(name.lower()):
        experts = int(m.group(1)) if m.group(1) else 1
        found = experts * float(m.group(2)) * _SIZE_SUFFIX[m.group(3)]
    return found if found and found <= _MAX_PARAMS else None


def _recurrent_from_type(model_type: str | None) -> str | None:
    if not model_type:
        return None
    key = model_type.lower().replace("-", "_")
    return f"model_type {model_type}" if key in RECURRENT_MODEL_TYPES else None


def _recurrent_from_name(name: str | None) -> str | None:
    if not name:
        return None
    key = name.lower().replace("-", "_")
    hit = next((t for t in RECURRENT_MODEL_TYPES if t in key), None)
    return f"model name contains '{hit}'" if hit else None


def _recurrent_from_layers(config: dict[str, Any]) -> str | None:
    for key in ("layer_types", "layers_block_type", "block_types"):
        value = config.get(key)
        if isinstance(value, list) and any(isinstance(v, str) and any(w in v.lower() for w in _RECURRENT_LAYER_WORDS)
                                           for v in value[:4096]):
            return f"config {key} lists recurrent layers"
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and "M" in pattern[:4096]:
        return "config hybrid_override_pattern has Mamba layers (M)"
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _estimate_params(config: dict[str, Any]) -> float | None:
    """Rough decoder size from a config.json: layers x (4h² attention + 3·h·ffn MLP [x experts]) + vocab·h.
    Good to a factor well inside 2, which is all the < 1B / >= 1B split needs."""
    h = _int(config.get("hidden_size")) or _int(config.get("d_model")) or _int(config.get("dim"))
    layers = _int(config.get("num_hidden_layers")) or _int(config.get("n_layer")) or _int(config.get("n_layers"))
    if not h or not layers:
        return None
    ffn = _int(config.get("intermediate_size")) or _int(config.get("hidden_dim")) or 4 * h
    experts = next((_int(config.get(k)) for k in _EXPERT_KEYS if _int(config.get(k))), None) or 1
    vocab = _int(config.get("vocab_size")) or 0
    return float(layers * (4 * h * h + 3 * h * ffn * experts) + vocab * h)


def read_model_config(model: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """``(path, config)`` of ``<model>/config.json`` when ``model`` is a local directory holding one."""
    if not model:
        return None, None
    path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(path):
        return None, None
    from gradience.config.loader import read_mapping

    return path, read_mapping(path)


def model_facts(model_name: str | None, *, size: Any = None, size_source: str = "--model-size",
                config: dict[str, Any] | None = None, config_path: str | None = None) -> ModelFacts:
    """Combine what is known; an explicit ``size`` wins, then the config's, then the name's."""
    facts = ModelFacts(config_path=config_path)
    cfg = config or {}
    if size is not None:
        facts.params, facts.params_source = parse_model_size(size), size_source
    elif cfg:
        explicit = next((cfg[k] for k in _SIZE_KEYS if k in cfg), None)
        if explicit is not None:
            facts.params, facts.params_source = parse_model_size(explicit), "config.json"
        else:
            estimate = _estimate_params(cfg)
            if estimate is not None:
                facts.params, facts.params_source = estimate, "config.json (estimated from its shapes)"
    if facts.params is None:
        by_name = size_from_name(model_name)
        if by_name is not None:
            facts.params, facts.params_source = by_name, "model name"
    model_type = cfg.get("model_type")
    facts.model_type = model_type if isinstance(model_type, str) else None
    reason = _recurrent_from_type(facts.model_type) or _recurrent_from_layers(cfg) or _recurrent_from_name(model_name)
    facts.recurrent, facts.recurrent_reason = reason is not None, reason
    facts.num_experts = next((_int(cfg.get(k)) for k in _EXPERT_KEYS if _int(cfg.get(k))), None)
    if facts.num_experts is None:
        m = re.search(r"(?<![a-z0-9])(\d+)x\d+(?:\.\d+)?b(?![a-z0-9])", (model_name or "").lower())
        facts.num_experts = int(m.group(1)) if m else None
    return facts


def ssm_targets(targets: list[str] | None, extra: list[str] | None = None) -> list[str]:
    """The targets (module names, paths or PEFT regexes; ``all-linear``) that reach a recurrence projection."""
    hits = []
    for target in [*(targets or []), *(extra or [])]:
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", target)}
        if target.strip().lower() == "all-linear" or words & SSM_TARGET_NAMES:
            hits.append(target)
    return hits
