"""ConfigSnapshot and Recommendation: the typed payloads shared by telemetry, check, monitor and the
training integration. Built once, here.

``from_dict`` is tolerant (unknown keys go to ``extras``; missing keys become None) because it reads files
written by other versions and by the original tool; ``to_dict`` always writes every documented key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

TaskProfile = Literal["easy_classification", "hard_reasoning", "generation", "unknown"]
TASK_PROFILES: tuple[str, ...] = ("easy_classification", "hard_reasoning", "generation", "unknown")

RecSeverity = Literal["info", "warning", "error", "critical"]
# Higher rank sorts first.
SEVERITY_RANK: dict[str, int] = {"critical": 3, "error": 2, "warning": 1, "info": 0}


# The type each documented field must have. Logs come from other versions, other tools and hand edits: a value
# of the wrong type ("optimizer": "adamw", "r": [8, 16], a 400-digit lr) is dropped (None) and reported by
# ``config_problems`` instead of crashing every consumer downstream.
_FIELD_KINDS: dict[str, dict[str, str]] = {
    "OptimizerConfig": {"name": "str", "lr": "float", "weight_decay": "float", "betas": "float_list",
                        "eps": "float"},
    "LoraConfig": {"r": "rank", "alpha": "float", "alpha_over_r": "float", "target_modules": "str_list",
                   "dropout": "float", "bias": "str", "use_rslora": "bool"},
    "TrainingConfig": {"seed": "int", "batch_size": "int", "gradient_accumulation": "int", "max_steps": "int",
                       "epochs": "float", "dtype": "str"},
    "ConfigSnapshot": {"model_name": "str", "dataset_name": "str", "task_profile": "str", "notes": "str"},
}
_MAX_INT = 2**63


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except (ValueError, OverflowError):
            return None
    return None


def _coerce(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, value as the field's type) — numbers written as strings are accepted, as the writers' inputs are."""
    if kind == "str":
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    if kind == "bool":
        return (True, value) if isinstance(value, bool) else (False, None)
    if kind in ("float", "int", "rank"):
        number = _as_float(value)
        if number is None:
            return False, None
        if kind == "float":
            return (True, number) if math.isfinite(number) else (False, None)
        if not (number == number and abs(number) < _MAX_INT):  # NaN or beyond any real count
            return False, None
        if number.is_integer():
            return True, int(number)
        return (True, number) if kind == "rank" else (False, None)
    if kind == "str_list":
        if isinstance(value, str):
            return True, value  # "q_proj,v_proj" / a PEFT regex: the rules split or match it themselves
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True, list(value)
        return False, None
    if kind == "float_list":
        if isinstance(value, (list, tuple)):
            numbers = [_as_float(v) for v in value]
            if all(n is not None for n in numbers):
                return True, numbers
        return False, None
    return True, value


def _kind_label(kind: str) -> str:
    return {"str": "a string", "bool": "true/false", "float": "a finite number", "int": "an integer", "rank": "a number",
            "str_list": "a list of strings", "float_list": "a list of numbers"}.get(kind, kind)


def _type_name(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{type(value).__name__} out of range" if _as_float(value) is not None else "an integer too large"
    return "null" if value is None else type(value).__name__


def _split_known(cls: type, data: dict[str, Any], problems: list[str] | None = None,
                 where: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)}
    kinds = _FIELD_KINDS.get(cls.__name__, {})
    known: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names or k == "extras":
            continue
        kind = kinds.get(k)
        if kind is None or v is None:
            known[k] = v
            continue
        ok, value = _coerce(kind, v)
        if not ok and problems is not None:
            problems.append(f"{where}{k}: expected {_kind_label(kind)}, got {_type_name(v)}")
        known[k] = value
    unknown = {k: v for k, v in data.items() if k not in names}
    extras = dict(data.get("extras") or {}) if isinstance(data.get("extras"), dict) else {}
    extras.update(unknown)
    return known, extras


def _block(data: dict[str, Any], key: str, problems: list[str] | None) -> dict[str, Any]:
    value = data.pop(key, None)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if problems is not None:
        problems.append(f"{key}: expected an object, got {_type_name(value)}")
    return {}


def config_problems(data: Any) -> list[str]:
    """What is wrong with the types of a ``run_start`` config payload (empty when it is well formed); the
    telemetry reader reports each as an issue on that line, ``from_dict`` drops the offending values."""
    if data is None:
        return []
    if not isinstance(data, dict):
        return [f"config: expected an object, got {_type_name(data)}"]
    problems: list[str] = []
    ConfigSnapshot.from_dict(data, problems)
    return problems


