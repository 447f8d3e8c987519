"""Scale the intruder components of W + ΔW by λ and write the adapter back at the same rank (``compress
--scale-intruders λ``), PEFT's ``reduce_intruder_dimension`` (peft/tuners/lora/intruders.py) without a dense matrix.

PEFT: ΔW' = ΔW + (λ − 1)·Σ_{i∈I} σ_i·u_i·v_iᵀ (the triplets of W + ΔW), then B'·A' = the best rank-r approximation
of ΔW'/s with √σ shared by both factors. Here ΔW' is already factored, B_cat = [B, (λ − 1)/s·U_I·Σ_I],
A_cat = [A; V_Iᵀ] (rank ≤ r + |I|), so its truncated SVD is the exact thin SVD of the factors
(:func:`gradience.audit.spectrum.factored_svd`, the one SVD path). ``energy_retained`` is the share of ‖ΔW'‖_F²
the rank-r truncation keeps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.audit.spectrum import factored_svd
from gradience.errors import InputError
from gradience.intruders.detect import LayerIntruders
from gradience.intruders.measure import IntruderOptions

SCHEMA = "gradience.intruders.mitigate/v1"
REPORT_NAME = "intruders.json"


@dataclass(frozen=True)
class Mitigated:
    a: np.ndarray               # (r, d_in)
    b: np.ndarray               # (d_out, r)
    energy_retained: float      # rank-r share of ‖ΔW'‖_F² (1.0 when ΔW' has rank ≤ r)
    rel_change: float           # ‖s·B'·A' − ΔW‖_F / ‖ΔW‖_F


def scale_components(a: np.ndarray, b: np.ndarray, scale: float, u: np.ndarray, sigma: np.ndarray,
                     v: np.ndarray, lam: float) -> Mitigated:
    """New factors (ΔW orientation: A (r, d_in), B (d_out, r)) for the triplets u (d_out, q), σ (q,), v (d_in, q)."""
    r = a.shape[0]
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    extra_b = (lam - 1.0) / scale * (u * sigma)
    svd = factored_svd(np.concatenate([a64, v.T]), np.concatenate([b64, extra_b], axis=1))
    s2 = np.square(svd.sigma)
    total = float(s2.sum())
    kept = min(r, s2.shape[0])
    root = np.sqrt(svd.sigma[:kept])
    b_new = np.zeros((b.shape[0], r))
    a_new = np.zeros((r, a.shape[1]))
    b_new[:, :kept] = svd.u[:, :kept] * root
    a_new[:kept] = root[:, None] * svd.vt[:kept]
    # ‖B'A' − BA‖_F from the (r + r)-column factorisation, never the dense product.
    diff_b = np.concatenate([b_new, -b64], axis=1)
    diff_a = np.concatenate([a_new, a64])
    change = _frob_of_product(diff_a, diff_b)
    before = _frob_of_product(a64, b64)
    return Mitigated(a_new, b_new, float(s2[:kept].sum()) / total if total > 0 else 1.0,
                     change / before if before > 0 else 0.0)


def _frob_of_product(a: np.ndarray, b: np.ndarray) -> float:
    """‖B·A‖_F = √tr((BᵀB)(AAᵀ))."""
    value = float(np.sum((b.T @ b) * (a @ a.T)))
    return math.sqrt(max(value, 0.0))


def triplets_delta_side(found: LayerIntruders, transposed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, σ, v) of the intruders in ΔW's orientation (the detection works in W's stored orientation)."""
    top = found.triplets
    if top is None:
        raise ValueError("intruder triplets were not kept")
    idx = list(found.indices)
    u, s, v = top.u[:, idx], top.sigma[idx], top.v[:, idx]
    return (v, s, u) if transposed else (u, s, v)


