"""Human-readable ``gradience monitor`` text (the seed's layout), rendered from the report's data.

Unknown values print as ``-`` (never ``-x`` or ``nan%``). Recommendations appear in the same order as in
the JSON.
"""

from __future__ import annotations

from typing import Any

from gradience.monitor.core import MonitorReport
from gradience.monitor.guard import guard_lines
from gradience.monitor.trl import trl_lines
from gradience.telemetry.schema import DATA_LOSS_CODES
from gradience.textfmt import RULE, finite, human_count, num, pct, rank_value, times

MAX_ISSUES_TEXT = 50


def _steps(findings: dict[str, Any], limit: int = 8) -> str:
    steps = [str(item.get("step")) for item in findings.get("listed", [])[:limit]]
    more = findings.get("count", 0) - len(steps)
    return ", ".join(steps) + (f", … (+{more})" if more > 0 else "")


def _status_line(t: dict[str, Any], status: dict[str, Any]) -> str:
    """One line that cannot read "ok" beside NaN losses: the analysis' verdict, then how the run ended."""
    run_end = t.get("status")
    reason = f" ({t['reason']})" if t.get("reason") else ""
    ended = f"{run_end}{reason}" if run_end else "- (no run_end)"
    overall = status.get("overall")
    findings = status.get("findings") or []
    if not overall or (overall == "ok" and not findings):
        return f"  Status: {ended}"
    listed = ", ".join(f"{f['code']} ({f['severity']})" for f in findings[:6])
    more = f", … (+{len(findings) - 6})" if len(findings) > 6 else ""
    found = f"; found: {listed}{more}" if findings else ""
    return f"  Status: {overall}{found}; run_end: {ended}"


def _training_lines(t: dict[str, Any], status: dict[str, Any] | None = None) -> list[str]:
    lines = ["Training:"]
    n = t.get("steps_logged") or 0
    if n:
        lines.append(f"  Steps logged: {n} (steps {t.get('first_step')}-{t.get('last_step')})")
        min_at = f" @ step {t['min_loss_step']}" if t.get("min_loss_step") is not None else ""
        lines.append(f"  Loss: last {num(t.get('last_loss'), '.4f')}, min {num(t.get('min_loss'), '.4f')}{min_at}")
        trend = t.get("loss_trend")
        if trend:
            lines.append(f"  Trend: {trend['direction']} ({pct(trend.get('relative_change'))} over steps "
                         f"{trend['from_step']}-{trend['to_step']})")
        else:
            lines.append("  Trend: -")
        nan = t.get("nonfinite_loss") or {}
        lines.append(f"  NaN/Inf loss: {nan.get('count', 0)}" + (f" (steps {_steps(nan)})" if nan.get("count") else ""))
        spikes = t.get("loss_spikes") or {}
        lines.append(f"  Loss spikes (> {num(spikes.get('factor'), 'g')}x running median): {spikes.get('count', 0)}"
                     + (f" (steps {_steps(spikes)})" if spikes.get("count") else ""))
        exp = t.get("grad_explosions") or {}
        gmax = t.get("grad_norm_max")
        at = f" @ step {t['grad_norm_max_step']}" if gmax is not None else ""
        lines.append(f"  Grad norm: max {num(gmax, '.3g')}{at}; explosions: {exp.get('count', 0)}"
                     + (f" (steps {_steps(exp)})" if exp.get("count") else ""))
        sched = t.get("lr_schedule")
        if sched:
            lines.append(f"  LR schedule: {sched['shape']} (first {num(sched['first'], '.3g')}, peak "
                         f"{num(sched['peak'], '.3g')} @ step {sched['peak_step']}, last {num(sched['last'], '.3g')})")
        else:
            lines.append("  LR schedule: -")
    else:
        lines.append("  Steps logged: 0 (no train_step events)")
    onset = t.get("overfitting_onset")
    if onset:
        lines.append(f"  Overfitting onset: step {onset['onset_step']} (test loss min {num(onset['best_test_loss'], '.4f')}"
                     f" @ step {onset['best_step']}, last {num(onset['last_test_loss'], '.4f')})")
    else:
        lines.append("  Overfitting onset: -")
    lines.append(_status_line(t, status or {}))
    return lines


def _diagnostics_lines(a: dict[str, Any] | None, hint: dict[str, Any] | None) -> list[str]:
    lines = ["Diagnostics:"]
    if not a:
        lines += ["  Stable rank (mean): -", "  Utilization (mean): -"]
        if hint:
            where = " (ADAPTER_DIR: the saved adapter's directory)" if hint.get("needs_adapter_dir") else ""
            lines.append(f"  LoRA audit: none in this run; {hint['note']}: {hint['command']}{where}")
        else:
            lines.append("  LoRA audit: none in this run")
        return lines
    lines.append(f"  Stable rank (mean): {num(a.get('stable_rank_mean'))}")
    lines.append(f"  Utilization (mean): {pct(a.get('utilization_mean'))}")
    r = a.get("r")
    step = f" at step {a['step']}" if a.get("step") is not None else ""
    lines.append(f"  LoRA audit{step}: r={rank_value(r)}, {a.get('n_layers', '-')} layers, "
                 f"{human_count(a.get('total_lora_params'))} params")
    lines.append(f"  Energy rank k@90% (p50/p90): {rank_value(a.get('energy_rank_90_p50'))}/"
                 f"{rank_value(a.get('energy_rank_90_p90'))}")
    suggested = a.get("suggested") or {}
    for label, key in (("median", "suggested_r_global_median"), ("p90", "suggested_r_global_90")):
        s = suggested.get(label)
        if not s:
            lines.append(f"  Suggested rank ({label}): {rank_value(a.get(key))}")
            continue
        saving = ""
        if finite(s.get("params_saved")) is not None and s["params_saved"] > 0:
            saving = f" (saves {human_count(s['params_saved'])} / {pct(s.get('reduction_ratio'))} of LoRA params)"
        elif finite(s.get("params_saved")) is not None:
            saving = " (no saving)"
        lines.append(f"  Suggested rank ({label}): r={s['r']}{saving}")
    for mtype, block in (a.get("by_type") or {}).items():
        if isinstance(block, dict):
            lines.append(f"  {mtype:<5} util={pct(block.get('utilization_mean'))}  "
                         f"sr={num(block.get('stable_rank_mean'))}  "
                         f"k@90% p50/p90={rank_value(block.get('energy_rank_90_p50'))}/"
                         f"{rank_value(block.get('energy_rank_90_p90'))}  layers={block.get('n_layers', '-')}")
    if finite(a.get("udr_median")) is not None:
        lines.append(f"  UDR (median/p90): {num(a.get('udr_median'), '.3f')}/{num(a.get('udr_p90'), '.3f')}")
    return lines


