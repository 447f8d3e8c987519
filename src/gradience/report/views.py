"""The report's views: one data function per view, each returning a :class:`View` for its template block.

A data function turns library results (``MonitorReport``, the audit summary, a compare JSON) into plain
template context: numbers already formatted where the formatting is a decision (``-`` for unknown), charts
as inline SVG strings, heatmaps as cell lists. Templates only lay out; every input-derived string reaches
the page through Jinja's autoescaping. See :mod:`gradience.report` for how to add a view.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradience import stats
from gradience.policy.thresholds import LOW_UTILIZATION, UDR_FRACTION_LEVELS
from gradience.report import charts
from gradience.report.curves import RunCurves
from gradience.report.heatmap import ColorScale, Grid, Heatmap, build_heatmap, finite_values
from gradience.textfmt import finite, human_count, num, pct, rank_value, times

SPECTRA_PER_PANEL = 3
TOP_COMPARE_ROWS = 25
MAX_ISSUES_SHOWN = 50


@dataclass
class UdrGroup:
    """One UDR distribution for the sidebar: per-layer values plus the summary, or why there is none."""

    label: str
    values: list[float]
    summary: dict[str, Any]
    unavailable: str | None = None   # reason, when UDR could not be computed


@dataclass
class View:
    """What one view contributes to the page: a template block, its context, sidebar UDR groups."""

    key: str                  # anchor id, unique on the page
    title: str
    template: str             # template file under templates/views/
    context: dict[str, Any]
    udr: list[UdrGroup] = field(default_factory=list)


class ChartIds:
    """Deterministic, page-unique chart ids (prefix for the ids inside each SVG)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n}"


def _fact(label: str, value: str, hint: str = "", level: str = "") -> dict[str, str]:
    return {"label": label, "value": value, "hint": hint, "level": level}


# -- run ------------------------------------------------------------------------------------------------
def _findings_steps(findings: dict[str, Any] | None, limit: int = 12) -> str:
    if not findings or not findings.get("count"):
        return ""
    steps = [str(item.get("step")) for item in findings.get("listed", [])[:limit]]
    more = int(findings.get("count", 0)) - len(steps)
    return ", ".join(steps) + (f", … (+{more})" if more > 0 else "")


