"""Per-expert audit of MoE expert LoRA (PEFT ``target_parameters``): energy share, coverage, never-adapted experts.

PEFT initialises B to zeros (LoRA, Hu et al. 2021, §4.1; PEFT ``reset_lora_parameters``), so an expert that the
router never sent a token to during training keeps B_e = 0 and ΔW_e = 0 exactly; an expert whose update is tiny
next to its siblings' trained almost nothing. Serving stacks that mis-slice expert adapters (vLLM PRs 41384 and
52194, vLLM issue 55545, Unsloth PR 6936) show up the same way in a merged or exported adapter, so these rows are
the first thing to check on an MoE adapter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from gradience import stats
from gradience.issues import Issue
from gradience.policy.thresholds import EXPERT_NEGLIGIBLE_REL

_SHOWN = 5


def _groups(layers: Sequence[Any]) -> dict[str, list[Any]]:
    """Expert rows by their stacked parameter (``model.layers.3.mlp.experts.gate_up_proj``), in expert order."""
    out: dict[str, list[Any]] = defaultdict(list)
    for layer in layers:
        if getattr(layer, "expert", None) is not None:
            out[layer.name.rpartition("[")[0]].append(layer)
    for rows in out.values():
        rows.sort(key=lambda la: la.expert)
    return dict(out)


def _norm(layer: Any) -> float:
    value = layer.delta_frob_norm
    return float(value) if value is not None else 0.0


def annotate_experts(layers: Sequence[Any]) -> list[Issue]:
    """Set ``energy_share`` (the expert's share of Σ‖ΔW_e‖²_F over its parameter's experts) and ``adapted``
    (False: zero or negligible update) on every expert row; the issues say which experts were never adapted."""
    never: list[str] = []
    for rows in _groups(layers).values():
        energy = [_norm(la) ** 2 for la in rows]
        total = sum(energy)
        median = stats.median([_norm(la) for la in rows]) or 0.0
        for la, e in zip(rows, energy, strict=True):
            la.energy_share = e / total if total > 0 else 0.0
            la.adapted = _norm(la) > EXPERT_NEGLIGIBLE_REL * median and _norm(la) > 0.0
            if not la.adapted:
                never.append(la.name)
    if not never:
        return []
    return [Issue("expert_never_adapted",
                  f"{len(never)} expert update(s) are zero or below {EXPERT_NEGLIGIBLE_REL:g}× their parameter's "
                  f"median expert (never routed to in training, or lost in a merge/export): "
                  f"{', '.join(never[:_SHOWN])}{' and more' if len(never) > _SHOWN else ''}",
                  "warning", modules=never)]


def expert_summary(layers: Sequence[Any]) -> dict[str, Any] | None:
    """The ``experts`` block of the audit JSON (None for an adapter without expert rows): one entry per stacked
    parameter with its coverage (experts adapted / all), the never-adapted indices and the energy spread."""
    groups = _groups(layers)
    if not groups:
        return None
    params = []
    for name, rows in groups.items():
        shares = [getattr(la, "energy_share", None) for la in rows]
        never = [la.expert for la in rows if getattr(la, "adapted", True) is False]
        params.append({
            "parameter": name, "layer": rows[0].layer, "num_experts": rows[0].num_experts,
            "n_adapted": len(rows) - len(never), "never_adapted": never,
            "energy_share_max": max((s for s in shares if s is not None), default=None),
            "energy_share_min": min((s for s in shares if s is not None), default=None),
            "utilization_mean": stats.mean(la.utilization for la in rows),
        })
    n_rows = sum(len(rows) for rows in groups.values())
    n_adapted = sum(p["n_adapted"] for p in params)
    return {"n_expert_rows": n_rows, "n_adapted": n_adapted, "coverage": n_adapted / n_rows, "parameters": params}


def coverage_lines(summary: dict[str, Any]) -> list[str]:
    """One line per layer: ``layer 3: gate_up_proj 126/128 experts adapted, down_proj 128/128``."""
    by_layer: dict[Any, list[str]] = defaultdict(list)
    for p in summary["parameters"]:
        leaf = p["parameter"].rpartition(".")[2]
        by_layer[p["layer"]].append(f"{leaf} {p['n_adapted']}/{p['num_experts']}")
    return [f"layer {layer}: {', '.join(parts)} experts adapted" for layer, parts in by_layer.items()]
