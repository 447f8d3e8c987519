"""``gradience.vnext.types``: the reference tool's type names over this project's types.

``Severity`` and ``TaskProfile`` are string enums there (``Severity.WARNING == "warning"``); here severities
and profiles are plain strings, so the enums spell out the one list of each (telemetry's
``ALERT_SEVERITIES``, the config's ``TASK_PROFILES``; tests/test_vnext_compat.py keeps them equal) and every
writer/reader accepts their members as the strings they equal. The snapshot classes are this project's own under the reference's names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gradience.telemetry.schema import SCHEMA
from gradience.telemetry.types import (
    ConfigSnapshot,
    LoraConfig,
    OptimizerConfig,
    Recommendation,
    TrainingConfig,
    _split_known,
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


@dataclass(frozen=True)
class EvalMetrics:
    """The reference's per-split evaluation record (what ``TelemetryReader.latest_eval`` returns)."""

    loss: float | None = None
    ppl: float | None = None
    accuracy: float | None = None
    n: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "ppl": self.ppl, "accuracy": self.accuracy, "n": self.n,
                "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalMetrics:
        """Known keys to fields, the rest (and a dict ``extras``) to ``extras``: the telemetry config classes'
        one reader (``telemetry.types._split_known``), not a second copy."""
        known, extras = _split_known(cls, d)
        return cls(**known, extras=extras)


@dataclass(frozen=True)
class SignalSnapshot:
    """The reference's run summary (``TelemetryReader.summarize``); filled from ``gradience monitor``'s signals."""

    train: EvalMetrics = field(default_factory=EvalMetrics)
    test: EvalMetrics = field(default_factory=EvalMetrics)
    gap: float | None = None                    # test ppl / train ppl
    stable_rank_mean: float | None = None       # from the last lora_audit metrics event
    utilization_mean: float | None = None
    dominance_act_mean: float | None = None     # not measured here: always None
    kappa_mean: float | None = None             # not measured here: always None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "test": self.test.to_dict(), "gap": self.gap,
                "stable_rank_mean": self.stable_rank_mean, "utilization_mean": self.utilization_mean,
                "dominance_act_mean": self.dominance_act_mean, "kappa_mean": self.kappa_mean,
                "extras": dict(self.extras)}


LoRAConfigSnapshot = LoraConfig
OptimizerConfigSnapshot = OptimizerConfig
TrainingConfigSnapshot = TrainingConfig

__all__ = [
    "TELEMETRY_SCHEMA_VERSION",
    "ConfigSnapshot",
    "EvalMetrics",
    "LoRAConfigSnapshot",
    "OptimizerConfigSnapshot",
    "Recommendation",
    "Severity",
    "SignalSnapshot",
    "TaskProfile",
    "TrainingConfigSnapshot",
]