def run_view(report: Any, curves: RunCurves, ids: ChartIds) -> View:
    """The ``monitor`` story of a run plus its curves (loss, eval, lr, grad norm) with findings marked."""
    data = report.to_dict()
    signals, training = data["signals"], data["training"]
    config = data.get("config") or {}
    profile = data.get("task_profile") or {}
    meta = [
        ("File", data["file"]),
        ("Model", config.get("model_name") or "-"),
        ("Dataset", config.get("dataset_name") or "-"),
        ("Profile", (profile.get("name") or config.get("task_profile") or "-")
         + (" (inferred)" if profile.get("inferred") else "")),
        ("Run", str(data.get("run_id") or "-") + (f" (last of {len(data['runs'])} in the file)"
                                                  if len(data.get("runs") or []) > 1 else "")),
        ("Status", (training.get("status") or "-") + (f": {training['reason']}" if training.get("reason") else "")),
    ]
    lora = config.get("lora") or {}
    opt = config.get("optimizer") or {}
    if lora or opt:
        meta.append(("LoRA", f"r={lora.get('r', '-')} alpha={lora.get('alpha', '-')} targets="
                             f"{', '.join(map(str, lora.get('target_modules') or [])) or '-'}"))
        meta.append(("Optimizer", f"{opt.get('name') or '-'} lr={num(opt.get('lr'), 'g')} "
                                  f"weight decay={num(opt.get('weight_decay'), 'g')}"))

    test_split = signals.get("test_split") or "test"
    gap = signals.get("gap")
    gap_level = "bad" if finite(gap) is not None and gap >= signals.get("gap_threshold", math.inf) else ""
    cards = [
        _fact("Train PPL", num(signals.get("train_ppl"))),
        _fact(f"{test_split.capitalize()} PPL", num(signals.get("test_ppl")),
              "stand-in for test" if signals.get("test_split_fallback") else ""),
        _fact("Gap", times(gap), f"memorization at ≥ {times(signals.get('gap_threshold'))}", gap_level),
        _fact("Train acc", pct(signals.get("train_accuracy"))),
        _fact(f"{test_split.capitalize()} acc", pct(signals.get("test_accuracy"))),
    ]
    nan = training.get("nonfinite_loss") or {}
    spikes = training.get("loss_spikes") or {}
    expl = training.get("grad_explosions") or {}
    trend = training.get("loss_trend")
    lr = training.get("lr_schedule")
    onset = training.get("overfitting_onset")
    facts = [
        _fact("Steps logged", str(training.get("steps_logged") or 0),
              f"steps {training.get('first_step')}–{training.get('last_step')}" if training.get("steps_logged")
              else ""),
        _fact("Loss", f"last {num(training.get('last_loss'), '.4f')} · min {num(training.get('min_loss'), '.4f')}",
              f"min at step {training['min_loss_step']}" if training.get("min_loss_step") is not None else ""),
        _fact("Trend", trend["direction"] if trend else "-",
              f"{pct(trend.get('relative_change'))} over steps {trend['from_step']}–{trend['to_step']}"
              if trend else ""),
        _fact("NaN/Inf losses", str(nan.get("count", 0)), _findings_steps(nan), "bad" if nan.get("count") else ""),
        _fact(f"Loss spikes (> {num(spikes.get('factor'), 'g')}× median)", str(spikes.get("count", 0)),
              _findings_steps(spikes), "warn" if spikes.get("count") else ""),
        _fact("Grad norm max", num(training.get("grad_norm_max"), ".4g"),
              f"step {training['grad_norm_max_step']}" if training.get("grad_norm_max_step") is not None else ""),
        _fact(f"Grad explosions (> {num(expl.get('factor'), 'g')}× median)", str(expl.get("count", 0)),
              _findings_steps(expl), "warn" if expl.get("count") else ""),
        _fact("LR schedule", lr["shape"] if lr else "-",
              f"peak {num(lr.get('peak'), '.3g')} at step {lr.get('peak_step')}" if lr else ""),
        _fact("Overfitting onset", f"step {onset['onset_step']}" if onset else "none detected",
              f"{onset['test_split']} loss min {num(onset['best_test_loss'], '.4f')} at step {onset['best_step']}, "
              f"{num(onset['last_test_loss'], '.4f')} at the end" if onset else "", "warn" if onset else ""),
    ]

    loss_marks: list[charts.Mark] = []
    spike_pts = [(float(i["step"]), float(i["loss"])) for i in spikes.get("listed", [])
                 if finite(i.get("loss")) is not None and i.get("step") is not None]
    if spike_pts:
        loss_marks.append(charts.Mark(f"loss spike ({spikes.get('count')})", "points",
                                      [p[0] for p in spike_pts], [p[1] for p in spike_pts], charts.BAD))
    if onset:
        loss_marks.append(charts.Mark(f"best {onset['test_split']} loss (step {onset['best_step']})", "vline",
                                      [float(onset["best_step"])], [], charts.GOOD, ":"))
        loss_marks.append(charts.Mark(f"overfitting onset (step {onset['onset_step']})", "vline",
                                      [float(onset["onset_step"])], [], charts.WARN, "--"))
    loss_series = [charts.Series("train loss", curves.loss, charts.ACCENT)]
    for j, (split, d) in enumerate(sorted(curves.eval_loss.items())):
        loss_series.append(charts.Series(f"eval loss: {split}", d, charts.SERIES[(j + 1) % len(charts.SERIES)],
                                         "points"))
    loss_svg = charts.curve_chart(ids.next(), "Loss", "loss", loss_series, loss_marks)
    lr_svg = charts.curve_chart(ids.next(), "Learning rate", "lr",
                                [charts.Series("lr", curves.lr, charts.SERIES[3])],
                                width_in=charts.HALF_WIDTH_IN, log_y=False)
    expl_pts = [(float(i["step"]), float(i["grad_norm"])) for i in expl.get("listed", [])
                if finite(i.get("grad_norm")) is not None and i.get("step") is not None]
    grad_marks = [charts.Mark(f"explosion ({expl.get('count')})", "points", [p[0] for p in expl_pts],
                              [p[1] for p in expl_pts], charts.BAD)] if expl_pts else []
    grad_svg = charts.curve_chart(ids.next(), "Gradient norm", "grad norm",
                                  [charts.Series("grad norm", curves.grad_norm, charts.SERIES[2])], grad_marks,
                                  width_in=charts.HALF_WIDTH_IN)
    acc_series = [charts.Series(f"accuracy: {split}", d, charts.SERIES[(j + 1) % len(charts.SERIES)], "points")
                  for j, (split, d) in enumerate(sorted(curves.eval_accuracy.items()))]
    acc_svg = charts.curve_chart(ids.next(), "Eval accuracy", "accuracy", acc_series,
                                 width_in=charts.HALF_WIDTH_IN, log_y=False, percent=True) if acc_series else None
    downsampled = curves.loss.count if not curves.loss.exact else 0

    alerts = data.get("alerts") or {}
    log_audit = data.get("audit")
    audit_facts = []
    if log_audit:
        sugg = log_audit.get("suggested") or {}
        audit_facts = [
            _fact("Stable rank (mean)", num(log_audit.get("stable_rank_mean"))),
            _fact("Utilization (mean)", pct(log_audit.get("utilization_mean"))),
            _fact("k@90% p50 / p90", f"{rank_value(log_audit.get('energy_rank_90_p50'))} / "
                                     f"{rank_value(log_audit.get('energy_rank_90_p90'))}"),
            _fact("Suggested r (median / p90)",
                  f"{(sugg.get('median') or {}).get('r', '-')} / {(sugg.get('p90') or {}).get('r', '-')}"),
        ]
    context = {
        "meta": meta, "cards": cards, "facts": facts,
        "loss_svg": loss_svg, "lr_svg": lr_svg, "grad_svg": grad_svg, "acc_svg": acc_svg,
        "downsampled": downsampled, "bucket_width": curves.loss.width,
        "alerts": alerts.get("groups") or [], "alerts_total": alerts.get("total", 0),
        "recommendations": data.get("recommendations") or [],
        "telemetry_issues": (data.get("telemetry_issues") or [])[:MAX_ISSUES_SHOWN],
        "telemetry_issue_count": len(data.get("telemetry_issues") or []),
        "audit_facts": audit_facts, "audit_step": (log_audit or {}).get("step"),
    }
    return View("run", "Training run", "views/run.html.j2", context)


