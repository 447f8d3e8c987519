"""Compress a LoRA adapter to smaller ranks that PEFT, vLLM and llama.cpp load exactly (SPEC §12).

Entry point: :func:`compress` (``LoadedAdapter`` + OUT + :class:`CompressOptions` -> :class:`CompressResult`,
whose ``to_dict()`` is the ``gradience.compress/v1`` document). Needs numpy only (never torch).
"""

from gradience.compress.core import (
    SCHEMA,
    CompressOptions,
    CompressResult,
    LayerPlan,
    check_output_dir,
    compress,
    mutated_init,
    plan,
)
from gradience.compress.policy import POLICY_NAMES, Policy

__all__ = [
    "POLICY_NAMES",
    "SCHEMA",
    "CompressOptions",
    "CompressResult",
    "LayerPlan",
    "Policy",
    "check_output_dir",
    "compress",
    "mutated_init",
    "plan",
]
