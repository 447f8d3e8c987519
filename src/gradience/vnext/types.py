"""``gradience.vnext.types``: the reference tool's type names over this project's types.

``Severity`` and ``TaskProfile`` are string enums there (``Severity.WARNING == "warning"``); here severities
and profiles are plain strings, so the enums spell out the one list of each (telemetry's
``ALERT_SEVERITIES``, the config's ``TASK_PROFILES``; tests/test_vnext_compat.py keeps them equal) and every
writer/reader accepts their members as the strings they equal. The snapshot classes are this project's own under the reference's names.
"""

from __future__ import annotations

import enum

from gradience.telemetry.schema import SCHEMA
from gradience.telemetry.types import (
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


class Severity(_StrEnum):
    """Alert / recommendation severity (telemetry v1's ``ALERT_SEVERITIES``; a test keeps them equal)."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class TaskProfile(_StrEnum):
    """Task profile of a run, check's rule sets (``TASK_PROFILES``; a test keeps them equal)."""

    EASY_CLASSIFICATION = "easy_classification"
    HARD_REASONING = "hard_reasoning"
    GENERATION = "generation"
    UNKNOWN = "unknown"


LoRAConfigSnapshot = LoraConfig
OptimizerConfigSnapshot = OptimizerConfig
TrainingConfigSnapshot = TrainingConfig

__all__ = ["TELEMETRY_SCHEMA_VERSION", "ConfigSnapshot", "LoRAConfigSnapshot", "OptimizerConfigSnapshot",
           "Recommendation", "Severity", "TaskProfile", "TrainingConfigSnapshot"]