# -- adapter --------------------------------------------------------------------------------------------
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


def adapter_heatmaps(rows: Sequence[dict[str, Any]], r_max: int, udr_note: str | None) -> list[Heatmap]:
    names = [str(r["name"]) for r in rows]
    grid = Grid.from_names(names)
    util = {str(r["name"]): finite(r.get("utilization")) for r in rows}
    k90 = {str(r["name"]): finite(r.get("energy_rank_90")) for r in rows}
    udr = {str(r["name"]): finite(r.get("udr")) for r in rows}
    # Utilization rarely exceeds 50%: the scale ends at the largest value (rounded up to 10%), at least 25%.
    util_top = max([0.25, *(math.ceil(v * 10 - 1e-9) / 10 for v in finite_values(util))])
    maps = [
        build_heatmap("utilization", "utilization", grid, util, ColorScale("viridis", 0.0, min(1.0, util_top)),
                      pct,
                      note=f"stable rank / r; below {pct(LOW_UTILIZATION)} most of the rank is unused"),
        build_heatmap("k90", "k@90%", grid, k90, ColorScale("viridis", 1.0, max(2.0, float(r_max))), _rank_fmt,
                      note="smallest k holding 90% of the update's energy (Σσ²)"),
    ]
    udr_vals = [v for v in finite_values(udr) if v > 0]
    if udr_vals:
        lo, hi = min(udr_vals), max(udr_vals)
        if hi / lo < 10:
            lo, hi = lo / 3.16, hi * 3.16
        maps.append(build_heatmap("udr", "UDR", grid, udr, ColorScale("magma_r", lo, hi, log=True),
                                  lambda v: f"{v:.3g}", note="‖ΔW‖₂ / ‖W_base‖₂, log colour scale"))
    else:
        empty = build_heatmap("udr", "UDR", grid, {}, ColorScale("magma_r", 0.01, 1.0, log=True),
                              lambda v: f"{v:.3g}", note=udr_note or "not computed")
        maps.append(empty)
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
    r_max = max([int(r["r"]) for r in rows if isinstance(r.get("r"), int)] or [int(adapter.get("r") or 1)])
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
        "heatmaps": adapter_heatmaps(rows, r_max, udr_group.unavailable),
        "spectra_svg": _spectra(rows, ids), "suggestions": suggestions, "command": command,
        "issues": (summary.get("issues") or [])[:MAX_ISSUES_SHOWN],
        "issue_count": len(summary.get("issues") or []), "layers": table,
        "composition": summary.get("composition") or {},
    }
    return View(key, label, "views/adapter.html.j2", context, [udr_group])


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# -- compare --------------------------------------------------------------------------------------------
def _side(module: dict[str, Any], side: str, key: str) -> float | None:
    """A per-side value of a compare module row: nested ``{"a": {...}}`` or flat ``a_<key>`` / ``<key>_a``."""
    nested = module.get(side)
    if isinstance(nested, dict) and key in nested:
        return finite(nested.get(key))
    for k in (f"{side}_{key}", f"{key}_{side}"):
        if k in module:
            return finite(module.get(k))
    return None


