"""``gradience.vnext.types``: the reference tool's type names over this project's types.

``Severity`` and ``TaskProfile`` are string enums there (``Severity.WARNING == "warning"``); here severities
and profiles are plain strings, so the enums are built from the one list of each (telemetry's alert
severities, the config's task profiles) and every writer/reader accepts their members as the strings they
equal. The snapshot classes are this project's own under the reference's names.
"""

from __future__ import annotations

import enum

from gradience.telemetry.schema import ALERT_SEVERITIES, SCHEMA
from gradience.telemetry.types import (
    TASK_PROFILES,
    ConfigSnapshot,
    LoraConfig,
    OptimizerConfig,
    Recommendation,
    TrainingConfig,
)

TELEMETRY_SCHEMA_VERSION: str = SCHEMA


class _StrEnum(str, enum.Enum):
    """A str enum whose ``str()``/``format()`` is its value on every Python (``enum.StrEnum`` is 3.11+), so
    a member written through ``str(x)`` (the telemetry redactor, f-strings) is the plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


Severity = _StrEnum("Severity", {s.upper(): s for s in ALERT_SEVERITIES})  # type: ignore[misc]
Severity.__doc__ = "Alert / recommendation severity: info, warning, error, critical (telemetry v1)."
TaskProfile = _StrEnum("TaskProfile", {p.upper(): p for p in TASK_PROFILES})  # type: ignore[misc]
TaskProfile.__doc__ = "Task profile of a run (check's rule sets): easy_classification ... unknown."

LoRAConfigSnapshot = LoraConfig
OptimizerConfigSnapshot = OptimizerConfig
TrainingConfigSnapshot = TrainingConfig

__all__ = ["TELEMETRY_SCHEMA_VERSION", "ConfigSnapshot", "LoRAConfigSnapshot", "OptimizerConfigSnapshot",
           "Recommendation", "Severity", "TaskProfile", "TrainingConfigSnapshot"]
