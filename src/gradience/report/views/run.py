"""The run view: the ``monitor`` story of a training run and its curves."""

from __future__ import annotations

import math
from typing import Any

from gradience.report import charts
from gradience.report.curves import RunCurves
from gradience.report.views.base import MAX_ISSUES_SHOWN, ChartIds, View
from gradience.report.views.base import fact as _fact
from gradience.textfmt import finite, num, pct, rank_value, times


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