def _delta(module: dict[str, Any], key: str) -> float | None:
    d = module.get("delta")
    if isinstance(d, dict) and key in d:
        return finite(d.get(key))
    if f"delta_{key}" in module:
        return finite(module.get(f"delta_{key}"))
    a, b = _side(module, "a", key), _side(module, "b", key)
    return None if a is None or b is None else b - a


def _summary_side(summary: dict[str, Any], side: str, key: str) -> Any:
    nested = summary.get(side)
    if isinstance(nested, dict) and key in nested:
        return nested.get(key)
    for k in (f"{side}_{key}", f"{key}_{side}"):
        if k in summary:
            return summary.get(k)
    return None


def _symmetric(values: list[float], floor: float) -> float:
    return max([abs(v) for v in values] + [floor])


def compare_view(doc: dict[str, Any], ids: ChartIds) -> View:
    """A ``gradience.compare/v1`` document: summary, delta heatmaps, cos/overlap per module, top modules."""
    a, b = doc.get("a") or {}, doc.get("b") or {}
    summary = doc.get("summary") or {}
    modules = [m for m in doc.get("modules") or [] if isinstance(m, dict) and m.get("name") is not None]
    names = [str(m["name"]) for m in modules]
    grid = Grid.from_names(names)

    def col(fn: Any) -> dict[str, float | None]:
        return {str(m["name"]): fn(m) for m in modules}

    d_util = col(lambda m: _delta(m, "utilization"))
    d_udr = col(lambda m: _delta(m, "udr"))
    cos = col(lambda m: finite(m.get("cos")))
    ov_l = col(lambda m: finite(m.get("overlap_left")))
    ov_r = col(lambda m: finite(m.get("overlap_right")))
    signed = lambda v: f"{v:+.3g}"  # noqa: E731
    heatmaps = [
        build_heatmap("d_util", "Δ utilization (B − A)", grid, d_util,
                      ColorScale("RdBu_r", -_symmetric(finite_values(d_util), 0.05),
                                 _symmetric(finite_values(d_util), 0.05)), signed, note="red: B uses more rank"),
        build_heatmap("d_udr", "Δ UDR (B − A)", grid, d_udr,
                      ColorScale("RdBu_r", -_symmetric(finite_values(d_udr), 1e-3),
                                 _symmetric(finite_values(d_udr), 1e-3)), signed,
                      note="red: B moved the base weight more" if finite_values(d_udr)
                      else "UDR needs a base model (compare --base-model)"),
        build_heatmap("cos", "cos(ΔW_A, ΔW_B)", grid, cos, ColorScale("RdBu_r", -1.0, 1.0),
                      lambda v: f"{v:.3f}", note="1: same update direction, 0: unrelated, -1: opposite"),
        build_heatmap("overlap_left", "overlap (left)", grid, ov_l, ColorScale("viridis", 0.0, 1.0),
                      lambda v: f"{v:.3f}", note="‖U_Aᵀ U_B‖²_F / k of the top-k output directions"),
        build_heatmap("overlap_right", "overlap (right)", grid, ov_r, ColorScale("viridis", 0.0, 1.0),
                      lambda v: f"{v:.3f}", note="same for the input directions"),
    ]
    unavailable_raw = summary.get("unavailable")
    unavailable: dict[str, Any] = unavailable_raw if isinstance(unavailable_raw, dict) else {}
    for h in heatmaps:  # an empty map says why (the compare document records the reason per measure)
        if h.empty:
            reason = unavailable.get(h.key.removeprefix("d_")) or unavailable.get(h.key)
            h.note = str(reason) if reason else "not computed for any matched module"

    def order_key(m: dict[str, Any]) -> tuple[float, str]:
        d = _delta(m, "udr")
        return (-abs(d) if d is not None else 0.0, str(m["name"]))

    top = sorted(modules, key=order_key)[:TOP_COMPARE_ROWS]
    rows = [{"name": str(m["name"]),
             "util_a": pct(_side(m, "a", "utilization")), "util_b": pct(_side(m, "b", "utilization")),
             "udr_a": num(_side(m, "a", "udr"), ".3g"), "udr_b": num(_side(m, "b", "udr"), ".3g"),
             "d_udr": num(_delta(m, "udr"), "+.3g"), "cos": num(m.get("cos"), ".3f"),
             "ov_l": num(m.get("overlap_left"), ".3f"), "ov_r": num(m.get("overlap_right"), ".3f"),
             "k": m.get("k") if m.get("k") is not None else "-"} for m in top]

    def side_meta(side: dict[str, Any]) -> str:
        targets = side.get("targets")
        targets_s = ", ".join(map(str, targets)) if isinstance(targets, list) else str(targets or "-")
        return (f"{side.get('path') or '-'} · base {side.get('base_model_name_or_path') or '-'} · "
                f"r={side.get('r', '-')} · alpha={side.get('alpha', '-')} · targets {targets_s}")

    only_a, only_b = summary.get("only_in_a"), summary.get("only_in_b")
    cards = [
        _fact("Matched modules", str(summary.get("n_matched", len(modules)))),
        _fact("Only in A / B", f"{_count(only_a)} / {_count(only_b)}"),
        _fact("cos mean / median", f"{num(summary.get('cos_mean'), '.3f')} / {num(summary.get('cos_median'), '.3f')}"),
        _fact("overlap left / right", f"{num(summary.get('overlap_left_mean'), '.3f')} / "
                                      f"{num(summary.get('overlap_right_mean'), '.3f')}"),
    ]
    sides = []
    for side in ("a", "b"):
        sides.append({"side": side.upper(),
                      "udr_median": num(_summary_side(summary, side, "udr_median"), ".3g"),
                      "frac": pct(_summary_side(summary, side, "fraction_udr_gt_0_3")),
                      "util": pct(_summary_side(summary, side, "utilization_mean"))})
    udr_groups = []
    for side, label in (("a", "A"), ("b", "B")):
        vals = [v for m in modules if (v := _side(m, side, "udr")) is not None]
        udr_groups.append(UdrGroup(label, vals, {
            "udr_median": _summary_side(summary, side, "udr_median") if vals else None,
            "udr_p90": stats.percentile(vals, 90.0), "udr_max": max(vals) if vals else None,
            "fraction_udr_gt_0_3": _summary_side(summary, side, "fraction_udr_gt_0_3"),
            "fraction_udr_gt_0_1": (sum(v > UDR_FRACTION_LEVELS[0] for v in vals) / len(vals)) if vals else None,
            "n_layers_with_udr": len(vals)},
            None if vals else str(unavailable.get("udr") or "no UDR in this comparison (compare --base-model)")))
    context = {
        "a_meta": side_meta(a), "b_meta": side_meta(b), "cards": cards, "sides": sides, "heatmaps": heatmaps,
        "rows": rows, "n_rows": len(modules), "sorted_by_udr": any(_delta(m, "udr") is not None for m in modules),
        "only_in_a": _names(only_a), "only_in_b": _names(only_b),
        "issues": (doc.get("issues") or [])[:MAX_ISSUES_SHOWN],
        "biggest": summary.get("biggest_udr_differences") or summary.get("top_udr_differences"),
    }
    return View("compare", "Comparison A ↔ B", "views/compare.html.j2", context, udr_groups)


