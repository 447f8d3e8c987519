"""``gradience audit --fail-on`` semantics.

- A per-layer metric (``utilization<0.25``, ``udr>1.0``, ``energy_rank_90>=8`` ...) is met when ANY layer
  with a value satisfies it; layers without a value (non-finite weights, no base weight) never match.
- A summary key (``utilization_mean<0.2``, ``udr_median>0.5``, ``suggested_r_global_90<=4`` ...) compares the
  summary value.
- Flags: ``zero_update`` (some pair is a zero update), ``non_finite`` (NaN/Inf factors), ``issues`` (any
  warning or error issue), ``error`` (any error issue), ``warning`` (same as ``issues``).
- A gate never passes by default (SPEC §3.4): a rule on a metric that could not be computed (a UDR rule when
  no base was resolved or ``--no-udr`` was given, a per-layer metric null for every layer, a null summary
  value) is a usage error (exit 2) naming the rule and why; an unknown metric or flag likewise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradience.errors import InputError
from gradience.gates import Gate, require_available
from gradience.textfmt import finite
from gradience.udr import PER_LAYER_KEYS as UDR_ROW_KEYS
from gradience.udr import SUMMARY_KEYS as UDR_SUMMARY_KEYS

LAYER_METRICS: tuple[str, ...] = tuple(dict.fromkeys((
    "frob_norm", "sigma_max", "delta_frob_norm", "delta_sigma_max", "stable_rank", "utilization",
    "effective_rank", "energy_rank_90", "energy_rank_95", "energy_rank_99", "r", "scale", "params",
    *UDR_ROW_KEYS,
)))
FLAGS: tuple[str, ...] = ("zero_update", "non_finite", "issues", "warning", "error")
_UDR_METRICS = frozenset((*UDR_ROW_KEYS, *UDR_SUMMARY_KEYS))
# Issues whose message says why UDR is missing, in the order they are the better explanation.
_UDR_REASON_CODES = ("mutated_base_init", "base_model_unresolved", "udr_unavailable", "dora_effective_unavailable")
_NOT_SCALAR = {"peft_dir", "adapter_name", "adapter_config_path", "adapter_weights_path", "udr_base_model",
               "schema", "udr_requested"}


def summary_metrics(summary: Mapping[str, Any]) -> list[str]:
    """Top-level summary keys that hold a number (or null), i.e. usable in a comparison rule."""
    return [k for k, v in summary.items()
            if k not in _NOT_SCALAR and (v is None or finite(v) is not None)]


def validate_gates(gates: Sequence[Gate], summary: Mapping[str, Any], *, udr_disabled: bool = False) -> None:
    """Reject unknown metrics/flags and rules whose metric is missing, before any output (exit 2).

    ``udr_disabled``: the user turned UDR off (``--no-udr``), which is the reason a UDR rule cannot run.
    """
    scalar = set(summary_metrics(summary)) | set(UDR_SUMMARY_KEYS)
    for gate in gates:
        if gate.is_flag:
            if gate.metric not in FLAGS:
                raise InputError(f"--fail-on: unknown flag '{gate.metric}' (known: {', '.join(FLAGS)})")
        elif gate.metric not in LAYER_METRICS and gate.metric not in scalar:
            raise InputError(
                f"--fail-on: unknown metric '{gate.metric}' (per-layer: {', '.join(LAYER_METRICS)}; "
                f"or a numeric summary key such as utilization_mean, energy_rank_90_p90, udr_median)")
    require_available(gates, lambda gate: why_missing(gate, summary, udr_disabled=udr_disabled))


def why_missing(gate: Gate, summary: Mapping[str, Any], *, udr_disabled: bool = False) -> str | None:
    """None when ``gate`` can be evaluated on ``summary``; else why its metric was not computed."""
    if gate.is_flag:
        return None  # flags are facts about the audit (some issue / layer exists or not): always decidable
    rows: Sequence[Mapping[str, Any]] = summary.get("layers") or []
    if gate.metric in LAYER_METRICS:
        if any(finite(row.get(gate.metric)) is not None for row in rows):
            return None
    elif finite(summary.get(gate.metric)) is not None:
        return None
    if gate.metric in _UDR_METRICS:
        return _why_no_udr(gate.metric, summary, udr_disabled)
    if not rows:
        return "the adapter has no LoRA pairs"
    bad = sum(row.get("status") == "non_finite" for row in rows)
    if bad == len(rows):
        return f"every one of the {len(rows)} LoRA pairs has NaN/Inf factors"
    where = "every layer" if gate.metric in LAYER_METRICS else "the summary"
    return f"it is null for {where}"


def _why_no_udr(metric: str, summary: Mapping[str, Any], udr_disabled: bool) -> str:
    issues: Sequence[Mapping[str, Any]] = summary.get("issues") or []
    if metric.startswith("dora_eff") and not any(row.get("dora") for row in summary.get("layers") or []):
        return "the adapter has no DoRA layers"
    by_code = {str(i.get("code")): str(i.get("message") or "") for i in issues}
    for code in _UDR_REASON_CODES:
        if code in by_code:
            return f"{code}: {by_code[code]}"
    if udr_disabled:
        return "--no-udr was given; drop it and pass --base-model DIR_OR_ID"
    if not summary.get("udr_requested"):
        return "no base model was resolved; pass --base-model DIR_OR_ID"
    return "no layer could be matched to a usable base weight (see the issues)"


def evaluate_gates(gates: Sequence[Gate], summary: Mapping[str, Any], *, udr_disabled: bool = False) -> list[str]:
    """One message per met rule (empty when none is met). ``summary`` must include ``layers``."""
    validate_gates(gates, summary, udr_disabled=udr_disabled)
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


def _layers_word(n: int) -> str:
    return f"{n} layer has" if n == 1 else f"{n} layers have"


def _flag(flag: str, rows: Sequence[Mapping[str, Any]], issues: Sequence[Mapping[str, Any]]) -> str | None:
    if flag == "zero_update":
        n = sum(row.get("status") == "zero_update" for row in rows)
        return f"{_layers_word(n)} a zero update" if n else None
    if flag == "non_finite":
        n = sum(row.get("status") == "non_finite" for row in rows)
        return f"{_layers_word(n)} NaN/Inf weights" if n else None
    levels = {"error"} if flag == "error" else {"warning", "error"}
    codes = [str(i.get("code")) for i in issues if i.get("severity") in levels]
    if not codes:
        return None
    return f"{len(codes)} issue{'' if len(codes) == 1 else 's'} ({', '.join(sorted(set(codes)))})"
