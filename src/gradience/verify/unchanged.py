"""Base weights no adapter module adapts: a merge must copy them unchanged (``verify --merged``).

Same dtype: the stored bytes are compared chunk by chunk (no float conversion). Another float dtype: equal within
the coarser dtype's rounding. With a QLoRA adapter and a 16-bit base, a weight stored as deq(Q(W₁₆)) within
rounding is what a merge done from the 4-bit model writes for every quantised layer: counted apart, not changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradience.udr.base import BaseWeights
from gradience.verify.blocks import TensorBlocks, bitwise_equal, close_within
from gradience.verify.verdict import unit_roundoff


@dataclass
class UnchangedCheck:
    """Base weights no adapter module adapts: a merge must copy them unchanged."""

    checked: int = 0
    identical: int = 0
    within_rounding: int = 0          # stored in another float dtype, equal within its rounding
    dequantized_4bit: int = 0         # QLoRA: stored as deq(Q(W16)) within rounding (merged from the 4-bit model)
    changed: list[str] = field(default_factory=list)
    missing_in_merged: list[str] = field(default_factory=list)
    extra_in_merged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "identical": self.identical, "within_rounding": self.within_rounding,
                "dequantized_4bit": self.dequantized_4bit,
                "changed": self.changed, "missing_in_merged": self.missing_in_merged,
                "extra_in_merged": self.extra_in_merged}


def within_rounding(base: BaseWeights, merged: BaseWeights, name: str, u: float) -> bool:
    return close_within(TensorBlocks(base, name, flat=True), TensorBlocks(merged, name, flat=True), u)


def unchanged_status(base: BaseWeights, merged: BaseWeights, name: str, qlora: str | None = None) -> str:
    """identical | within_rounding | dequantized_4bit | changed | missing, for a base weight no adapter module
    adapts (``qlora``: the quant type of a QLoRA adapter's 4-bit base, when the base given is 16-bit)."""
    status = _status(base, merged, name)
    if status == "changed" and qlora is not None:
        from gradience.verify import qlora as q

        other = merged.tensors[name]
        if q.applies(base, name) and other.is_float and other.shape == base.tensors[name].shape:
            u = max(unit_roundoff(base.tensors[name].dtype), unit_roundoff(other.dtype))
            if q.untouched_is_twin(base, merged, name, qlora, u):
                return "dequantized_4bit"
    return status


def _status(base: BaseWeights, merged: BaseWeights, name: str) -> str:
    info, other = base.tensors[name], merged.tensors.get(name)
    if other is None:
        return "missing"
    if other.shape != info.shape:
        return "changed"
    if other.dtype == info.dtype:
        return "identical" if bitwise_equal(TensorBlocks(base, name), TensorBlocks(merged, name)) else "changed"
    if info.is_float and other.is_float:
        u = max(unit_roundoff(info.dtype), unit_roundoff(other.dtype))
        return "within_rounding" if within_rounding(base, merged, name, u) else "changed"
    return "changed"


def collect_unchanged(statuses: list[tuple[str, str]], base: BaseWeights, merged: BaseWeights,
                       adapted_merged: set[str]) -> UnchangedCheck:
    check = UnchangedCheck()
    for name, status in statuses:
        if status == "missing":
            check.missing_in_merged.append(name)
            continue
        check.checked += 1
        if status == "identical":
            check.identical += 1
        elif status == "within_rounding":
            check.within_rounding += 1
        elif status == "dequantized_4bit":
            check.dequantized_4bit += 1
        else:
            check.changed.append(name)
    check.extra_in_merged = [n for n in merged.tensors if n not in base.tensors and n not in adapted_merged]
    return check
