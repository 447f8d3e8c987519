"""``compress`` of MoE expert LoRA (PEFT ``target_parameters``): one rank per stacked parameter, one SVD per expert.

PEFT 0.21 ``tuners/lora/layer.py`` (``ParamWrapper.update_layer``) gives every expert of a 3-D parameter the same
rank r: ``lora_A`` is (r·E, in) and ``lora_B`` (out, r·E), and ``get_delta_weight`` reads expert e's A as rows
e·r .. e·r+r-1 and its B as the columns e, e+E, e+2E, ... (B reshaped (out, r, E)). A compressed stacked parameter
therefore has ONE rank K, chosen here as the **maximum over its experts of the rank the policy asks for each
expert**: every expert then keeps at least the energy (or rank, or σ ratio) the policy demands of it. Applying an
energy threshold jointly to the stack instead would let the few experts with the largest updates decide K and cut
the rarely-routed experts' updates (often the smallest, and the ones whose loss is hardest to notice). ``--budget``
is the one joint policy: each stacked parameter is one allocation item whose rank step costs E·(in + out)
parameters and whose gain is the sum of its experts' retained-energy fractions (every expert counts like a module,
as the budget objective counts modules, :mod:`gradience.compress.budget`).

Each expert is then truncated (or rescaled) on its own with the ordinary factor code
(:mod:`gradience.compress.factors`) and the K-rank factors are written back in PEFT's layout. The output config
keys ``rank_pattern`` by the parameter's PEFT key (``model.layers.0.mlp.experts.gate_up_proj``:
``BaseTuner._inject_parameters`` passes ``f"{module}.{param}"`` as ``current_key`` to ``_create_and_replace``,
which looks it up with ``get_pattern_key``). Where the adapter reader had to assume which nested wrapper holds
which parameter (issue ``expert_parameter_assumed``), all wrappers of that module get the same K under one
pattern for the module's parameters, so a wrong assumption cannot mis-assign a rank.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradience.adapter.experts import split_expert_name
from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.compress.budget import BudgetLayer

Factors = tuple[np.ndarray, np.ndarray]


def stacked_groups(pairs: Sequence[LoraPair]) -> dict[str, list[int]]:
    """Indices of expert pairs by their stacked factor (the ``lora_A`` key), in expert order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        if pair.expert is not None:
            groups[pair.a_key].append(i)
    for idx in groups.values():
        idx.sort(key=lambda i: pairs[i].expert or 0)
    return dict(groups)


def parameter_name(pair: LoraPair) -> str:
    """``model.layers.0.mlp.experts.gate_up_proj`` for any expert row of that parameter."""
    return split_expert_name(pair.name)[0]


def assumed_modules(loaded: LoadedAdapter) -> set[str]:
    """Modules whose wrapper -> parameter assignment the reader assumed (see ``adapter/experts.py``)."""
    out: set[str] = set()
    for issue in loaded.issues:
        if issue.code == "expert_parameter_assumed":
            out.update(issue.modules or [])
    return out


def _module(pair: LoraPair) -> str:
    return parameter_name(pair).rpartition(".")[0]


def joint_ranks(pairs: Sequence[LoraPair], ks: Sequence[int], assumed: set[str]) -> list[int]:
    """``ks`` with every expert of a stacked parameter raised to the group's maximum (all wrappers of an
    ``assumed`` module to the module's maximum); ordinary modules unchanged."""
    out = list(ks)
    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        unit = stack_unit(pair, assumed)
        if unit is not None:
            by_unit[unit].append(i)
    for idx in by_unit.values():
        top = max(out[i] for i in idx)
        for i in idx:
            out[i] = top
    return out


def stack_unit(pair: LoraPair, assumed: set[str] | None) -> str | None:
    """The rank unit of a pair: None for an ordinary module, else its stack (or, for a module whose wrapper
    assignment was assumed, the module: all its stacks share one rank)."""
    if pair.expert is None:
        return None
    module = _module(pair)
    return f"module:{module}" if assumed and module in assumed else f"stack:{pair.a_key}"


def budget_items(pairs: Sequence[LoraPair], sigmas: Sequence[np.ndarray | None], candidates: Callable[[int], tuple[int, ...]],
                 assumed: set[str] | None = None) -> tuple[list[BudgetLayer], list[list[int]]]:
    """:func:`joint_budget_items` for compress: ordinary pairs alone, expert pairs by their stacked factor (all
    stacks of an ``assumed`` module together: :func:`joint_ranks` gives them one rank, so the budget must too)."""
    return joint_budget_items([stack_unit(p, assumed) for p in pairs], sigmas, [p.r for p in pairs],
                              [p.d_in + p.d_out for p in pairs], candidates)


