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
        experts = [la.expert for la in rows]
        if experts != sorted(experts):  # the pairs come in expert order already (no per-row key calls then)
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
        norms = [_norm(la) for la in rows]
        energy = [n ** 2 for n in norms]
        total = sum(energy)
        cut = EXPERT_NEGLIGIBLE_REL * (stats.median(norms) or 0.0)
        for la, n, e in zip(rows, norms, energy, strict=True):
            la.energy_share = e / total if total > 0 else 0.0
            la.adapted = n > cut and n > 0.0
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


# Text output: coverage lines shown before the rest is summarised (a 94-layer Qwen3-235B-A22B fits whole).
COVERAGE_TEXT_LINES = 100
# Never-adapted expert indices spelled out per parameter in a coverage line (the JSON has them all).
_NEVER_SHOWN = 8


def _indices(never: Sequence[int]) -> str:
    shown = ", ".join(str(e) for e in never[:_NEVER_SHOWN])
    return shown + (f" +{len(never) - _NEVER_SHOWN} more" if len(never) > _NEVER_SHOWN else "")


def _layer_span(first: Any, last: Any) -> str:
    if first is None:  # a parameter outside numbered blocks
        return "no layer index"
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def coverage_lines(summary: dict[str, Any], max_lines: int = COVERAGE_TEXT_LINES) -> list[str]:
    """Per layer, which share of each stacked parameter's experts was adapted and which were not:
    ``layer 3: down_proj 125/128, gate_up_proj 128/128 experts adapted; never: down_proj 5, 77, 120``.

    Consecutive layers with the same coverage share one line (``layers 0-47: ...``), so a 48-layer MoE whose
    untrained experts are the same everywhere reads in one line; beyond ``max_lines`` the remaining layers are
    counted on a last line that says where to read them (never a silent cut)."""
    by_layer: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for p in summary["parameters"]:
        by_layer[p["layer"]].append(p)
    runs: list[list[Any]] = []  # [first layer, last layer, description, n layers]
    for layer, params in by_layer.items():
        counts = ", ".join(f"{p['parameter'].rpartition('.')[2]} {p['n_adapted']}/{p['num_experts']}"
                           for p in params)
        sets = {tuple(p["never_adapted"]) for p in params}
        if len(params) > 1 and len(sets) == 1 and params[0]["never_adapted"]:  # the same experts in each
            never = [f"experts {_indices(params[0]['never_adapted'])} in each"]
        else:
            never = [f"{p['parameter'].rpartition('.')[2]} {_indices(p['never_adapted'])}"
                     for p in params if p["never_adapted"]]
        text = f"{counts} experts adapted" + (f"; never adapted: {'; '.join(never)}" if never else "")
        if runs and runs[-1][2] == text and _next_layer(runs[-1][1], layer):
            runs[-1][1] = layer
            runs[-1][3] += 1
        else:
            runs.append([layer, layer, text, 1])
    lines = [f"{_layer_span(first, last)}: {text}" for first, last, text, _ in runs[:max(0, max_lines)]]
    rest = runs[max(0, max_lines):]
    if rest:
        n_rest = sum(run[3] for run in rest)
        lines.append(f"... {n_rest} more {'layer' if n_rest == 1 else 'layers'} ({_layer_span(rest[0][0], rest[-1][1])}"
                     "): every parameter's coverage is in --json, experts.parameters")
    return lines


def _next_layer(prev: Any, layer: Any) -> bool:
    """Whether ``layer`` directly follows ``prev`` (both integer block indices)."""
    return isinstance(prev, int) and isinstance(layer, int) and layer == prev + 1


def never_adapted_line(summary: dict[str, Any]) -> str | None:
    """The never-adapted experts as one fact (a coverage fact, not rank waste), or None when every expert was
    adapted: how many, in how many parameters and layers."""
    hit = [p for p in summary["parameters"] if p["never_adapted"]]
    if not hit:
        return None
    n = sum(len(p["never_adapted"]) for p in hit)
    layers = {p["layer"] for p in hit}
    return (f"Never adapted: {n} expert {'update is' if n == 1 else 'updates are'} zero or below "
            f"{EXPERT_NEGLIGIBLE_REL:g}× their parameter's median expert, in {len(hit)} of "
            f"{len(summary['parameters'])} stacked parameters ({len(layers)} {'layer' if len(layers) == 1 else 'layers'}"
            "): never routed to in training, or lost in a merge/export; a coverage gap, not rank waste")
