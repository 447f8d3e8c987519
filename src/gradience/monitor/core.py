"""``monitor_run``: one pass over a run's log -> a ``MonitorReport`` (SPEC §6). Returns data, never prints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.monitor.analysis import RunAnalyzer
from gradience.monitor.external import EXTERNAL_KINDS, read_external
from gradience.monitor.sources import RunSource, read_trainer_state, resolve_run_path, telemetry_events
from gradience.policy import thresholds as T
from gradience.policy.recommendations import dedupe_and_sort
from gradience.policy.run_rules import run_recommendations
from gradience.telemetry.reader import DEFAULT_MAX_LINE_BYTES, TelemetryReader
from gradience.telemetry.schema import DATA_LOSS_CODES
from gradience.telemetry.types import ConfigSnapshot, Recommendation

SCHEMA = "gradience.monitor/v1"


@dataclass
class MonitorReport:
    file: str
    source: str                       # "telemetry" | "trainer_state"
    run_id: str | None
    runs: list[str | None]
    config: ConfigSnapshot | None
    task_profile: dict[str, Any] | None
    signals: dict[str, Any]
    training: dict[str, Any]
    audit: dict[str, Any] | None
    alerts: dict[str, Any]
    recommendations: list[Recommendation]
    telemetry_issues: list[Issue]
    lines: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    audit_hint: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def config_dict(self, full: bool = False) -> dict[str, Any] | None:
        """The run's config; without ``full``, ``training.extras`` leaves out keys equal to well-known
        TrainingArguments defaults (older callbacks logged all ~110 of them), counted in
        ``training.extras_defaults_hidden``."""
        if self.config is None:
            return None
        data = self.config.to_dict()
        if not full:
            from gradience.config.hf_defaults import drop_training_args_defaults

            extras = data["training"]["extras"]
            kept = drop_training_args_defaults(extras)
            if len(kept) < len(extras):
                data["training"]["extras"] = kept
                data["training"]["extras_defaults_hidden"] = len(extras) - len(kept)
        return data

    def to_dict(self, full_config: bool = False) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "file": self.file,
            "source": self.source,
            "run_id": self.run_id,
            "runs": list(self.runs),
            "status": self.status,
            "config": self.config_dict(full_config),
            "task_profile": self.task_profile,
            "signals": self.signals,
            "training": self.training,
            "audit": self.audit,
            "alerts": self.alerts,
            "recommendations": [r.to_dict() for r in self.recommendations],
            "telemetry_issues": [i.to_dict() for i in self.telemetry_issues],
            "audit_hint": self.audit_hint,
            **self.extra,
        }


def _check_recommendations(config: ConfigSnapshot) -> tuple[list[Recommendation], dict[str, Any] | None]:
    """The pre-flight rules of ``gradience check`` on the run's config (SPEC §6: "plus the check rules")."""
    try:
        from gradience.policy.check_rules import check_config
    except ImportError:  # check rules not available in this build
        return [], None
    report = check_config(config)
    recs = [r for r in report.recommendations if r.action != "config_ok"]
    return recs, {"name": report.task_profile, "inferred": bool(report.task_profile_inferred)}


def _with_overrides(config: ConfigSnapshot | None, task_profile: str | None,
                    dataset: str | None) -> ConfigSnapshot | None:
    """The run's config with ``--task-profile`` / ``--dataset`` applied (as ``check`` applies its flags: the
    dataset names the data and, when no profile is set, drives the profile inference)."""
    if task_profile is None and dataset is None:
        return config
    snap = ConfigSnapshot.from_dict(config.to_dict()) if config is not None else ConfigSnapshot()
    if dataset is not None:
        snap.dataset_name = dataset
    if task_profile is not None:
        from gradience.telemetry.types import TASK_PROFILES

        name = task_profile.strip().lower().replace("-", "_")
        if name not in TASK_PROFILES:
            raise InputError(f"--task-profile: unknown profile {task_profile!r} (expected one of: "
                             f"{', '.join(TASK_PROFILES)})")
        snap.task_profile = name
    return snap