def render_text(report: MonitorReport, *, verbose: bool = False) -> str:
    cfg = report.config
    profile = report.task_profile or {}
    # The seed shows the bare profile name; whether it was inferred is in the JSON (task_profile.inferred).
    profile_name = profile.get("name") or (cfg.task_profile if cfg else None)
    lines = [RULE, "GRADIENCE MONITOR", RULE,
             f"File: {report.file}",
             *(f"Note: {i.message}" for i in report.telemetry_issues if i.code == "source_choice"),
             f"Model:   {(cfg.model_name if cfg else None) or '-'}",
             f"Dataset: {(cfg.dataset_name if cfg else None) or '-'}",
             f"Profile: {profile_name or '-'}"]
    if len(report.runs) > 1:
        lines.append(f"Run:     {report.run_id} ({len(report.runs)} runs in file; choose with --run-id)")
    elif verbose and report.run_id:
        lines.append(f"Run:     {report.run_id}")

    s = report.signals
    lines += ["", "Latest eval signals:",
              f"  Train PPL: {num(s.get('train_ppl'))}",
              f"  Test  PPL: {num(s.get('test_ppl'))}",
              f"  Gap:       {times(s.get('gap'))}",
              f"  Train Acc: {pct(s.get('train_accuracy'))}",
              f"  Test  Acc: {pct(s.get('test_accuracy'))}"]
    if s.get("test_split_fallback"):
        lines.append(f"  (no 'test' split logged: '{s['test_split']}' stands in for test)")
    lines += ["", *_training_lines(report.training, report.status)]
    guard = guard_lines(report.training.get("guard"))
    if guard:
        lines += ["", *guard]
    trl = trl_lines(report.extra.get("trl"))
    if trl:
        lines += ["", *trl]
    lines += ["", *_diagnostics_lines(report.audit, report.audit_hint)]

    alerts = report.alerts
    groups = alerts.get("groups") or []
    found = [f for f in (report.status or {}).get("findings") or [] if f.get("source") == "analysis"]
    if groups:
        lines += ["", f"Alerts ({alerts.get('total', 0)}):"]
    elif found:
        worst = (report.status or {}).get("overall")
        lines += ["", f"Alerts: none logged by the run; the analysis found {len(found)} problem(s) "
                      f"(worst: {worst}), listed under Recommendations"]
    else:
        lines += ["", "Alerts: none"]
    for g in groups:
        n = f" x{g['count']}" if g["count"] > 1 else ""
        at = f" (step {g['first_step']})" if g.get("first_step") is not None else ""
        lines.append(f"  [{g['severity']}] {g['code']}{n}: {g['message']}{at}")

    recs = report.recommendations
    lines += ["", f"Recommendations ({len(recs)}):"]
    if not recs:
        lines.append("  none")
    for rec in recs:
        lines.append(f"  - [{rec.severity}] {rec.action}: {rec.message}")
        if verbose and rec.rationale:
            lines.append(f"      why: {rec.rationale} (confidence {rec.confidence:.2f})")
        if verbose and rec.source:
            lines.append(f"      source: {rec.source}")

    issues = report.telemetry_issues
    # records the log lost are listed without --verbose: the analysis above covers only part of the run
    lost = [i for i in issues if i.code in DATA_LOSS_CODES]
    notes = ["records lost: the summary covers the records read"] if lost else []
    rest = len(issues) - (0 if verbose else len(lost))
    if rest and not verbose:
        notes.append(f"{rest} more with --verbose" if lost else "list with --verbose")
    lines += ["", f"Telemetry issues: {len(issues)}" + (f" ({'; '.join(notes)})" if notes else "")]
    for issue in ([] if verbose else lost[:MAX_ISSUES_TEXT]):
        lines.append(f"  [{issue.severity}] {issue.code}: {issue.message}")
    if verbose:
        for issue in issues[:MAX_ISSUES_TEXT]:
            where = f"line {issue.line}: " if issue.line is not None else ""
            lines.append(f"  {where}[{issue.code}] {issue.message}")
        if len(issues) > MAX_ISSUES_TEXT:
            lines.append(f"  … {len(issues) - MAX_ISSUES_TEXT} more (see --json)")
    return "\n".join(lines) + "\n"
