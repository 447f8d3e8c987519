"""``gradience compare --fail-on`` semantics (rules parsed by :mod:`gradience.gates`).

- Per-module metrics: ``cos``, ``overlap_left``, ``overlap_right``, ``k`` and, for each side value
  (r, scale, utilization, stable_rank, energy_rank_90, delta_sigma_max, delta_frob_norm, udr), ``<m>_a``,
  ``<m>_b`` and ``<m>_delta`` (B − A). Met when ANY matched module satisfies it (``cos<0.5``, ``udr_delta>0.2``).
- Summary metrics: ``cos_mean``, ``cos_median``, ``overlap_left_mean``, ``overlap_right_mean``, ``n_matched``,
  ``n_only_in_a``, ``n_only_in_b``, ``udr_median_delta``, ``fraction_udr_gt_0_3_delta``,
  ``utilization_mean_delta`` and each side's ``udr_median_a`` / ``_b`` ... (``udr_median_delta>0.2``).
- Flags: ``unmatched`` (a module only in one side), ``issues``/``warning`` (any warning or error issue),
  ``error``.
- A gate never passes by default: a rule on a metric that could not be computed (null for every module, or a
  null summary value) is a usage error naming the rule and why (exit 2); an unknown metric likewise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradience.compare.core import CROSS_KEYS, SIDE_KEYS, SIDE_SUMMARY_KEYS
from gradience.errors import InputError
from gradience.gates import Gate, require_available
from gradience.textfmt import finite

MODULE_METRICS: tuple[str, ...] = (*CROSS_KEYS, "k",
                                   *(f"{m}_{suffix}" for m in SIDE_KEYS for suffix in ("a", "b", "delta")))
SUMMARY_METRICS: tuple[str, ...] = (
    "cos_mean", "cos_median", "overlap_left_mean", "overlap_right_mean", "n_matched", "n_only_in_a",
    "n_only_in_b", *(f"{m}_{suffix}" for m in SIDE_SUMMARY_KEYS for suffix in ("a", "b", "delta")))
FLAGS: tuple[str, ...] = ("unmatched", "issues", "warning", "error")


def module_value(module: Mapping[str, Any], metric: str) -> float | None:
    if metric in CROSS_KEYS or metric == "k":
        return finite(module.get(metric))
    base, _, suffix = metric.rpartition("_")
    block = module.get({"a": "a", "b": "b", "delta": "delta"}[suffix]) or {}
    return finite(block.get(base))


def summary_value(summary: Mapping[str, Any], metric: str) -> float | None:
    if metric in ("n_only_in_a", "n_only_in_b"):
        return float(len(summary.get(metric.removeprefix("n_")) or []))
    if metric in summary:
        return finite(summary.get(metric))
    base, _, suffix = metric.rpartition("_")
    return finite((summary.get(suffix) or {}).get(base))


def _why_missing(doc: Mapping[str, Any], metric: str) -> str:
    unavailable: Mapping[str, str] = (doc.get("summary") or {}).get("unavailable") or {}
    if metric in CROSS_KEYS or metric == "k" or metric.startswith(("cos_", "overlap_")):
        key = "cos" if metric.startswith("cos") else metric.removesuffix("_mean")
    elif metric.startswith(("udr", "fraction_udr")):
        key = "udr"
    else:
        key = ""
    if key in unavailable:
        return unavailable[key]
    if not doc.get("modules"):
        return "no module matched between A and B"
    return "it is null for every matched module"


def validate_gates(gates: Sequence[Gate], doc: Mapping[str, Any]) -> None:
    """Unknown metrics/flags, and rules on metrics that could not be computed: InputError (exit 2)."""
    modules: Sequence[Mapping[str, Any]] = doc.get("modules") or []
    summary: Mapping[str, Any] = doc.get("summary") or {}

    def why_missing(gate: Gate) -> str | None:
        if gate.is_flag:
            return None
        if gate.metric in MODULE_METRICS:
            computed = any(module_value(m, gate.metric) is not None for m in modules)
        else:
            computed = summary_value(summary, gate.metric) is not None
        return None if computed else _why_missing(doc, gate.metric)

    for gate in gates:
        if gate.is_flag and gate.metric not in FLAGS:
            raise InputError(f"--fail-on: unknown flag '{gate.metric}' (known: {', '.join(FLAGS)})")
        if not gate.is_flag and gate.metric not in MODULE_METRICS and gate.metric not in SUMMARY_METRICS:
            raise InputError(f"--fail-on: unknown metric '{gate.metric}' (per module: {', '.join(MODULE_METRICS[:4])}"
                             f", <metric>_a/_b/_delta; summary: {', '.join(SUMMARY_METRICS[:7])}, "
                             "udr_median_delta, ...)")
    require_available(gates, why_missing)


def check_known(gates: Sequence[Gate]) -> None:
    """Reject unknown metrics and flags before any work is done."""
    for gate in gates:
        known = FLAGS if gate.is_flag else (*MODULE_METRICS, *SUMMARY_METRICS)
        if gate.metric not in known:
            validate_gates([gate], {})


def evaluate_gates(gates: Sequence[Gate], doc: Mapping[str, Any]) -> list[str]:
    """One message per met rule (empty when none is met)."""
    validate_gates(gates, doc)
    modules: Sequence[Mapping[str, Any]] = doc.get("modules") or []
    summary: Mapping[str, Any] = doc.get("summary") or {}
    met: list[str] = []
    for gate in gates:
        if gate.is_flag:
            msg = _flag(gate.metric, summary, doc.get("issues") or [])
            if msg:
                met.append(f"{gate.text}: {msg}")
        elif gate.metric in MODULE_METRICS:
            hits = [(str(m["name"]), v) for m in modules
                    if (v := module_value(m, gate.metric)) is not None and gate.compare(v)]
            if hits:
                names = ", ".join(name for name, _ in hits[:3]) + (", ..." if len(hits) > 3 else "")
                met.append(f"{gate.text}: met by {len(hits)} of {len(modules)} modules ({names})")
        else:
            value = summary_value(summary, gate.metric)
            if value is not None and gate.compare(value):
                met.append(f"{gate.text}: {gate.metric} = {value:g}")
    return met


def _flag(flag: str, summary: Mapping[str, Any], issues: Sequence[Mapping[str, Any]]) -> str | None:
    if flag == "unmatched":
        na, nb = len(summary.get("only_in_a") or []), len(summary.get("only_in_b") or [])
        return f"{na} modules only in A, {nb} only in B" if na or nb else None
    levels = {"error"} if flag == "error" else {"warning", "error"}
    codes = [str(i.get("code")) for i in issues if i.get("severity") in levels]
    return f"{len(codes)} issues ({', '.join(sorted(set(codes)))})" if codes else None