@dataclass
class OptimizerConfig:
    name: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    betas: list[float] | None = None
    eps: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay,
                "betas": None if self.betas is None else list(self.betas), "eps": self.eps,
                "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, problems: list[str] | None = None) -> OptimizerConfig:
        known, extras = _split_known(cls, data if isinstance(data, dict) else {}, problems, "optimizer.")
        return cls(**known, extras=extras)


@dataclass
class LoraConfig:
    r: int | None = None
    alpha: float | None = None
    alpha_over_r: float | None = None
    target_modules: list[str] | None = None
    dropout: float | None = None
    bias: str | None = None
    use_rslora: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        alpha_over_r = self.alpha_over_r
        if alpha_over_r is None and self.alpha is not None and self.r:
            alpha_over_r = self.alpha / self.r
        return {"r": self.r, "alpha": self.alpha, "alpha_over_r": alpha_over_r,
                "target_modules": None if self.target_modules is None else list(self.target_modules),
                "dropout": self.dropout, "bias": self.bias, "use_rslora": self.use_rslora,
                "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, problems: list[str] | None = None) -> LoraConfig:
        known, extras = _split_known(cls, data if isinstance(data, dict) else {}, problems, "lora.")
        return cls(**known, extras=extras)


@dataclass
class TrainingConfig:
    seed: int | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    dtype: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size,
                "gradient_accumulation": self.gradient_accumulation, "max_steps": self.max_steps,
                "epochs": self.epochs, "dtype": self.dtype, "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, problems: list[str] | None = None) -> TrainingConfig:
        known, extras = _split_known(cls, data if isinstance(data, dict) else {}, problems, "training.")
        return cls(**known, extras=extras)


@dataclass
class ConfigSnapshot:
    """What a run was configured with: the ``config`` payload of ``run_start`` and the input of ``check``."""

    model_name: str | None = None
    dataset_name: str | None = None
    task_profile: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    notes: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "dataset_name": self.dataset_name,
                "task_profile": self.task_profile, "optimizer": self.optimizer.to_dict(),
                "lora": self.lora.to_dict(), "training": self.training.to_dict(), "notes": self.notes,
                "extras": dict(self.extras)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, problems: list[str] | None = None) -> ConfigSnapshot:
        """Tolerant: unknown keys go to ``extras``, wrong-typed known values become None (listed in
        ``problems`` when given), a non-object block (``"optimizer": "adamw"``) is treated as empty."""
        data = dict(data) if isinstance(data, dict) else {}
        optimizer = OptimizerConfig.from_dict(_block(data, "optimizer", problems), problems)
        lora = LoraConfig.from_dict(_block(data, "lora", problems), problems)
        training = TrainingConfig.from_dict(_block(data, "training", problems), problems)
        known, extras = _split_known(cls, data, problems)
        return cls(**known, optimizer=optimizer, lora=lora, training=training, extras=extras)


@dataclass
class Recommendation:
    """One piece of advice. ``action`` is a stable id scripts can match on; ``evidence`` holds the numbers."""

    severity: str
    action: str
    message: str
    rationale: str = ""
    confidence: float = 0.5
    scope: str = "run"
    evidence: dict[str, Any] = field(default_factory=dict)
    # Short citation (authors, title, year; or an engine source file and function) of the evidence behind the
    # rule; None for advice that only restates a measurement. Serialized only when set (additive in v1).
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"severity": self.severity, "action": self.action, "message": self.message,
               "rationale": self.rationale, "confidence": self.confidence, "scope": self.scope,
               "evidence": dict(self.evidence)}
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recommendation:
        confidence = _as_float(data.get("confidence", 0.5) or 0.0)
        evidence = data.get("evidence")
        return cls(
            severity=str(data.get("severity", "info")),
            action=str(data.get("action", "unknown")),
            message=str(data.get("message", "")),
            rationale=str(data.get("rationale", "") or ""),
            confidence=0.5 if confidence is None or confidence != confidence else confidence,
            scope=str(data.get("scope", "run") or "run"),
            evidence=dict(evidence) if isinstance(evidence, dict) else {},
            source=str(data["source"]) if isinstance(data.get("source"), str) else None,
        )
