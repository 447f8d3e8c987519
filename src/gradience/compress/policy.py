"""How many singular directions each layer keeps: the policies of SPEC §12 and their modifiers.

Definitions (σ the layer's singular values, descending; thresholds relative, so the scale does not matter):

* ``rank K``         k = K.
* ``energy T``       smallest k with Σ_{i≤k} σ_i² ≥ T·Σσ² — PEFT's ``convert_to_lora`` float ``rank`` (explained
                     variance); the audit's ``energy_rank``.
* ``sv_fro T``       smallest k with ‖ΔW_k‖_F ≥ T·‖ΔW‖_F, i.e. Σ_{i≤k} σ_i² ≥ T²·Σσ² — kohya's ``sv_fro``.
* ``sv_cumulative T`` smallest k with Σ_{i≤k} σ_i ≥ T·Σσ — kohya's ``sv_cumulative``.
* ``sv_ratio X``     keep every σ_i ≥ σ₁/X — kohya's ``sv_ratio``.
* ``per_layer``      the audit's per-layer suggestion (allowed rank ≥ margin·k@90%, ≤ r).
* ``budget P``       see :mod:`gradience.compress.budget`.

Then, in this order: round up to ``allowed_ranks`` (only when given, except ``per_layer`` which always rounds as
the audit does), clamp to ``[min_rank, max_rank]``, never above the layer's r, never below 1 (PEFT needs r ≥ 1;
a zero update keeps one zero direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience.audit.spectrum import energy_rank
from gradience.audit.suggest import round_up_rank
from gradience.errors import InputError
from gradience.policy.thresholds import ENERGY_RANK_RTOL

POLICY_NAMES = ("rank", "energy", "sv_fro", "sv_cumulative", "sv_ratio", "per_layer", "budget")


@dataclass
class Policy:
    """A validated policy and its modifiers (what ``compress.json`` records under ``policy``)."""

    name: str
    value: float | int | str | None = None
    margin: float = 1.0
    min_rank: int | None = None
    max_rank: int | None = None
    allowed_ranks: tuple[int, ...] | None = None
    uniform: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "value": self.value}
        if self.name == "per_layer":
            out["margin"] = self.margin
        out.update({"min_rank": self.min_rank, "max_rank": self.max_rank,
                    "allowed_ranks": None if self.allowed_ranks is None else list(self.allowed_ranks),
                    "uniform": self.uniform})
        out.update(self.extra)
        return out


def validate(policy: Policy) -> None:
    """Usage errors for values outside a policy's domain (InputError, exit 2)."""
    name, value = policy.name, policy.value
    if name not in POLICY_NAMES:
        raise InputError(f"unknown compress policy {name!r}")
    if name == "rank" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InputError(f"--rank must be an integer >= 1, got {value!r}")
    if name in ("energy", "sv_fro", "sv_cumulative") and (
            not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0):
            raise InputError(f"--{name.replace('_', '-')} must be a fraction in (0, 1], got {value!r}")
    if name == "sv_ratio" and (not isinstance(value, (int, float)) or not 1.0 <= float(value) < float("inf")):
        raise InputError(f"--sv-ratio must be a number >= 1 (keep σ >= σ1/X), got {value!r}")
    if not policy.margin > 0 or policy.margin == float("inf"):
        raise InputError(f"--margin must be a positive number, got {policy.margin}")
    for flag, v in (("--min-rank", policy.min_rank), ("--max-rank", policy.max_rank)):
        if v is not None and v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    if policy.min_rank is not None and policy.max_rank is not None and policy.min_rank > policy.max_rank:
        raise InputError(f"--min-rank {policy.min_rank} is above --max-rank {policy.max_rank}")


def _cumulative_rank(values: np.ndarray, level: float) -> int:
    cs = np.cumsum(values)
    total = float(cs[-1]) if cs.size else 0.0
    if total <= 0.0:
        return 0
    return int(np.searchsorted(cs, level * total * (1.0 - ENERGY_RANK_RTOL), side="left")) + 1


def raw_rank(policy: Policy, sigma: np.ndarray, r: int) -> int:
    """The policy's k for one layer before modifiers (``per_layer``/``budget`` are decided elsewhere)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    name, value = policy.name, policy.value
    if name == "rank":
        return int(value)  # type: ignore[arg-type]
    if name == "energy":
        return energy_rank(sigma, float(value))  # type: ignore[arg-type]
    if name == "sv_fro":
        return energy_rank(sigma, float(value) ** 2)  # type: ignore[arg-type]
    if name == "sv_cumulative":
        return _cumulative_rank(sigma, float(value))  # type: ignore[arg-type]
    if name == "sv_ratio":
        if sigma.size == 0 or sigma[0] <= 0.0:
            return 0
        cut = sigma[0] / float(value) * (1.0 - ENERGY_RANK_RTOL)  # type: ignore[arg-type]
        return int(np.count_nonzero(sigma >= cut))
    raise ValueError(f"policy {name!r} is not decided per layer")


def apply_modifiers(k: int, r: int, policy: Policy, *, round_to: Sequence[int] | None) -> int:
    """Round up to ``round_to`` (when given), clamp to min/max rank, cap at r, floor at 1."""
    if round_to:
        k = round_up_rank(max(k, 1), round_to, r)
    if policy.min_rank is not None:
        k = max(k, policy.min_rank)
    if policy.max_rank is not None:
        k = min(k, policy.max_rank)
    return max(1, min(k, r))


def uniform_budget_rank(costs: Sequence[int], caps: Sequence[int], budget: int, policy: Policy) -> int:
    """--budget --uniform: the largest single rank K (modules of lower cap zero-padded to K) whose parameters fit
    the budget; ``costs`` are parameters per unit of rank (d_in + d_out), ``caps`` the most each module holds.
    One rule for compress and merge."""
    per_rank = sum(costs)
    top = max(caps)
    if policy.max_rank is not None:
        top = min(top, policy.max_rank)
    k = min(top, budget // per_rank)
    floor = max(1, policy.min_rank or 1)
    if policy.allowed_ranks:
        fitting = [a for a in policy.allowed_ranks if floor <= a <= k]
        k = max(fitting) if fitting else 0
    if k < floor:
        raise InputError(f"--budget {budget} parameters cannot hold one uniform rank >= {floor} "
                         f"({per_rank} parameters per rank unit)")
    return k


def budget_candidates(r: int, policy: Policy) -> tuple[int, ...]:
    """Ranks a layer may take under ``--budget``: [floor, cap] or the allowed ranks inside it (cap always included
    so a layer can stay whole)."""
    lo = max(1, policy.min_rank or 1)
    hi = min(r, policy.max_rank or r)
    lo = min(lo, hi)
    if policy.allowed_ranks:
        first = round_up_rank(lo, policy.allowed_ranks, hi)
        return tuple(sorted({first, hi, *(a for a in policy.allowed_ranks if lo <= a <= hi)}))
    return tuple(range(lo, hi + 1))
