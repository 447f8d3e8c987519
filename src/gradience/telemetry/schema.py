"""Wire-format constants of telemetry v1 (SPEC §5), shared by the writer and the reader."""

from __future__ import annotations

SCHEMA = "gradience.vnext.telemetry/v1"
ENVELOPE_KEYS: tuple[str, ...] = ("schema", "ts", "run_id", "event", "step")
KNOWN_EVENTS: frozenset[str] = frozenset(
    {"run_start", "train_step", "eval", "metrics", "alert", "recommendation", "run_end"}
)
ALERT_SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
RUN_END_STATUSES: tuple[str, ...] = ("ok", "aborted", "error")
