"""``gradience audit --fail-on`` semantics.

- A per-layer metric (``utilization<0.25``, ``udr>1.0``, ``energy_rank_90>=8`` ...) is met when ANY layer
  with a value satisfies it; layers without a value (non-finite weights, no base model) never match.
- A summary key (``utilization_mean<0.2``, ``udr_median>0.5``, ``suggested_r_global_90<=4`` ...) compares the
  summary value; a null value never matches.
- Flags: ``zero_update`` (some pair is a zero update), ``non_finite`` (NaN/Inf factors), ``issues`` (any
  warning or error issue), ``error`` (any error issue), ``warning`` (same as ``issues``).
- Anything else is a usage error (exit 2) that lists what is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradience.errors import InputError
from gradience.gates import Gate
from gradience.textfmt import finite

LAYER_METRICS: tuple[str, ...] = (
    "frob_norm", "sigma_max", "delta_frob_norm", "delta_sigma_max", "stable_rank", "utilization",
    "effective_rank", "energy_rank_90", "energy_rank_95", "energy_rank_99", "r", "scale", "params",
    "base_sigma_max", "base_frob_norm", "udr", "udr_f", "sdi",
)
FLAGS: tuple[str, ...] = ("zero_update", "non_finite", "issues", "warning", "error")


def summary_metrics(summary: Mapping[str, Any]) -> list[str]:
    """Top-level summary keys that hold a number (or null), i.e. usable in a comparison rule."""
    return [k for k, v in summary.items() if v is None or (finite(v) is not None)]


def validate_gates(gates: Sequence[Gate], summary: Mapping[str, Any]) -> None:
    """Reject unknown metrics/flags before any output, naming what is allowed."""
    scalar = set(summary_metrics(summary)) - {"peft_dir", "adapter_name", "adapter_config_path",
                                               "adapter_weights_path", "udr_base_model"}
    for gate in gates:
        if gate.is_flag:
            if gate.metric not in FLAGS:
                raise InputError(f"--fail-on: unknown flag '{gate.metric}' (known: {', '.join(FLAGS)})")
        elif gate.metric not in LAYER_METRICS and gate.metric not in scalar:
            raise InputError(
                f"--fail-on: unknown metric '{gate.metric}' (per-layer: {', '.join(LAYER_METRICS)}; "
                f"or a numeric summary key such as utilization_mean, energy_rank_90_p90, udr_median)")


def evaluate_gates(gates: Sequence[Gate], summary: Mapping[str, Any]) -> list[str]:
    """One message per met rule (empty when none is met). ``summary`` must include ``layers``."""
    validate_gates(gates, summary)
    rows: list[Mapping[str, Any]] = summary.get("layers") or []
    issues: list[Mapping[str, Any]] = summary.get("issues") or []
    met: list[str] = []
    for gate in gates:
        if gate.is_flag:
            msg = _flag(gate.metric, rows, issues)
            if msg:
                met.append(f"{gate.text}: {msg}")
        elif gate.metric in LAYER_METRICS:
            hits = [(row["name"], v) for row in rows
                    if (v := finite(row.get(gate.metric))) is not None and gate.compare(v)]
            if hits:
                names = ", ".join(name for name, _ in hits[:3]) + (", ..." if len(hits) > 3 else "")
                met.append(f"{gate.text}: met by {len(hits)} of {len(rows)} layers ({names})")
        else:
            value = finite(summary.get(gate.metric))
            if value is not None and gate.compare(value):
                met.append(f"{gate.text}: {gate.metric} = {value:g}")
    return met


def _flag(flag: str, rows: Sequence[Mapping[str, Any]], issues: Sequence[Mapping[str, Any]]) -> str | None:
    if flag == "zero_update":
        n = sum(row.get("status") == "zero_update" for row in rows)
        return f"{n} layers have a zero update" if n else None
    if flag == "non_finite":
        n = sum(row.get("status") == "non_finite" for row in rows)
        return f"{n} layers have NaN/Inf weights" if n else None
    levels = {"error"} if flag == "error" else {"warning", "error"}
    codes = [str(i.get("code")) for i in issues if i.get("severity") in levels]
    return f"{len(codes)} issues ({', '.join(sorted(set(codes)))})" if codes else None
