"""Plain JSON values from what the Trainer and PEFT hand the callback (config objects, logged scalars, arguments)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


def _plain(obj: Any) -> Any:
    """JSON-friendly copy of a PEFT/HF config value: enums by value, sets sorted, tuples as lists."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=str)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # plain str, also for str subclasses (TorchVersion, str-enums)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return str(obj)


def _scalar(value: Any) -> float | int | None:
    """A plain number from a logged value (python/numpy/0-d torch), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return out if isinstance(out, (int, float)) and not isinstance(out, bool) else None
    return None


def _strip_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        number = _scalar(value)
        if number is not None:
            out[name] = number
    return out


def _non_default_args(cls: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (TrainingArguments keys) without those equal to the field's default in ``cls``: a run log
    carries what was changed, not ~110 defaults. Field defaults are read from the dataclass (no instance is
    built, so nothing touches devices); a few fields normalized by ``__post_init__`` may stay."""
    import dataclasses

    from gradience.config.hf_defaults import drop_defaults

    defaults: dict[str, Any] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            try:
                if f.default is not dataclasses.MISSING:
                    defaults[f.name] = _plain(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    defaults[f.name] = _plain(f.default_factory())
            except Exception:  # an exotic default: keep the key
                continue
    return drop_defaults(values, defaults)
