"""The audit's seam for intruder dimensions: which base, then per-layer keys and the summary (gradience.audit/v1,
additive: present only when intruders were requested)."""

from __future__ import annotations

from typing import Any

from gradience.errors import InputError
from gradience.intruders import ROW_KEYS, SUMMARY_KEYS, IntruderOptions, measure_intruders, row_values
from gradience.issues import Issue


def _base_for(result: Any, loaded: Any, options: Any) -> str | None:
    """--base-model, else the base saved beside the adapter, else the config's hint when it resolves locally."""
    if options.base_model:
        return str(options.base_model)
    if result.udr_base_model:
        return str(result.udr_base_model)
    from gradience.udr.resolve import base_beside_adapter, resolve_hint

    beside = base_beside_adapter(loaded.peft_dir)
    if beside is not None:
        return str(beside)
    found = resolve_hint(loaded.config.get("base_model_name_or_path") if isinstance(
        loaded.config.get("base_model_name_or_path"), str) else None)
    return None if isinstance(found, Issue) else str(found.root)


def apply_intruders(result: Any, loaded: Any, options: Any, mutated: str | None) -> None:
    """Fill ``result``'s intruder keys; without a usable base every key is null and a warning says why."""
    opts: IntruderOptions = options.intruders
    result.intruder_summary = dict.fromkeys(SUMMARY_KEYS)
    result.intruder_summary.update({"intruder_k": opts.k, "intruder_eps": float(opts.eps)})
    for layer in result.layers:
        layer.intruders = dict.fromkeys(ROW_KEYS)
    if mutated is not None:
        result.issues.append(Issue("intruders_unavailable", f"init_lora_weights is {mutated!r}: s·B·A is not a change "
                                   "to the published base weight; intruders not computed", "warning"))
        return
    base = _base_for(result, loaded, options)
    if base is None:
        result.issues.append(Issue("intruders_unavailable", "intruder dimensions need the base model: pass "
                                   "--base-model DIR_OR_ID", "warning"))
        return
    try:
        report = measure_intruders(loaded.pairs, base, opts,
                                   fan_in_fan_out=loaded.config.get("fan_in_fan_out") is True)
    except InputError as exc:
        if options.base_model:
            raise
        result.issues.append(Issue("intruders_unavailable", f"intruders not computed: {exc}", "warning"))
        return
    result.issues.extend(report.issues)
    result.intruder_summary.update(report.summary)
    result.intruder_stats = dict(report.stats)
    for layer in result.layers:
        found = report.per_layer.get(layer.name)
        layer.intruders = row_values(found)