def run_status(run_recs: list[Recommendation], alerts: dict[str, Any], training: dict[str, Any],
               issues: list[Issue] | None = None) -> dict[str, Any]:
    """What the analysis found, in one word: ``error`` / ``warning`` / ``ok``.

    Why: ``run_end`` only says whether the training loop returned; a run that logged NaN losses "ended ok".
    The overall status is the worst of: the run rules' findings (warning and above; config advice from the
    check rules is not a finding about the run), the alerts the run logged, and run_end (error -> error,
    aborted -> warning), and records the log lost (``DATA_LOSS_CODES``: a truncated or corrupt event file, a
    corrupt W&B record: a warning, the analysis covers only part of the run). A missing run_end is reported but
    does not change the level (the run may still be going)."""
    rank = {"warning": 1, "error": 2, "critical": 2}
    level = 0
    findings: list[dict[str, Any]] = []
    for rec in run_recs:
        r = rank.get(rec.severity, 0)
        if r:
            findings.append({"source": "analysis", "code": rec.action, "severity": rec.severity})
            level = max(level, r)
    for group in alerts.get("groups") or []:
        r = rank.get(str(group.get("severity")), 0)
        if r:
            findings.append({"source": "alert", "code": group.get("code"), "severity": group.get("severity"),
                             "count": group.get("count")})
            level = max(level, r)
    lost: dict[str, int] = {}
    for issue in issues or ():
        if issue.code in DATA_LOSS_CODES:
            lost[issue.code] = lost.get(issue.code, 0) + 1
    for code, count in lost.items():
        findings.append({"source": "telemetry", "code": code, "severity": "warning", "count": count})
        level = max(level, 1)
    run_end = training.get("status")
    if run_end == "error":
        level = 2
    elif run_end == "aborted":
        level = max(level, 1)
    return {"overall": ("ok", "warning", "error")[level], "run_end": run_end, "reason": training.get("reason"),
            "findings": findings}


def _audit_hint(source_kind: str, log_path: Path, config: ConfigSnapshot | None) -> dict[str, Any]:
    """A command that adds the missing LoRA audit, runnable as printed once ADAPTER_DIR is filled in (or as
    is, when the adapter directory is known: next to the log, or the run's output_dir)."""
    import shlex

    candidates = [log_path.parent]
    out_dir = (config.training.extras.get("output_dir") if config is not None else None)
    if isinstance(out_dir, str) and out_dir and len(out_dir) < 4096:
        candidates.append(Path(out_dir))
    adapter: Path | None = None
    for cand in candidates:
        try:
            if (cand / "adapter_config.json").is_file():
                adapter = cand
                break
        except OSError:
            continue
    peft_dir = shlex.quote(str(adapter)) if adapter is not None else "ADAPTER_DIR"
    if source_kind == "telemetry":
        # audit --append continues the log's last run, so this monitor then shows the audit.
        command = f"gradience audit --peft-dir {peft_dir} --append {shlex.quote(str(log_path))}"
        note = "appends the audit to this run's log"
    else:
        # A trainer_state.json is the Trainer's file, not a telemetry log: audit the adapter on its own.
        command = f"gradience audit --peft-dir {peft_dir}"
        what = "a trainer_state.json" if source_kind == "trainer_state" else f"a {source_kind} log"
        note = f"{what} cannot hold the audit; this audits the adapter directly"
    return {"command": command, "adapter_dir": None if adapter is None else str(adapter),
            "needs_adapter_dir": adapter is None, "note": note}


