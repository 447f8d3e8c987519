"""``gradience.vnext.telemetry.TelemetryWriter``: this project's writer with the reference tool's call shapes.

The reference writes ``metrics(step, kind=..., metrics=...)``, ``log(event, step=..., **payload)``,
``alert(severity=Severity.WARNING, ...)`` and passes ``run_id`` positionally; this class accepts those and
forwards to :class:`gradience.telemetry.TelemetryWriter` (same records, same redaction, same file format).
One difference on purpose: an existing file is appended to, never truncated (the reference opened it with
``"w"``); pass ``append=False`` to refuse a non-empty file instead.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from gradience.telemetry.schema import RUN_END_STATUSES
from gradience.telemetry.writer import TelemetryWriter as _Writer
from gradience.vnext.telemetry_reader import TelemetryReader  # the reference exported it here too


class TelemetryWriter(_Writer):
    """:class:`gradience.telemetry.TelemetryWriter` accepting the reference's signatures too."""

    def __init__(self, path: str | os.PathLike[str], run_id: str | None = None, *, max_str_len: int = 256,
                 allow_text: bool = False, on_text_violation: str = "redact", append: bool = True) -> None:
        if on_text_violation != "redact":
            warnings.warn(f"on_text_violation={on_text_violation!r} has no effect: long strings are always "
                          "redacted unless allow_text=True", DeprecationWarning, stacklevel=2)
        super().__init__(path, run_id=run_id, append=append, allow_text=allow_text, max_str_len=max_str_len)

    def log(self, event: str, payload: dict[str, Any] | None = None, *, step: int | None = None,
            **fields: Any) -> dict[str, Any]:
        """``log(event, payload, step=)`` or the reference's ``log(event, step=, **payload)``."""
        if fields:
            payload = {**(payload or {}), **fields}
        return super().log(event, payload, step=step)

    def metrics(self, *args: Any, kind: str | None = None, metrics: dict[str, Any] | None = None,
                step: int | None = None, **extras: Any) -> dict[str, Any]:
        """``metrics(kind, metrics, step=)`` or the reference's ``metrics(step, kind=, metrics=)``."""
        if kind is not None and len(args) == 1:  # reference: the one positional is the step
            step = args[0]
        elif len(args) == 2 and kind is None and metrics is None:
            kind, metrics = args
        elif len(args) == 1 and kind is None:
            kind = args[0]
        elif args:
            raise TypeError("metrics() takes (kind, metrics, *, step=None) or (step, *, kind=, metrics=)")
        if kind is None or metrics is None:
            raise TypeError("metrics() needs a kind and a metrics dict")
        if extras:
            return self.log("metrics", {"kind": str(kind), "metrics": dict(metrics), **extras}, step=step)
        return super().metrics(str(kind), metrics, step=step)

    def alert(self, severity: str, code: str, message: str, context: dict[str, Any] | None = None, *,
              step: int | None = None) -> dict[str, Any]:
        """Severities may be ``gradience.vnext.types.Severity`` members (written as their string)."""
        return super().alert(str(severity), code, message, context, step=step)

    def run_end(self, status: str = "ok", reason: str | None = None, *, step: int | None = None,
                **extras: Any) -> dict[str, Any]:
        """The reference let extra fields ride along (``run_end(status=..., final_loss=...)``)."""
        if not extras:
            return super().run_end(str(status), reason, step=step)
        if str(status) not in RUN_END_STATUSES:
            raise ValueError(f"run_end status must be one of {RUN_END_STATUSES}, got {status!r}")
        payload: dict[str, Any] = {"status": str(status), **extras}
        if reason is not None:
            payload["reason"] = str(reason)
        return self.log("run_end", payload, step=step)


__all__ = ["TelemetryReader", "TelemetryWriter"]