def _count(x: Any) -> str:
    if isinstance(x, list):
        return str(len(x))
    return str(x) if isinstance(x, int) else "-"


def _names(x: Any) -> list[str]:
    return [str(n) for n in x] if isinstance(x, list) else []


# -- bench -----------------------------------------------------------------------------------------------
def _bench_rank(arm: dict[str, Any]) -> str:
    if arm.get("r") is not None:
        return f"r={arm['r']}"
    per_seed = [s for s in arm.get("per_seed") or [] if isinstance(s, dict)]
    rs = [str(s["r"]) for s in per_seed if s.get("r") is not None]
    if rs:
        return "r=" + "/".join(rs) + " (per seed)"
    patterns = [s["rank_pattern"] for s in per_seed if isinstance(s.get("rank_pattern"), dict)]
    if patterns:
        return "per layer " + "/".join(str(r) for r in sorted({int(v) for v in patterns[0].values()}))
    return "-"


def bench_view(doc: dict[str, Any], ids: ChartIds) -> View:
    """A ``gradience.bench/v1`` document: the verdict, the arms with their Δ and intervals, Δ vs parameters,
    and one UDR distribution per arm (first seed) in the sidebar."""
    task = doc.get("task") or {}
    policy = doc.get("policy") or {}
    probe = doc.get("probe") or {}
    arms = [a for a in doc.get("arms") or [] if isinstance(a, dict)]
    seeds = [str(s) for s in doc.get("seeds") or []]
    metric = str(task.get("metric") or "metric")
    higher = bool(task.get("higher_is_better", True))
    tolerance = finite(policy.get("tolerance")) or 0.0
    noise = doc.get("noise_floor") or {}
    rec = doc.get("recommended_arm")
    verdict = str(doc.get("verdict") or "-")
    cards = [
        _fact("Verdict", verdict, "screening (one seed)" if doc.get("screening") else f"{len(seeds)} seeds",
              "good" if verdict == "PASS" else "bad"),
        _fact("Smallest passing arm", str(rec) if rec else "none"),
        _fact("Probe", f"r={probe.get('r', '-')}", f"{human_count(probe.get('params'))} LoRA params"),
        _fact("Noise floor (probe sd)", num(noise.get("sd"), ".4f"), str(noise.get("note") or "")),
    ]
    rows, seed_rows, points = [], [], []
    for arm in arms:
        agg = arm.get("aggregate") or {}
        label = arm.get("label")
        skipped = [s.get("skipped") for s in arm.get("per_seed") or [] if isinstance(s, dict) and s.get("skipped")]
        rows.append({"name": str(arm.get("name")), "kind": str(arm.get("kind") or "-"), "rank": _bench_rank(arm),
                     "params": human_count(arm.get("params")), "ratio": pct(arm.get("params_ratio")),
                     "mean": num(agg.get("mean_delta"), "+.4f"), "sd": num(agg.get("sd_delta"), ".4f"),
                     "worst": num(agg.get("worst_delta"), "+.4f"), "pass_rate": pct(agg.get("pass_rate")),
                     "verdict": str(agg.get("verdict") or "-"),
                     "note": str(label or (f"skipped: {skipped[0]}" if skipped else ""))})
        for s in arm.get("per_seed") or []:
            if not isinstance(s, dict):
                continue
            ci = s.get("ci95") if isinstance(s.get("ci95"), list) and len(s.get("ci95") or []) == 2 else None
            seed_rows.append({"seed": str(s.get("seed")), "arm": str(arm.get("name")), "metric": num(s.get("metric"), ".4f"),
                              "delta": num(s.get("delta"), "+.4f"),
                              "ci": f"[{num(ci[0], '+.4f')}, {num(ci[1], '+.4f')}]" if ci else "-",
                              "verdict": str(s.get("verdict") or "-")})
        ratio, mean = finite(arm.get("params_ratio")), finite(agg.get("mean_delta"))
        if ratio is not None and mean is not None:
            verdict_arm = agg.get("verdict")
            points.append(charts.ArmPoint(str(arm.get("name")), ratio, mean, finite(agg.get("sd_delta")),
                                          None if verdict_arm is None else verdict_arm == "PASS",
                                          control=bool(label)))
    chart_svg = charts.params_metric_chart(ids.next(), points, tolerance, higher, metric)
    udr_doc = doc.get("udr") if isinstance(doc.get("udr"), dict) else None
    groups: list[UdrGroup] = []
    first = seeds[0] if seeds else None
    if udr_doc is not None and first is not None:
        per_arm = {"probe": (udr_doc.get("probe") or {}), **(udr_doc.get("arms") or {})}
        for name, by_seed in per_arm.items():
            block = by_seed.get(first) if isinstance(by_seed, dict) else None
            if not isinstance(block, dict):
                continue
            raw = block.get("per_layer")
            per_layer: dict[str, Any] = raw if isinstance(raw, dict) else {}
            vals = [v for v in (finite(x) for x in per_layer.values()) if v is not None]
            groups.append(UdrGroup(str(name), vals, {k: block.get(k) for k in (
                "udr_median", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3",
                "n_layers_with_udr")}, None if vals else "no UDR for this arm"))
    context = {
        "cards": cards, "rows": rows, "seed_rows": seed_rows, "chart_svg": chart_svg,
        "meta": [("Model", str(task.get("model") or "-")), ("Dataset", str(task.get("dataset") or "-")),
                 ("Metric", f"{metric} ({'higher' if higher else 'lower'} is better) on "
                            f"{task.get('n_eval_items', '-')} items, the same for every arm"),
                 ("Policy", f"PASS when Δ ≥ −{tolerance:g}" if higher else f"PASS when Δ ≤ +{tolerance:g}"),
                 ("Seeds", ", ".join(seeds) or "-")],
        "screening": bool(doc.get("screening")), "udr_seed": first,
    }
    return View("bench", "Bench", "views/bench.html.j2", context, groups)


