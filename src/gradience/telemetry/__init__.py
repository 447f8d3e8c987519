"""Telemetry v1 (``gradience.vnext.telemetry/v1``): the writer, the streaming reader and typed payloads.

``TelemetryWriter`` is the public API for any training loop (see its module docstring for a plain PyTorch
example); ``gradience.integrations.hf.GradienceCallback`` uses it for Hugging Face Trainer runs.
``TelemetryReader`` / ``read_events`` stream a log back with tolerant, line-numbered issues.
"""

from gradience.telemetry.reader import (
    DEFAULT_MAX_LINE_BYTES,
    TelemetryReader,
    TelemetryRecord,
    last_run_position,
    read_events,
)
from gradience.telemetry.schema import ENVELOPE_KEYS, KNOWN_EVENTS, SCHEMA
from gradience.telemetry.writer import TelemetryWriter, append_metrics_event

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "ENVELOPE_KEYS",
    "KNOWN_EVENTS",
    "SCHEMA",
    "TelemetryReader",
    "TelemetryRecord",
    "TelemetryWriter",
    "append_metrics_event",
    "last_run_position",
    "read_events",
]
