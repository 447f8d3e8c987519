"""The adapter view: one audit summary as heatmaps, spectra, rank suggestions, issues and every layer."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from gradience.policy.thresholds import LOW_UTILIZATION
from gradience.report import charts
from gradience.report.heatmap import ColorScale, Grid, Heatmap, build_heatmap, finite_values
from gradience.report.views.base import MAX_ISSUES_SHOWN, ChartIds, UdrGroup, View
from gradience.report.views.base import fact as _fact
from gradience.textfmt import finite, human_count, num, pct, rank_value

SPECTRA_PER_PANEL = 3


def _udr_group(summary: dict[str, Any], label: str, rows: Sequence[dict[str, Any]]) -> UdrGroup:
    values = [float(r["udr"]) for r in rows if finite(r.get("udr")) is not None]
    keys = ("udr_median", "udr_mean", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3",
            "sdi_median", "n_layers_with_udr")
    block = {k: summary.get(k) for k in keys}
    block["base_model"] = summary.get("udr_base_model")
    reason = None
    if not values:
        reason = _udr_missing_reason(summary)
    return UdrGroup(label, values, block, reason)


def _udr_missing_reason(summary: dict[str, Any]) -> str:
    for issue in summary.get("issues") or []:
        if str(issue.get("code", "")).startswith(("udr", "base")) or "base model" in str(issue.get("message", "")):
            return str(issue.get("message"))
    if not summary.get("udr_requested"):
        return "base model unresolved: pass --base-model DIR_OR_ID (a local directory or the local HF cache)"
    return "no layer has a UDR value"


def _rank_fmt(v: float) -> str:
    return str(round(v))


UDR_LOG_DECADES = 1.0   # a UDR map spanning more than one decade is coloured on a log scale


def _udr_fmt(v: float) -> str:
    return f"{v:.3g}"


def adapter_heatmaps(rows: Sequence[dict[str, Any]], ids: ChartIds, udr_note: str | None) -> list[Heatmap]:
    """Utilization, k@90% and UDR per (block, module); each colour bar spans that map's min to max."""
    names = [str(r["name"]) for r in rows]
    grid = Grid.from_names(names)
    util = {str(r["name"]): finite(r.get("utilization")) for r in rows}
    k90 = {str(r["name"]): finite(r.get("energy_rank_90")) for r in rows}
    udr = {str(r["name"]): finite(r.get("udr")) for r in rows}
    maps = [
        build_heatmap("utilization", "utilization", grid, util, None, pct, uid=ids.next(),
                      note=f"stable rank / r; below {pct(LOW_UTILIZATION)} most of the rank is unused"),
        build_heatmap("k90", "k@90%", grid, k90, None, _rank_fmt, uid=ids.next(),
                      note="smallest k holding 90% of the update's energy (Σσ²)"),
    ]
    udr_vals = finite_values(udr)
    if udr_vals:
        positive = [v for v in udr_vals if v > 0]
        log = bool(positive) and len(positive) == len(udr_vals) and \
            math.log10(max(positive) / min(positive)) > UDR_LOG_DECADES
        maps.append(build_heatmap("udr", "UDR", grid, udr, ColorScale.for_data(udr_vals, log=log), _udr_fmt,
                                  uid=ids.next(), note="‖ΔW‖₂ / ‖W_base‖₂" + (", log colour scale" if log else "")))
    else:
        maps.append(build_heatmap("udr", "UDR", grid, {}, None, _udr_fmt, uid=ids.next(),
                                  note=udr_note or "not computed"))
    return maps


