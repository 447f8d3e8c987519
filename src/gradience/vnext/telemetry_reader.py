"""``gradience.vnext.telemetry_reader.TelemetryReader``: this project's streaming reader, plus the reference
tool's ``iter_events`` / ``validate`` / ``latest_config`` / ``latest_eval_event`` over the same single pass.

Its ``latest_eval()`` and ``summarize()`` return its ``EvalMetrics`` / ``SignalSnapshot`` containers; the summary
is filled from this project's own run analysis (``gradience.monitor.monitor_run``: the same gap = test ppl /
train ppl, the last ``lora_audit`` event's stable rank and utilization), not a second summarizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gradience.telemetry.reader import TelemetryReader as _Reader
from gradience.telemetry.types import ConfigSnapshot
from gradience.vnext.types import EvalMetrics, SignalSnapshot


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

    def latest_eval(self, split: str = "test") -> EvalMetrics | None:
        """The metrics of the last ``eval`` record of ``split``, or None."""
        event = self.latest_eval_event(split=split)
        metrics = None if event is None else event.get("metrics")
        return EvalMetrics.from_dict(metrics) if isinstance(metrics, dict) else None

    def summarize(self) -> SignalSnapshot:
        """The run's train/test metrics, gap and audit summary, from ``gradience.monitor.monitor_run``."""
        from gradience.monitor import monitor_run

        doc = monitor_run(self.path).to_dict()
        signals = doc.get("signals") or {}
        audit = doc.get("audit") or {}

        def split(name: str) -> EvalMetrics:
            block = signals.get(name)
            if not isinstance(block, dict):
                return EvalMetrics()
            values = {k: v for k, v in block.items() if k in ("loss", "ppl", "accuracy", "n")}
            if isinstance(values.get("n"), float) and values["n"].is_integer():
                values["n"] = int(values["n"])
            return EvalMetrics.from_dict(values)

        return SignalSnapshot(train=split("train"), test=split("test"), gap=signals.get("gap"),
                              stable_rank_mean=audit.get("stable_rank_mean"),
                              utilization_mean=audit.get("utilization_mean"))


__all__ = ["TelemetryReader"]
