"""``gradience.vnext``: the reference tool's import paths (johntnanney/gradience 0.x), for its users' code.

Its README, PUBLIC_API.md and CI import from here::

    from gradience.vnext.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from gradience.vnext.telemetry import TelemetryWriter
    from gradience.vnext.telemetry_reader import TelemetryReader
    from gradience.vnext.types import Severity

Each name is this project's own class (or a thin adapter over it that accepts the reference's call shapes);
nothing here is a second implementation. Names are resolved lazily, so ``import gradience.vnext`` imports
neither torch nor transformers; only ``GradienceCallback``/``GradienceCallbackConfig`` need the ``hf`` extra.
Reference names with no counterpart here raise AttributeError naming what replaces them.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "TELEMETRY_SCHEMA_VERSION": ("gradience.vnext.types", "TELEMETRY_SCHEMA_VERSION"),
    "TaskProfile": ("gradience.vnext.types", "TaskProfile"),
    "Severity": ("gradience.vnext.types", "Severity"),
    "ConfigSnapshot": ("gradience.vnext.types", "ConfigSnapshot"),
    "LoRAConfigSnapshot": ("gradience.vnext.types", "LoRAConfigSnapshot"),
    "OptimizerConfigSnapshot": ("gradience.vnext.types", "OptimizerConfigSnapshot"),
    "TrainingConfigSnapshot": ("gradience.vnext.types", "TrainingConfigSnapshot"),
    "Recommendation": ("gradience.vnext.types", "Recommendation"),
    "EvalMetrics": ("gradience.vnext.types", "EvalMetrics"),
    "SignalSnapshot": ("gradience.vnext.types", "SignalSnapshot"),
    "TelemetryWriter": ("gradience.vnext.telemetry", "TelemetryWriter"),
    "TelemetryReader": ("gradience.vnext.telemetry_reader", "TelemetryReader"),
    "audit_lora_peft_dir": ("gradience.vnext.audit", "audit_lora_peft_dir"),
    "check_config": ("gradience.vnext.policy", "check_config"),
    "GradienceCallback": ("gradience.vnext.integrations.hf", "GradienceCallback"),
    "GradienceCallbackConfig": ("gradience.vnext.integrations.hf", "GradienceCallbackConfig"),
}

# Reference names that have no counterpart here, and what to use instead.
_REPLACED: dict[str, str] = {
    "check_run": "`gradience monitor --json` or gradience.api.monitor",
    "LoRAAdapterConfig": "gradience.adapter.load_adapter(DIR).config",
    "LoRALayerAudit": "the rows of gradience.audit.run_audit(...).to_summary(include_layers=True)['layers']",
    "LoRAAuditResult": "gradience.audit.run_audit (returns the audit result)",
    "audit_lora_state_dict": "gradience.audit.audit_state_dict(tensors, config)",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    if name in _REPLACED:
        raise AttributeError(f"gradience.vnext.{name} is not provided by this project; use {_REPLACED[name]}")
    raise AttributeError(f"module 'gradience.vnext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
