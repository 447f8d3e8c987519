"""Intruder dimensions (Shuttleworth et al., NeurIPS 2025): top singular vectors of W + ΔW far from every singular
vector of the base W, per layer, without a dense SVD of W + ΔW (issue 23).

``measure_intruders`` resolves the base like UDR does and returns an :class:`IntruderReport`;
:mod:`gradience.intruders.mitigate` scales the intruder components (PEFT's ``reduce_intruder_dimension``).
numpy only; torch is used for W's products when installed (``device``), never imported at module level.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradience.adapter.model import LoraPair
from gradience.intruders.measure import (
    ROW_KEYS,
    SUMMARY_KEYS,
    IntruderOptions,
    IntruderReport,
    measure_pairs,
    row_values,
)
from gradience.issues import Issue, Severity

__all__ = ["ROW_KEYS", "SUMMARY_KEYS", "IntruderOptions", "IntruderReport", "match_base", "measure_intruders",
           "row_values"]


def match_base(pairs: Sequence[LoraPair], weights: object, *, fan_in_fan_out: bool = False
               ) -> tuple[dict[str, tuple[str, bool]], list[Issue]]:
    """pair name -> (base tensor, stored transposed?) through the UDR's one name mapper and shape rule; DoRA and
    conv pairs are skipped (their merged weight is not W + s·B·A as a matrix of W's shape), with an issue."""
    from gradience.udr import UdrInput
    from gradience.udr.measure import stored_transposed, weight_fits
    from gradience.udr.names import BaseNameIndex

    tensors = weights.tensors  # type: ignore[attr-defined]
    problems: dict[str, str] = getattr(weights, "file_problems", {})
    index = BaseNameIndex(tensors)
    out: dict[str, tuple[str, bool]] = {}
    skipped: dict[str, list[str]] = {}
    for pair in pairs:
        if pair.dora or pair.kind == "conv":
            skipped.setdefault("DoRA or conv layer (merged weight is not W + s·B·A)", []).append(pair.name)
            continue
        match = index.match(pair.name)
        info = tensors.get(match.tensor) if match.tensor else None
        if info is None or match.tensor is None or info.file in problems or not info.is_float:
            skipped.setdefault(f"base weight {match.how if info is None else 'unusable'}", []).append(pair.name)
            continue
        inp = UdrInput(name=pair.name, delta_sigma_max=None, delta_frob_norm=None, d_out=pair.d_out,
                       d_in=pair.d_in, kind=pair.kind, fan_in_fan_out=fan_in_fan_out)
        if len(info.shape) != 2 or not weight_fits(pair.kind, info.shape, pair.d_out, pair.d_in):
            skipped.setdefault("base weight shape differs from the update's", []).append(pair.name)
            continue
        out[pair.name] = (match.tensor, bool(stored_transposed(inp, info.shape)))
    # every layer skipped (e.g. a base of another size): nothing was measured, which a user must not miss
    severity: Severity = "warning" if not out and skipped else "info"
    issues = [Issue("intruder_layer_skipped", f"intruders not computed for {len(names)} layer(s): {why} "
                    f"(e.g. {names[0]})", severity, modules=names) for why, names in skipped.items()]
    return out, issues


def measure_intruders(pairs: Sequence[LoraPair], base_model: str, options: IntruderOptions | None = None, *,
                      fan_in_fan_out: bool = False) -> IntruderReport:
    """Intruders of every pair against ``base_model`` (a local directory or a hub id in the local cache; an
    unresolvable one raises InputError)."""
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    options = options or IntruderOptions()
    options.validate()
    resolved = resolve_base(base_model, allow_download=True)
    weights = BaseWeights(resolved)
    matches, issues = match_base(pairs, weights, fan_in_fan_out=fan_in_fan_out)
    from gradience.blas import limited_blas_threads

    with limited_blas_threads():  # a multi-threaded BLAS on a busy machine is many times slower (gradience.blas)
        report = measure_pairs(pairs, weights, matches, options)
    report.issues[:0] = issues
    report.stats["base_model"] = resolved.display
    return report
