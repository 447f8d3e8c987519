"""``--budget``: distribute a total LoRA parameter budget over the layers.

Objective (exactly): maximize Σ_i E_i(k_i), where E_i(k) = Σ_{j≤k} σ_ij² / Σ_j σ_ij² is the fraction of layer
i's update energy (‖ΔW_k‖_F² / ‖ΔW‖_F²) that rank k retains, subject to Σ_i k_i·(d_in,i + d_out,i) ≤ P and
k_i ∈ candidates_i (ranks between the layer's floor and cap, or the allowed ranks there). Every layer counts
equally, whatever its size: the budget goes where one parameter buys the largest share of a layer's update.

Greedy: start every layer at its floor and repeatedly take the step (to the layer's next candidate rank) with
the largest gain per parameter, ΔE / (Δk·(d_in + d_out)); a step that does not fit ends that layer (its later
steps have a lower ratio and cannot come first). Because σ² is non-increasing, each layer's ratios are
non-increasing (the gain sequence is concave), which gives:

* the allocation never exceeds P (checked at every step);
* when every step costs the same (all layers of one shape, unit steps), greedy is optimal: it takes the P/c
  largest marginal gains, and concavity makes any such set a valid allocation;
* in general it is optimal for the parameters it spent up to its first skipped step (that prefix is also the
  optimum of the LP relaxation at that cost), and the LP relaxation at P bounds the gap: ``upper_bound`` −
  ``objective`` is reported, and is below the gain of one rank step.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradience.errors import InputError


@dataclass(frozen=True)
class BudgetLayer:
    """One layer's inputs to the allocation."""

    sigma: np.ndarray          # unscaled σ, descending
    cost: int                  # parameters per unit of rank: d_in + d_out
    candidates: tuple[int, ...]  # ranks the layer may take, ascending; the first is its floor
    # How many modules' energy fractions this item stands for (a stacked MoE parameter: its non-zero experts,
    # whose σ is then the mean-normalised joint spectrum of compress/experts.py); 1 for an ordinary module.
    weight: float = 1.0


@dataclass(frozen=True)
class BudgetResult:
    ranks: list[int]
    params: int
    objective: float           # Σ_i E_i(k_i)
    upper_bound: float         # LP-relaxation optimum at the budget (>= the true optimum)
    prefix_params: int         # parameters at the first skipped step (greedy is optimal for this budget)


def retained(sigma: np.ndarray, k: int) -> float:
    """E(k) = Σ_{j≤k} σ_j² / Σσ² (1.0 for a zero update: nothing is lost)."""
    sq = np.square(np.asarray(sigma, dtype=np.float64))
    total = float(sq.sum())
    if total <= 0.0:
        return 1.0
    return float(sq[:k].sum()) / total


def _segments(layer: BudgetLayer) -> list[tuple[float, int]]:
    """(gain, cost) of each step between consecutive candidates."""
    out = []
    cands = layer.candidates
    for lo, hi in itertools.pairwise(cands):
        gain = layer.weight * (retained(layer.sigma, hi) - retained(layer.sigma, lo))
        out.append((max(gain, 0.0), (hi - lo) * layer.cost))
    return out


def allocate(layers: Sequence[BudgetLayer], budget: int) -> BudgetResult:
    """Greedy allocation of ``budget`` parameters (see the module docstring for what it guarantees)."""
    floor = sum(layer.candidates[0] * layer.cost for layer in layers)
    if floor > budget:
        raise InputError(f"--budget {budget} parameters is below the minimum of {floor} (every layer at its "
                         "lowest allowed rank)")
    segs = [_segments(layer) for layer in layers]
    pos = [0] * len(layers)
    spent = floor
    heap: list[tuple[float, int]] = []
    for i, s in enumerate(segs):
        if s and s[0][0] > 0.0:
            heap.append((-s[0][0] / s[0][1], i))
    heapq.heapify(heap)
    prefix_params: int | None = None
    while heap:
        _neg, i = heapq.heappop(heap)
        _gain, cost = segs[i][pos[i]]
        if spent + cost > budget:
            if prefix_params is None:
                prefix_params = spent
            continue  # this layer is done: its later steps have lower ratios
        spent += cost
        pos[i] += 1
        if pos[i] < len(segs[i]) and segs[i][pos[i]][0] > 0.0:
            g, c = segs[i][pos[i]]
            heapq.heappush(heap, (-g / c, i))
    ranks = [layer.candidates[p] for layer, p in zip(layers, pos, strict=True)]
    objective = sum(layer.weight * retained(layer.sigma, k) for layer, k in zip(layers, ranks, strict=True))
    return BudgetResult(ranks=ranks, params=spent, objective=objective,
                        upper_bound=_lp_bound(layers, segs, budget - floor),
                        prefix_params=spent if prefix_params is None else prefix_params)


def _lp_bound(layers: Sequence[BudgetLayer], segs: list[list[tuple[float, int]]], room: int) -> float:
    """Optimum of the LP relaxation (fractional steps allowed): steps by ratio, the last one fractional."""
    value = sum(layer.weight * retained(layer.sigma, layer.candidates[0]) for layer in layers)
    steps = sorted(((g / c, i, j, g, c) for i, s in enumerate(segs) for j, (g, c) in enumerate(s) if g > 0.0),
                   key=lambda t: (-t[0], t[1], t[2]))
    for _ratio, _i, _j, gain, cost in steps:
        if cost <= room:
            value += gain
            room -= cost
        else:
            value += gain * room / cost
            break
    return value


def parse_budget(spec: str, params_before: int) -> int:
    """``"1200000"`` (parameters) or ``"30%"`` (of the input's LoRA parameters) -> a parameter count."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0.0 < pct <= 100.0:
                raise InputError(f"--budget: a percentage must be in (0, 100], got {text}")
            return int(params_before * pct / 100.0)
        value = int(text)
    except ValueError:
        raise InputError(f"--budget: '{text}' is neither an integer number of parameters nor a percentage "
                         "such as 30%") from None
    if value < 1:
        raise InputError(f"--budget must be >= 1 parameter, got {value}")
    return value