def _spectra(rows: Sequence[dict[str, Any]], ids: ChartIds) -> str | None:
    rated = [r for r in rows if finite(r.get("utilization")) is not None and r.get("singular_values")
             and (finite(r.get("sigma_max")) or 0) > 0]
    if not rated:
        return None
    ordered = sorted(rated, key=lambda r: (-float(r["utilization"]), str(r["name"])))
    n = min(SPECTRA_PER_PANEL, max(1, len(ordered) // 2)) if len(ordered) > 1 else 1
    most = ordered[:n]
    least = list(reversed(ordered[-n:])) if len(ordered) > 1 else []

    def line(r: dict[str, Any]) -> charts.SpectrumLine:
        return charts.SpectrumLine(f"{r['name']} (util {pct(r['utilization'])})",
                                   [float(x) if finite(x) is not None else math.nan for x in r["singular_values"]],
                                   r.get("energy_rank_90"))

    return charts.spectra_chart(ids.next(), [line(r) for r in most], [line(r) for r in least])


def _suggestions(summary: dict[str, Any]) -> dict[str, Any]:
    g = summary.get("global_rank_suggestions") or {}
    rows = []
    for label, key in (("median", "median"), ("p90", "p90")):
        item = g.get(key) or {}
        rows.append({"label": label, "r": item.get("r", summary.get(f"suggested_r_global_{'median' if key == 'median' else '90'}")),
                     "k90": rank_value(item.get("k90_percentile")),
                     "params": human_count(item.get("params_at_suggested")),
                     "saved": pct(item.get("reduction_ratio"))})
    per = summary.get("rank_suggestions")
    out: dict[str, Any] = {"global": rows, "params_current": human_count(g.get("params_current")),
                           "adapter_r": g.get("adapter_r"), "per_layer": None}
    if isinstance(per, dict) and per.get("default_r") is not None:
        peft_kwargs = {"r": per["default_r"], "lora_alpha": per.get("lora_alpha"),
                       "use_rslora": bool(per.get("use_rslora")), "rank_pattern": per.get("rank_pattern") or {},
                       "alpha_pattern": per.get("alpha_pattern") or {}}
        by_type = [{"type": t, "p90": rank_value(v.get("energy_rank_90_p90")), "r": v.get("suggested_r_p90")}
                   for t, v in (per.get("by_type") or {}).items()]
        out["per_layer"] = {
            "default_r": per["default_r"], "margin": per.get("margin"),
            "n_pattern": len(per.get("rank_pattern") or {}),
            "params": human_count(per.get("params_at_suggested")), "saved": pct(per.get("reduction_ratio")),
            "config_json": json.dumps(peft_kwargs, indent=2, sort_keys=False),
            "by_type": by_type,
            "suggested": {str(r["name"]): r.get("suggested_r") for r in per.get("layers") or []},
        }
    return out


def adapter_view(summary: dict[str, Any], ids: ChartIds, *, key: str = "adapter", label: str = "Adapter",
                 source: str = "") -> View:
    """The audit of one adapter: summary, heatmaps, spectra, rank suggestions, issues, all layers."""
    rows = list(summary.get("layers") or [])
    adapter = summary.get("adapter") or {}
    udr_group = _udr_group(summary, label, rows)
    suggestions = _suggestions(summary)
    suggested = (suggestions.get("per_layer") or {}).get("suggested", {})
    targets = adapter.get("target_modules")
    meta = [
        ("Adapter", str(summary.get("peft_dir") or "-")),
        ("Weights", str(summary.get("adapter_weights_path") or "-")),
        ("Base model", str(adapter.get("base_model_name_or_path") or "-")),
        ("UDR base", str(summary.get("udr_base_model") or "unresolved")),
        ("Config", f"{adapter.get('peft_type') or '-'} · r={adapter.get('r', '-')} · "
                   f"lora_alpha={adapter.get('lora_alpha', '-')}"
                   + (" · rsLoRA" if adapter.get("use_rslora") else "")
                   + (f" · task {adapter['task_type']}" if adapter.get("task_type") else "")),
        ("Targets", ", ".join(map(str, targets)) if isinstance(targets, list) else str(targets or "-")),
    ]
    if source:
        meta.insert(0, ("Source", source))
    cards = [
        _fact("LoRA params", human_count(summary.get("total_lora_params"))),
        _fact("Layers", str(summary.get("n_layers", len(rows)))),
        _fact("Stable rank (mean)", num(summary.get("stable_rank_mean"))),
        _fact("Utilization (mean)", pct(summary.get("utilization_mean")), "",
              "warn" if (finite(summary.get("utilization_mean")) or 1.0) < LOW_UTILIZATION else ""),
        _fact("k@90% p50 / p90", f"{rank_value(summary.get('energy_rank_90_p50'))} / "
                                 f"{rank_value(summary.get('energy_rank_90_p90'))}"),
        _fact("UDR median", num(summary.get("udr_median"), ".3g"),
              "" if udr_group.values else "not computed"),
    ]
    by_type = [{"type": t, "n": v.get("n_layers"), "params": human_count(v.get("params")),
                "sr": num(v.get("stable_rank_mean")), "util": pct(v.get("utilization_mean")),
                "k50": rank_value(v.get("energy_rank_90_p50")), "k90": rank_value(v.get("energy_rank_90_p90"))}
               for t, v in (summary.get("by_type") or {}).items()]
    table = [{"name": str(r.get("name")), "type": r.get("module_type") or "-", "r": r.get("r"),
              "util": pct(r.get("utilization")), "sr": num(r.get("stable_rank")),
              "k90": r.get("energy_rank_90") if r.get("energy_rank_90") is not None else "-",
              "dsm": num(r.get("delta_sigma_max"), ".3g"), "udr": num(r.get("udr"), ".3g"),
              "suggested": suggested.get(str(r.get("name")), "-"), "status": r.get("status") or "",
              "low": (finite(r.get("utilization")) or 1.0) < LOW_UTILIZATION}
             for r in rows]
    peft_dir = summary.get("peft_dir")
    command = f"gradience audit --peft-dir {_shell_quote(str(peft_dir))} --suggest-per-layer --json" \
        if peft_dir else None
    context = {
        "label": label, "meta": meta, "cards": cards, "by_type": by_type,
        "heatmaps": adapter_heatmaps(rows, ids, udr_group.unavailable),
        "spectra_svg": _spectra(rows, ids), "suggestions": suggestions, "command": command,
        "issues": (summary.get("issues") or [])[:MAX_ISSUES_SHOWN],
        "issue_count": len(summary.get("issues") or []), "layers": table,
        "composition": summary.get("composition") or {},
    }
    from gradience.report.intruders import intruder_heatmap  # issue 23: only for audits run with --intruders

    intruders = intruder_heatmap(rows, ids, summary)
    if intruders is not None:
        heatmaps: list[Heatmap] = context["heatmaps"]  # type: ignore[assignment]
        heatmaps.append(intruders)
    return View(key, label, "views/adapter.html.j2", context, [udr_group])


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)

