"""Credentials in config snapshots: a snapshot is printed by ``check`` and logged by the callback, so a
token that sits in a training config never reaches either (the telemetry redactor's patterns, one list)."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(token|api_key|apikey|password|passwd|secret)$", re.IGNORECASE)


def redact_secrets(block: dict[str, Any]) -> dict[str, Any]:
    """Credentials sometimes sit in training configs (``hub_token``); a snapshot is printed and logged, so
    their values never are, at any depth (an ``hf_…`` token inside a list of dicts too). HF's own
    placeholders (``<HUB_TOKEN>``) are kept as they are. The patterns and credential key names are the
    telemetry redactor's (one list); ``block`` comes from :func:`plain`, so its depth is bounded."""
    from gradience.telemetry.redact import is_secret_key, scrub_secrets

    def walk(value: Any, key: str | None) -> Any:
        if key is not None and (_SECRET_KEY.search(key) or is_secret_key(key)) \
                and isinstance(value, str) and value and not value.startswith("<"):
            return "[REDACTED]"
        if isinstance(value, str):
            return scrub_secrets(value)
        if isinstance(value, dict):
            return {scrub_secrets(k): walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        return value

    out: dict[str, Any] = walk(block, None)
    return out
