"""Which base tensor each audited layer is measured against, and one issue per reason that a layer has none."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from gradience.issues import Issue
from gradience.udr import UdrInput
from gradience.udr.base import BaseWeights
from gradience.udr.layout import _fits
from gradience.udr.names import BaseNameIndex
from gradience.udr.resolve import ResolvedBase

_LIST_LIMIT = 5  # modules named in an issue message (all of them are in Issue.modules)


@dataclass
class LayerPlan:
    """Layers grouped by the base tensor they need (one read serves them all), and why the others are skipped."""

    by_tensor: dict[str, list[UdrInput]] = field(default_factory=lambda: defaultdict(list))
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # issue code -> layers
    ambiguous: dict[str, list[str]] = field(default_factory=dict)      # layer -> candidate base tensors
    renamed: dict[str, str] = field(default_factory=dict)              # layer -> base tensor, when not exact
    shape_details: dict[str, str] = field(default_factory=dict)        # layer -> "tensor [shape] vs ΔW [shape]"


def match_layers(layers: list[UdrInput], weights: BaseWeights) -> LayerPlan:
    """Pair each layer with the usable base tensor its name maps to, so that only those tensors are read."""
    index = BaseNameIndex(weights.tensors)
    plan = LayerPlan()
    for inp in layers:
        match = index.match(inp.name)
        if match.tensor is None:
            plan.problems["base_tensor_" + match.how].append(inp.name)
            if match.how == "ambiguous":
                plan.ambiguous[inp.name] = list(match.candidates)
            continue
        info = weights.tensors[match.tensor]
        if info.file in weights.file_problems:
            plan.problems["base_shard_unreadable"].append(inp.name)
        elif not info.is_float:
            plan.problems["base_dtype_unsupported"].append(inp.name)
        elif not _fits(inp.kind, info.shape, inp.d_out, inp.d_in):
            plan.problems["base_shape_mismatch"].append(inp.name)
            plan.shape_details[inp.name] = f"{match.tensor} {list(info.shape)} vs ΔW {[inp.d_out, inp.d_in]}"
        else:
            plan.by_tensor[match.tensor].append(inp)
            if match.how != "exact":
                plan.renamed[inp.name] = match.tensor
    return plan


def plan_issues(plan: LayerPlan, resolved: ResolvedBase) -> list[Issue]:
    """One warning per reason layers were skipped, naming them, so a user sees why their UDR is null."""
    out: list[Issue] = []
    where = resolved.display
    ambiguous, details = plan.ambiguous, plan.shape_details
    for code, modules in plan.problems.items():
        if code == "base_tensor_missing":
            msg = f"no base weight found in {where} for: {list_modules(modules)}"
            extra: dict[str, Any] = {}
        elif code == "base_tensor_ambiguous":
            first = modules[0]
            msg = (f"several base weights in {where} match {first} ({', '.join(ambiguous[first][:3])}"
                   f"{' ...' if len(ambiguous[first]) > 3 else ''}); UDR skipped for: {list_modules(modules)}")
            extra = {"candidates": {m: ambiguous[m] for m in modules}}
        elif code == "base_shape_mismatch":
            msg = f"base weight shape differs from the update's: {details[modules[0]]}; UDR skipped for: " \
                  f"{list_modules(modules)}"
            extra = {"shapes": {m: details[m] for m in modules}}
        elif code == "base_dtype_unsupported":
            msg = f"base weight is not a floating-point tensor (quantized?); UDR skipped for: {list_modules(modules)}"
            extra = {}
        else:  # base_shard_unreadable
            msg = f"base weight lives in an unusable checkpoint file; UDR skipped for: {list_modules(modules)}"
            extra = {}
        out.append(Issue(code, msg, "warning", modules=list(modules), extra=extra))
    return out


def list_modules(modules: list[str]) -> str:
    """The first few module names for a message; the full list travels in ``Issue.modules``."""
    shown = ", ".join(modules[:_LIST_LIMIT])
    return shown + (f" (+{len(modules) - _LIST_LIMIT} more)" if len(modules) > _LIST_LIMIT else "")