def joint_budget_items(stacks: Sequence[str | None], sigmas: Sequence[np.ndarray | None], caps: Sequence[int],
                       costs: Sequence[int], candidates: Callable[[int], tuple[int, ...]]
                       ) -> tuple[list[BudgetLayer], list[list[int]]]:
    """One :class:`BudgetLayer` per ordinary module (``stacks[i]`` None) and per stacked parameter (the indices
    sharing one ``stacks`` key), and the indices each item stands for. A stack's σ is √(Σ_e σ_e²/‖ΔW_e‖²)
    (non-increasing; its retained fraction is the mean of the experts' fractions), its cost per rank step the sum
    of its experts' and its weight the number of non-zero experts (see the module docstring)."""
    items: list[BudgetLayer] = []
    members: list[list[int]] = []
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(stacks):
        if key is not None:
            grouped[key].append(i)
    done: set[str] = set()
    for i, key in enumerate(stacks):
        if key is None:
            sigma = sigmas[i]
            ok = sigma is not None
            items.append(BudgetLayer(sigma=sigma if sigma is not None else np.zeros(caps[i]), cost=costs[i],
                                     candidates=candidates(caps[i]) if ok else (caps[i],)))
            members.append([i])
            continue
        if key in done:
            continue
        done.add(key)
        idx = grouped[key]
        cap = max(caps[j] for j in idx)
        finite = [s for s in (sigmas[j] for j in idx) if s is not None]
        joint = np.zeros(cap)
        nonzero = 0
        for s in finite:
            sq = np.square(np.asarray(s, dtype=np.float64))[:cap]
            total = float(sq.sum())
            if total > 0.0:
                joint[: sq.size] += sq / total
                nonzero += 1
        ok = len(finite) == len(idx)
        items.append(BudgetLayer(sigma=np.sqrt(joint), cost=sum(costs[j] for j in idx),
                                 candidates=candidates(cap) if ok else (cap,), weight=float(max(nonzero, 1))))
        members.append(list(idx))
    return items, members


def rank_pattern(pairs: Sequence[LoraPair], ks: Sequence[int], default_r: int, assumed: set[str],
                 key_for: Callable[[str, list[str]], str], all_names: list[str]) -> dict[str, int]:
    """The ``rank_pattern`` entries of the stacked parameters whose K differs from ``default_r``."""
    out: dict[str, int] = {}
    for idx in stacked_groups(pairs).values():
        pair, k = pairs[idx[0]], ks[idx[0]]
        if k == default_r:
            continue
        module = _module(pair)
        if module in assumed:
            out["^" + re.escape(module) + r"\.[^.]+"] = k
        else:
            out[key_for(parameter_name(pair), all_names)] = k
    return out


def split_stack(a: np.ndarray, b: np.ndarray, experts: int, r: int) -> list[Factors]:
    """PEFT's stacked (r·E, in) / (out, r·E) factors -> [(A_e (r, in), B_e (out, r))] (``get_delta_weight``)."""
    a3 = a.reshape(experts, r, a.shape[-1])
    b3 = b.reshape(b.shape[0], r, experts)
    return [(a3[e], b3[:, :, e]) for e in range(experts)]


def join_stack(factors: Sequence[Factors], k: int) -> Factors:
    """The inverse of :func:`split_stack` for rank k: A (k·E, in) with expert e's rows e·k..e·k+k-1, B (out, k·E)
    with expert e's rank-j column at j·E + e."""
    experts = len(factors)
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    a = np.empty((experts, k, d_in), dtype=np.float64)
    b = np.empty((d_out, k, experts), dtype=np.float64)
    for e, (a_e, b_e) in enumerate(factors):
        a[e] = a_e
        b[:, :, e] = b_e
    return a.reshape(experts * k, d_in), b.reshape(d_out, k * experts)


def expert_row(pair: LoraPair) -> dict[str, Any]:
    """Additive keys of a compress/merge JSON row for an expert pair."""
    return {"expert": pair.expert, "num_experts": pair.num_experts, "parameter": parameter_name(pair)}
