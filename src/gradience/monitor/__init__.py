"""``gradience monitor``: the story of a run from its telemetry (SPEC §6).

``monitor_run(path)`` reads a telemetry JSONL, an HF ``trainer_state.json`` or a directory holding either,
in one streaming pass, and returns a :class:`MonitorReport` (``to_dict()`` is the ``gradience.monitor/v1``
JSON). ``render_text`` and ``evaluate_gates`` live in ``gradience.monitor.render`` / ``.gates``.
"""

from gradience.monitor.core import SCHEMA, MonitorReport, monitor_run

__all__ = ["SCHEMA", "MonitorReport", "monitor_run"]
