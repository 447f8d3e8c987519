"""vLLM facts the engine table and ``verify``/``export`` share (re-read at every vLLM release).

Sources: ``vllm/lora/peft_helper.py`` (``PEFTHelper``: ``_validate_features``, ``get_rank_and_scaling``,
``validate_legal``) and ``vllm/config/lora.py`` (``LoRAConfig.max_lora_rank``'s allowed values), as of vLLM
0.33.0, the release issue 17 measured with vLLM's own loading code on CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# vllm/config/lora.py LoRAConfig: max_lora_rank is a Literal of these values.
MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Packed (fused) projections: vLLM serves the LoRAs of these modules stacked in one layer, so a PEFT adapter
# that targets q_proj/k_proj/v_proj loads into qkv_proj (model's packed_modules_mapping).
PACKED_MODULES: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                              "gate_up_proj": ("gate_proj", "up_proj")}
# PEFTHelper._validate_features (>= 0.33.0): the only modules_to_save allowed (classification heads).
MODULES_TO_SAVE_ALLOWED: frozenset[str] = frozenset({"classifier", "score"})
# The first release whose PEFTHelper reads rank_pattern/alpha_pattern (get_rank_and_scaling). 0.33.0 is the
# release measured; older releases computed one lora_alpha/r for every module.
PATTERN_RELEASE: tuple[int, int, int] = (0, 33, 0)
CURRENT = "current"


def next_allowed_max_lora_rank(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves rank ``r`` (None above 512)."""
    for allowed in MAX_LORA_RANKS:
        if allowed >= r:
            return allowed
    return None


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.33.0"`` / ``"v0.10.1.post1"`` -> (0, 33, 0) / (0, 10, 1); ``"current"`` -> None (the newest)."""
    if text.strip().lower() in ("", CURRENT, "latest"):
        return None
    match = re.fullmatch(r"v?(\d{1,4})\.(\d{1,4})(?:\.(\d{1,4}))?(?:[.+-]?[A-Za-z][A-Za-z0-9.+-]{0,30})?",
                         text.strip())
    if match is None:
        raise ValueError(f"not a vLLM version: {text[:40]!r} (expected e.g. 0.33.0)")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def reads_patterns(version: tuple[int, int, int] | None) -> bool:
    return version is None or version >= PATTERN_RELEASE


def pattern_value(pattern: Mapping[str, float], module_name: str) -> float | None:
    """PEFTHelper._match_pattern (same rule as PEFT's get_pattern_key): the first key that matches a dotted
    suffix of ``module_name``, as a regular expression."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        except re.error:
            continue
    return None


def rank_and_scaling(module_name: str, r: int, lora_alpha: float, rank_pattern: Mapping[str, int],
                     alpha_pattern: Mapping[str, float], use_rslora: bool = False,
                     version: tuple[int, int, int] | None = None) -> tuple[int, float]:
    """(rank, scaling) vLLM applies to ``module_name`` (PEFTHelper.get_rank_and_scaling >= 0.33.0; one
    lora_alpha/r before). ``module_name`` without the ``base_model.model.`` prefix."""
    def scale(rank: int, alpha: float) -> float:
        return alpha / rank ** 0.5 if use_rslora else alpha / rank

    if not reads_patterns(version) or (not rank_pattern and not alpha_pattern):
        return r, scale(r, lora_alpha)
    # PEFT target_parameters expert stacks: vLLM's module names are experts.base_layer (gate_up_proj) and experts
    # (down_proj); PEFTHelper.get_rank_and_scaling maps them back to the parameter names before matching.
    if module_name.endswith(".experts.base_layer"):
        module_name = module_name.removesuffix(".base_layer") + ".gate_up_proj"
    elif module_name.endswith(".experts"):
        module_name += ".down_proj"
    rank = int(pattern_value(rank_pattern, module_name) or r)
    alpha = pattern_value(alpha_pattern, module_name)
    return rank, scale(rank, lora_alpha if alpha is None else alpha)
