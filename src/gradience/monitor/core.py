"""``monitor_run``: one pass over a run's log -> a ``MonitorReport`` (SPEC §6). Returns data, never prints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.monitor.analysis import RunAnalyzer
from gradience.monitor.sources import read_trainer_state, resolve_run_path, telemetry_events
from gradience.policy import thresholds as T
from gradience.policy.recommendations import dedupe_and_sort
from gradience.policy.run_rules import run_recommendations
from gradience.telemetry.reader import DEFAULT_MAX_LINE_BYTES, TelemetryReader
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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "file": self.file,
            "source": self.source,
            "run_id": self.run_id,
            "runs": list(self.runs),
            "config": None if self.config is None else self.config.to_dict(),
            "task_profile": self.task_profile,
            "signals": self.signals,
            "training": self.training,
            "audit": self.audit,
            "alerts": self.alerts,
            "recommendations": [r.to_dict() for r in self.recommendations],
            "telemetry_issues": [i.to_dict() for i in self.telemetry_issues],
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


def monitor_run(path: str | os.PathLike[str], *, run_id: str | None = None,
                gap_threshold: float = T.GAP_THRESHOLD, strict: bool = False,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> MonitorReport:
    """Analyse the run at ``path`` (telemetry JSONL, trainer_state.json, or a directory holding one)."""
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
    else:
        state = read_trainer_state(source.path)
        if strict and state.issues:
            raise InputError(f"{state.issues[0].message} (strict schema)", source.path)
        if run_id is not None:
            raise InputError("--run-id applies to telemetry logs; a trainer_state.json holds one run",
                             source.path)
        if not state.events:
            raise InputError("log_history has no train or eval entries", source.path)
        analyzer = RunAnalyzer(None)
        for event, step, data in state.events:
            analyzer.feed(event, step, data)
        if state.summary:
            analyzer.summary_extra["hf_train_summary"] = state.summary
        issues, runs, lines = state.issues, [None], len(state.events)
        config = state.config
    assert analyzer is not None

    signals = analyzer.signals(gap_threshold)
    training = analyzer.training(signals["test_split"])
    audit = analyzer.audit_block()
    recs = run_recommendations(signals=signals, training=training, audit=audit, config=config,
                               gap_threshold=gap_threshold)
    task_profile: dict[str, Any] | None = None
    if config is not None:
        check_recs, task_profile = _check_recommendations(config)
        recs.extend(check_recs)
    return MonitorReport(
        file=os.fspath(source.path),
        source=source.kind, run_id=analyzer.run_id, runs=runs, config=config, task_profile=task_profile,
        signals=signals, training=training, audit=audit, alerts=analyzer.alerts(),
        recommendations=dedupe_and_sort(recs), telemetry_issues=issues, lines=lines)
