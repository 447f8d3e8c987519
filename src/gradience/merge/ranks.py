"""How many directions each merged module keeps: compress's policies applied to the merged spectra.

The spectrum is that of the exact weighted sum (``linear`` / ``svd``; at most R = Σrᵢ directions) or of the
element-wise merge M (``ties`` / ``dare``; at most min(d_out, d_in)). Without a policy, ``svd`` / ``ties`` /
``dare`` keep the largest input rank of each module (PEFT's ``add_weighted_adapter`` default for its SVD
combinations: ``new_rank = max(adapters_ranks)``, peft/tuners/lora/model.py ``_check_add_weighted_adapter``);
``cat`` and ``linear`` keep R (the exact sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.audit.spectrum import energy_rank
from gradience.audit.suggest import round_up_rank
from gradience.compress.budget import BudgetLayer, allocate, parse_budget
from gradience.compress.policy import (
    Policy,
    apply_modifiers,
    budget_candidates,
    raw_rank,
    uniform_budget_rank,
)
from gradience.policy.thresholds import ALLOWED_RANKS_DEFAULT


@dataclass(frozen=True)
class RankInput:
    """One module's facts for the decision: σ (descending), the most it can keep, its default, its cost."""

    sigma: np.ndarray
    cap: int
    default: int
    cost: int            # parameters per unit of rank: d_in + d_out


def decide(mods: Sequence[RankInput], policy: Policy | None, params_sum: int,
           stacks: Sequence[str | None] | None = None) -> tuple[list[int], dict[str, Any]]:
    """k per module (and policy facts for merge.json). ``params_sum``: parameters of the exact sum (rank R),
    the base of a ``--budget 30%``. ``stacks``: per module, the MoE expert stack it belongs to (None: an
    ordinary module); ``--budget`` allocates one rank per stack (:func:`gradience.compress.experts.joint_budget_items`)."""
    extra: dict[str, Any] = {}
    if policy is None:
        return [m.default for m in mods], extra
    if policy.name == "per_layer":
        # The audit's per-layer rule (allowed rank >= margin·k@90%, audit.suggest.per_layer_suggestions).
        allowed = policy.allowed_ranks or ALLOWED_RANKS_DEFAULT
        ks = [apply_modifiers(round_up_rank(policy.margin * max(energy_rank(m.sigma, 0.9), 1), allowed, m.cap),
                              m.cap, policy, round_to=None) for m in mods]
    elif policy.name == "budget":
        budget = parse_budget(str(policy.value), params_sum)
        extra["budget_params"] = budget
        if policy.uniform:
            ks = [uniform_budget_rank([m.cost for m in mods], [m.cap for m in mods], budget, policy)] * len(mods)
        else:
            if stacks is not None and any(s is not None for s in stacks):
                from gradience.compress.experts import joint_budget_items

                items, members = joint_budget_items(stacks, [m.sigma for m in mods], [m.cap for m in mods],
                                                    [m.cost for m in mods], lambda cap: budget_candidates(cap, policy))
            else:
                items = [BudgetLayer(m.sigma, m.cost, budget_candidates(m.cap, policy)) for m in mods]
                members = [[i] for i in range(len(mods))]
            res = allocate(items, budget)
            extra.update({"budget_params_used": res.params, "objective": res.objective,
                          "objective_upper_bound": res.upper_bound, "greedy_optimal_at_params": res.prefix_params})
            ks = [0] * len(mods)
            for idx, k in zip(members, res.ranks, strict=True):
                for i in idx:
                    ks[i] = k
    else:
        ks = [apply_modifiers(raw_rank(policy, m.sigma, m.cap), m.cap, policy, round_to=policy.allowed_ranks)
              for m in mods]
    if policy.uniform and ks:
        top = max(ks)
        ks = [top] * len(ks)
        extra["uniform_rank"] = top
    return ks, extra


