"""``compress --base-model``: what the truncation does to the model's weights, measured against the base.

* UDR before and after (``gradience.udr``: the same base resolution, name mapping, norms and cache as the audit):
  truncation keeps σ₁, so ``udr`` is unchanged and ``udr_f`` drops with the discarded energy.
* DoRA: PEFT merges W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row (the norm of each output row of W + s·B·A, taken per
  output channel as ``get_weight_norm`` does, after undoing fan_in_fan_out). Truncating the directional part
  changes the merged weight by an amount that depends on W, computed here exactly, row block by row block
  (never the whole dense matrix at once): ``rel_error_of_update`` = ‖W'_k − W'‖_F / ‖W' − W‖_F and
  ``rel_error_of_weight`` = ‖W'_k − W'‖_F / ‖W'‖_F.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradience.compress.factors import truncated_factors
from gradience.issues import Issue

if TYPE_CHECKING:
    from gradience.adapter.model import LoadedAdapter
    from gradience.compress.core import CompressOptions, LayerPlan

_ROW_BLOCK_ELEMS = 1 << 20


def _udr(loaded: LoadedAdapter, layers: list[LayerPlan], options: CompressOptions) -> dict[str, Any]:
    from gradience.udr import UdrInput, measure_udr

    def inputs(after: bool) -> list[Any]:
        out = []
        for la in layers:
            s = abs(la.pair.scale) if la.pair is not None else 1.0
            if la.sigma is None:
                dsm = dfn = None
            else:
                k = min(la.r_after, la.r_before) if after else la.r_before
                dsm = s * float(la.sigma[0]) if la.sigma.size else 0.0
                dfn = s * math.sqrt(float(np.sum(np.square(la.sigma[:k]))))
            out.append(UdrInput(name=la.name, delta_sigma_max=dsm, delta_frob_norm=dfn, d_out=la.d_out,
                                d_in=la.d_in, kind=la.kind))
        return out

    before = measure_udr(inputs(False), options.base_model, cache_path=options.base_norms_cache)
    after = measure_udr(inputs(True), options.base_model, cache_path=options.base_norms_cache)
    for la in layers:
        b, a = before.per_layer.get(la.name) or {}, after.per_layer.get(la.name) or {}
        la.extra["udr_before"], la.extra["udr_after"] = b.get("udr"), a.get("udr")
        la.extra["udr_f_before"], la.extra["udr_f_after"] = b.get("udr_f"), a.get("udr_f")
    return {"base_model": before.base_model, "before": before.summary, "after": after.summary,
            "issues": [i.to_dict() for i in before.issues]}


def _dora_errors(loaded: LoadedAdapter, layers: list[LayerPlan], options: CompressOptions) -> dict[str, Any]:
    from gradience.adapter.loader import open_weights
    from gradience.adapter.pairs import parse_factor_key
    from gradience.errors import InputError
    from gradience.udr.base import BaseWeights
    from gradience.udr.names import BaseNameIndex
    from gradience.udr.resolve import resolve_base

    dora = [la for la in layers if la.dora]
    if not dora:
        return {}
    assert options.base_model is not None
    weights = BaseWeights(resolve_base(options.base_model, allow_download=False))
    index = BaseNameIndex(weights.tensors)
    source = open_weights(Path(loaded.adapter_weights_path or ""))
    magnitudes = {}
    for key in source.metas():
        parsed = parse_factor_key(key)
        if parsed is not None and parsed.role == "lora_magnitude_vector":
            magnitudes[parsed.prefix] = key
    fan_in_fan_out = bool(loaded.config.get("fan_in_fan_out", False))
    alpha = float(loaded.config["lora_alpha"])
    rows: dict[str, Any] = {}
    skipped: list[str] = []
    for la in dora:
        match = index.match(la.name)
        mkey = magnitudes.get(la.peft_prefix)
        if la.kind == "embedding" or match.tensor is None or mkey is None or la.pair is None:
            skipped.append(la.name)
            continue
        try:
            w = weights.read_f32(match.tensor)
        except InputError:
            skipped.append(la.name)
            continue
        w = w.reshape(w.shape[0], -1) if w.ndim != 2 else w
        if fan_in_fan_out and la.kind == "linear":
            w = w.T
        if w.shape != (la.d_out, la.d_in):
            skipped.append(la.name)
            continue
        m = np.asarray(source.read_f32(mkey), dtype=np.float64).reshape(-1)
        a, b = la.pair.load_factors()
        s = la.pair.scale
        if la.action == "truncated":
            a_k, b_k, _ = truncated_factors(a, b, la.r_after, la.coef, None)
            s_k = alpha / la.r_after
        else:
            a_k, b_k, s_k = np.asarray(a, np.float64), np.asarray(b, np.float64), s
        rows[la.name] = _merged_error(w, m, a, b, s, a_k, b_k, s_k)
        la.extra.update({f"dora_{k}": v for k, v in rows[la.name].items()})
    out: dict[str, Any] = {"layers": rows}
    if rows:
        out["rel_error_of_update_max"] = max(r["rel_error_of_update"] for r in rows.values())
    if skipped:
        out["issues"] = [Issue("dora_base_unavailable", "DoRA merged-weight error not computed (no matching base "
                                                        "weight or magnitude vector, or embedding DoRA)",
                               modules=skipped).to_dict()]
    return out


def _merged_error(w: np.ndarray, m: np.ndarray, a: np.ndarray, b: np.ndarray, s: float, a_k: np.ndarray,
                  b_k: np.ndarray, s_k: float) -> dict[str, float]:
    """Frobenius norms of W'_k − W', W' − W and W' for DoRA merges of two directional updates, by row blocks."""
    d_out, d_in = w.shape
    block = max(1, _ROW_BLOCK_ELEMS // max(d_in, 1))
    a64, ak64 = np.asarray(a, np.float64), np.asarray(a_k, np.float64)
    diff2 = upd2 = merged2 = 0.0
    for i in range(0, d_out, block):
        wb = np.asarray(w[i:i + block], dtype=np.float64)
        full = wb + s * (np.asarray(b[i:i + block], np.float64) @ a64)
        trunc = wb + s_k * (np.asarray(b_k[i:i + block], np.float64) @ ak64)
        mb = m[i:i + block, None]
        merged = mb * full / np.linalg.norm(full, axis=1, keepdims=True)
        merged_k = mb * trunc / np.linalg.norm(trunc, axis=1, keepdims=True)
        diff2 += float(np.sum(np.square(merged_k - merged)))
        upd2 += float(np.sum(np.square(merged - wb)))
        merged2 += float(np.sum(np.square(merged)))
    return {"rel_error_of_update": math.sqrt(diff2 / upd2) if upd2 > 0 else 0.0,
            "rel_error_of_weight": math.sqrt(diff2 / merged2) if merged2 > 0 else 0.0}


def base_checks(loaded: LoadedAdapter, layers: list[LayerPlan], options: CompressOptions
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(udr block, dora block or None) for compress.json."""
    udr = _udr(loaded, layers, options)
    dora = _dora_errors(loaded, layers, options) if any(la.dora for la in layers) else None
    return udr, dora
