"""Merge LoRA adapters exactly, from their factors, into one adapter PEFT loads (issue 19).

Entry point: :func:`merge` (``LoadedAdapter`` list + OUT + :class:`MergeOptions` -> :class:`MergeResult`, whose
``to_dict()`` is the ``gradience.merge/v1`` document). Needs numpy only (never torch).
"""

from gradience.merge.core import merge
from gradience.merge.result import METHODS, SCHEMA, MergeOptions, MergeResult, ModulePlan

__all__ = ["METHODS", "SCHEMA", "MergeOptions", "MergeResult", "ModulePlan", "merge"]
