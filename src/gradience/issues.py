"""The one ``Issue`` record used by every reader and analysis.

Problems found in inputs (an unpaired LoRA factor, a NaN weight, a bad telemetry line) are reported as
issues in the output rather than silently skipped or raised; only inputs that leave nothing to analyse
become errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]


@dataclass
class Issue:
    code: str
    message: str
    severity: Severity = "warning"
    modules: list[str] | None = None
    line: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.modules is not None:
            out["modules"] = list(self.modules)
        if self.line is not None:
            out["line"] = self.line
        out.update(self.extra)
        return out