# -- sidebar ---------------------------------------------------------------------------------------------
def udr_sidebar(groups: Sequence[UdrGroup], ids: ChartIds) -> dict[str, Any]:
    """The sidebar's UDR distribution: one histogram for all groups, the summary numbers per group."""
    with_values = [(g.label, g.values) for g in groups if g.values]
    svg = charts.udr_histogram(ids.next(), with_values, UDR_FRACTION_LEVELS) if with_values else None
    rows = []
    for g in groups:
        s = g.summary
        rows.append({
            "label": g.label, "unavailable": g.unavailable, "base": s.get("base_model"),
            "stats": [("median", num(s.get("udr_median"), ".3g")), ("p90", num(s.get("udr_p90"), ".3g")),
                      ("max", num(s.get("udr_max"), ".3g")),
                      (f"> {UDR_FRACTION_LEVELS[0]:g}", pct(s.get("fraction_udr_gt_0_1"))),
                      (f"> {UDR_FRACTION_LEVELS[1]:g}", pct(s.get("fraction_udr_gt_0_3"))),
                      ("layers", str(s.get("n_layers_with_udr") if s.get("n_layers_with_udr") is not None
                                     else len(g.values)))],
        })
    return {"svg": svg, "groups": rows, "any": bool(with_values), "present": bool(groups)}
