"""Wire-format constants of telemetry v1 (SPEC §5), shared by the writer and the reader."""

from __future__ import annotations

SCHEMA = "gradience.vnext.telemetry/v1"
ENVELOPE_KEYS: tuple[str, ...] = ("schema", "ts", "run_id", "event", "step")
KNOWN_EVENTS: frozenset[str] = frozenset(
    {"run_start", "train_step", "eval", "metrics", "alert", "recommendation", "run_end"}
)
ALERT_SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
RUN_END_STATUSES: tuple[str, ...] = ("ok", "aborted", "error")
# Issue codes of a log whose records were lost (a cut, a CRC mismatch, an unreadable record): the readers give
# them severity "warning" and monitor shows them by default and in its status, since the analysis then covers only
# part of the run (TensorBoard's own loader drops them without a word).
DATA_LOSS_CODES: frozenset[str] = frozenset({"truncated_record", "crc_error", "record_too_large", "corrupt_record"})
