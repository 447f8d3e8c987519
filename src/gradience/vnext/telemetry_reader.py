"""``gradience.vnext.telemetry_reader.TelemetryReader``: this project's streaming reader, plus the reference
tool's ``iter_events`` / ``validate`` / ``latest_config`` / ``latest_eval_event`` over the same single pass.

The reference's ``summarize()`` and ``latest_eval()`` returned its ``SignalSnapshot`` / ``EvalMetrics`` types;
their content is what ``gradience monitor --json`` reports (``gradience.monitor.monitor_run``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gradience.telemetry.reader import TelemetryReader as _Reader
from gradience.telemetry.types import ConfigSnapshot


class TelemetryReader(_Reader):
    """:class:`gradience.telemetry.TelemetryReader` with the reference's convenience methods."""

    def iter_events(self, event_type: str | None = None) -> Iterator[dict[str, Any]]:
        """Each record as the dict it was written as (non-finite strings decoded), optionally one event type."""
        for rec in self.records():
            if event_type is None or rec.event == event_type:
                yield rec.data

    def validate(self, *, max_issues: int = 1000) -> list[str]:
        """Human-readable problems of one pass over the file (``line N: message``)."""
        for _ in self.records():
            pass
        out = [f"line {i.line}: {i.message}" if i.line is not None else i.message for i in self.issues]
        return out[:max_issues]

    def latest_config(self) -> ConfigSnapshot | None:
        """The config of the last ``run_start`` record, or None."""
        last: dict[str, Any] | None = None
        for data in self.iter_events("run_start"):
            config = data.get("config")
            if isinstance(config, dict):
                last = config
        return None if last is None else ConfigSnapshot.from_dict(last)

    def latest_eval_event(self, *, split: str = "test") -> dict[str, Any] | None:
        """The last ``eval`` record of ``split``, or None."""
        last = None
        for data in self.iter_events("eval"):
            if data.get("split") == split:
                last = data
        return last


__all__ = ["TelemetryReader"]