def mitigate_adapter(loaded: LoadedAdapter, base_model: str, out: str | os.PathLike[str] | None, lam: float,
                     options: IntruderOptions | None = None, *, force: bool = False,
                     dry_run: bool = False) -> dict[str, Any]:
    """Detect intruders against ``base_model``, scale them by ``lam`` and (unless ``dry_run``) write the adapter to
    ``out`` (same config, same ranks); returns the ``gradience.intruders.mitigate/v1`` document."""
    from gradience.blas import limited_blas_threads
    from gradience.compress.tensors import _RawReader, _read_pair, _stored_name, factor_layout
    from gradience.compress.writer import check_adapter_out, write_peft_adapter
    from gradience.intruders import match_base, measure_pairs
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise InputError(f"--scale-intruders must be in [0, 1] (the factor the intruder components keep), got {lam}")
    options = options or IntruderOptions()
    options.validate()
    inputs = [p for p in (loaded.peft_dir, loaded.adapter_weights_path, loaded.adapter_config_path) if p]
    out_dir = None if out is None else check_adapter_out(out, inputs, force, REPORT_NAME, clean=not dry_run)
    resolved = resolve_base(base_model, allow_download=True)
    weights = BaseWeights(resolved)
    fan = loaded.config.get("fan_in_fan_out") is True
    matches, issues = match_base(loaded.pairs, weights, fan_in_fan_out=fan)
    if not matches:  # writing an unchanged copy would look like a mitigation that found nothing
        why = "; ".join(i.message for i in issues) or "no LoRA layer"
        raise InputError(f"no layer of the adapter can be checked against {resolved.display}: {why}",
                         loaded.adapter_weights_path or loaded.peft_dir)
    with limited_blas_threads():
        report = measure_pairs(loaded.pairs, weights, matches, options)
    pairs = {p.name: p for p in loaded.pairs}
    rows: list[dict[str, Any]] = []
    changed: dict[str, LayerIntruders] = {}
    for name, found in report.per_layer.items():
        rows.append({"name": name, "intruder_count": found.count, "intruder_indices": found.indices,
                     "energy_retained": None if found.count else 1.0, "rel_change": None if found.count else 0.0})
        if found.count:
            changed[name] = found
    doc: dict[str, Any] = {
        "schema": SCHEMA, "peft_dir": loaded.peft_dir, "base_model": resolved.display, "lambda": lam,
        "intruder_k": options.k, "intruder_eps": float(options.eps), "out_dir": None if out_dir is None else
        os.fspath(out_dir.path), "written": False, "n_layers_checked": len(report.per_layer),
        "n_layers_changed": len(changed), "layers": rows,
        "issues": [i.to_dict() for i in issues + report.issues], "stats": report.stats,
    }
    by_row = {row["name"]: row for row in rows}

    def new_pair(pair: LoraPair, raw: Any) -> tuple[np.ndarray, np.ndarray]:
        a, b = _read_pair(raw, pair)
        u, s, v = triplets_delta_side(changed[pair.name], matches[pair.name][1])
        result = scale_components(a, b, pair.scale, u, s, v, lam)
        by_row[pair.name]["energy_retained"] = result.energy_retained
        by_row[pair.name]["rel_change"] = result.rel_change
        return factor_layout(pair, result.a, result.b, pair.r)

    if dry_run or out_dir is None:
        from gradience.adapter.loader import open_weights

        raw = _RawReader(open_weights(Path(loaded.adapter_weights_path or "")), loaded.adapter_weights_path)
        for name in changed:
            new_pair(pairs[name], raw)
        return doc
    specs = _specs(loaded, pairs, changed, new_pair, _RawReader, _stored_name)
    config = dict(loaded.config)
    with limited_blas_threads():
        write_peft_adapter(out_dir, specs, config, report=lambda: {**doc, "written": True},
                           report_name=REPORT_NAME, metadata={"format": "pt", "gradience_intruders_lambda": str(lam)})
    doc["written"] = True
    return doc


def _specs(loaded: LoadedAdapter, pairs: dict[str, LoraPair], changed: dict[str, LayerIntruders], new_pair: Any,
           raw_reader: Any, stored_name: Any) -> list[Any]:
    """Every input tensor in order: the changed pairs' factors recomputed (one pair at a time), the rest copied."""
    from gradience.adapter.loader import open_weights
    from gradience.io.safetensors_write import TensorSpec, encode_float

    where = loaded.adapter_weights_path
    source = open_weights(Path(where or ""))
    raw = raw_reader(source, where)
    by_key: dict[str, tuple[LoraPair, int]] = {}
    for name in changed:
        pair = pairs[name]
        by_key[pair.a_key], by_key[pair.b_key] = (pair, 0), (pair, 1)
    pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def produce(pair: LoraPair, side: int, dtype: str) -> np.ndarray:
        if pair.name not in pending:
            pending[pair.name] = new_pair(pair, raw)
        value = pending[pair.name][side]
        try:
            return encode_float(value, dtype)
        except ValueError as exc:
            raise InputError(f"module {pair.name}: {exc}", where) from None

    specs = []
    for key, meta in source.metas().items():
        stored = stored_name(meta.dtype, key, where)
        hit = by_key.get(key)
        if hit is None:
            specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
        else:
            specs.append(TensorSpec(key, stored, meta.shape, partial(produce, hit[0], hit[1], stored)))
    return specs