def monitor_run(path: str | os.PathLike[str], *, run_id: str | None = None,
                gap_threshold: float = T.GAP_THRESHOLD, strict: bool = False,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, task_profile: str | None = None,
                dataset: str | None = None) -> MonitorReport:
    """Analyse the run at ``path`` (telemetry JSONL, trainer_state.json, or a directory holding one).
    ``task_profile`` / ``dataset`` override the run's config (the profile drives the check rules)."""
    source = resolve_run_path(path)
    analyzer: RunAnalyzer | None = None
    issues: list[Issue]
    runs: list[str | None]
    lines = 0
    config: ConfigSnapshot | None = None
    if source.kind == "telemetry":
        reader = TelemetryReader(source.path, strict=strict, max_line_bytes=max_line_bytes)
        for is_new, rec in telemetry_events(source.path, reader, run_id):
            if is_new:
                analyzer = RunAnalyzer(rec.run_id)
            assert analyzer is not None
            analyzer.feed(rec.event, rec.step, rec.data, rec.ts)
        issues, runs, lines = reader.issues, list(reader.run_ids), reader.lines
        if run_id is not None and analyzer is None:
            shown = ", ".join(str(r) for r in runs[:20])
            raise InputError(f"no run with id {run_id!r} (runs in this file: {shown})", source.path)
        if analyzer is not None and analyzer.config is not None:
            config = ConfigSnapshot.from_dict(analyzer.config)
    elif source.kind in EXTERNAL_KINDS:
        external = read_external(source.kind, source.path, run_id=run_id, strict=strict)
        analyzer, issues, runs = external.analyzer, external.issues, external.runs
        lines, config = external.lines, external.config
    else:
        state = read_trainer_state(source.path)
        if strict and state.issues:
            raise InputError(f"{state.issues[0].message} (strict schema)", source.path)
        if run_id is not None:
            raise InputError("--run-id applies to telemetry logs; a trainer_state.json holds one run",
                             source.path)
        if not state.events:
            raise InputError("log_history has no train or eval entries", source.path)
        from gradience.telemetry.sniff import output_dir_name

        analyzer = RunAnalyzer(output_dir_name(source.path))  # no run id in the file: its output directory's name
        analyzer.train.signatures.configure(None, {"source": "trainer_state"})  # an HF run: its max_grad_norm default
        for event, step, data in state.events:
            analyzer.feed(event, step, data)
        if state.summary:
            analyzer.summary_extra["hf_train_summary"] = state.summary
        issues, runs, lines = state.issues, [], len(state.events)  # runs: the ids --run-id takes, none here
        if source.note:
            issues = [Issue("source_choice", source.note, severity="info"), *issues]
        config = state.config
    assert analyzer is not None
    return build_report(analyzer, source=source, runs=runs, issues=issues, lines=lines, config=config,
                        gap_threshold=gap_threshold, task_profile=task_profile, dataset=dataset)


def _adapter_beside(log_path: Any) -> str | None:
    """``<log dir>/peft`` when it holds an adapter (the toy run's and demo's layout): its path goes into the
    compress and bench commands monitor advises, else they say ADAPTER."""
    if not log_path:
        return None
    peft = os.path.join(os.path.dirname(os.fspath(log_path)) or ".", "peft")
    try:
        return peft if os.path.isfile(os.path.join(peft, "adapter_config.json")) else None
    except (OSError, ValueError):
        return None


def build_report(analyzer: RunAnalyzer, *, source: RunSource, runs: list[str | None], issues: list[Issue],
                 lines: int, config: ConfigSnapshot | None, gap_threshold: float = T.GAP_THRESHOLD,
                 task_profile: str | None = None, dataset: str | None = None) -> MonitorReport:
    """The report of a fed analyzer (bounded work whatever the log size: ``monitor --follow`` calls it at
    every refresh on its incrementally fed analyzer)."""
    config = _with_overrides(config, task_profile, dataset)

    signals = analyzer.signals(gap_threshold)
    training = analyzer.training(signals["test_split"])
    audit = analyzer.audit_block()
    recs = run_recommendations(signals=signals, training=training, audit=audit, config=config,
                               gap_threshold=gap_threshold, adapter_dir=_adapter_beside(source.path))
    alerts = analyzer.alerts()
    status = run_status(recs, alerts, training, issues)
    profile: dict[str, Any] | None = None
    if config is not None:
        check_recs, profile = _check_recommendations(config)
        recs.extend(check_recs)
    return MonitorReport(
        file=os.fspath(source.path),
        source=source.kind, run_id=analyzer.run_id, runs=runs, config=config, task_profile=profile,
        signals=signals, training=training, audit=audit, alerts=alerts,
        recommendations=dedupe_and_sort(recs), telemetry_issues=issues, lines=lines, status=status,
        audit_hint=None if audit is not None else _audit_hint(source.kind, Path(source.path), config),
        extra={"trl": analyzer.trl.summary()})  # TRL's trainer metrics (monitor/trl.py); null without any
