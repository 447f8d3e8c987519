"""ConfigSnapshot and Recommendation: the typed payloads shared by telemetry, check, monitor and the
training integration. Built once, here.

``from_dict`` is tolerant (unknown keys go to ``extras``; missing keys become None) because it reads files
written by other versions and by the original tool; ``to_dict`` always writes every documented key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

TaskProfile = Literal["easy_classification", "hard_reasoning", "generation", "unknown"]
TASK_PROFILES: tuple[str, ...] = ("easy_classification", "hard_reasoning", "generation", "unknown")

RecSeverity = Literal["info", "warning", "error", "critical"]
# Higher rank sorts first.
SEVERITY_RANK: dict[str, int] = {"critical": 3, "error": 2, "warning": 1, "info": 0}


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in data.items() if k in names and k != "extras"}
    unknown = {k: v for k, v in data.items() if k not in names}
    extras = dict(data.get("extras") or {}) if isinstance(data.get("extras"), dict) else {}
    extras.update(unknown)
    return known, extras


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
    def from_dict(cls, data: dict[str, Any] | None) -> OptimizerConfig:
        known, extras = _split_known(cls, data or {})
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
    def from_dict(cls, data: dict[str, Any] | None) -> LoraConfig:
        known, extras = _split_known(cls, data or {})
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
    def from_dict(cls, data: dict[str, Any] | None) -> TrainingConfig:
        known, extras = _split_known(cls, data or {})
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
    def from_dict(cls, data: dict[str, Any] | None) -> ConfigSnapshot:
        data = dict(data or {})
        optimizer = OptimizerConfig.from_dict(data.pop("optimizer", None) or {})
        lora = LoraConfig.from_dict(data.pop("lora", None) or {})
        training = TrainingConfig.from_dict(data.pop("training", None) or {})
        known, extras = _split_known(cls, data)
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

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "action": self.action, "message": self.message,
                "rationale": self.rationale, "confidence": self.confidence, "scope": self.scope,
                "evidence": dict(self.evidence)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recommendation:
        return cls(
            severity=str(data.get("severity", "info")),
            action=str(data.get("action", "unknown")),
            message=str(data.get("message", "")),
            rationale=str(data.get("rationale", "") or ""),
            confidence=float(data.get("confidence", 0.5) or 0.0),
            scope=str(data.get("scope", "run") or "run"),
            evidence=dict(data.get("evidence") or {}),
        )
