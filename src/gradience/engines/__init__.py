"""The one table of engine claims (PEFT, vLLM, llama.cpp), shared by compress, merge, verify and export.

API: build :class:`OutputFacts` for an adapter (or :func:`facts_from_config`), call :func:`evaluate` for
``{engine: {ok, reason, rules, version}}``; :data:`RULES` holds each row with the engine source it encodes.
Per-engine constants live in :mod:`gradience.engines.vllm` (``MAX_LORA_RANKS``,
``next_allowed_max_lora_rank``, ``PACKED_MODULES``, ``rank_and_scaling``) and :mod:`gradience.engines.llama_cpp`
(GGUF names, ``runtime_scale``); the MoE expert LoRA rows in :mod:`gradience.engines.experts`. Pure Python: no
numpy, no engine import.
"""

from gradience.engines.facts import OutputFacts, facts_from_config, is_norm_tensor
from gradience.engines.table import ENGINES, RULES, Rule, evaluate, parse_engine_versions, rule_sources
from gradience.engines.vllm import MAX_LORA_RANKS, next_allowed_max_lora_rank

__all__ = [
    "ENGINES",
    "MAX_LORA_RANKS",
    "RULES",
    "OutputFacts",
    "Rule",
    "evaluate",
    "facts_from_config",
    "is_norm_tensor",
    "next_allowed_max_lora_rank",
    "parse_engine_versions",
    "rule_sources",
]
