"""Intruder dimensions of every audited layer against a base checkpoint (issue 23).

The base is resolved and read exactly as for UDR (:mod:`gradience.udr.resolve`, :mod:`gradience.udr.base`, the one
name mapper :class:`gradience.udr.names.BaseNameIndex`); each matched weight is read once, as float32, and is the
only dense matrix involved: the merged side is the block Krylov of W + s·B·A (:mod:`gradience.intruders.solver`),
the base side a cached partial SVD of W certified by the mass bound (:mod:`gradience.intruders.detect`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience import stats
from gradience.adapter.model import LoraPair
from gradience.errors import InputError
from gradience.intruders.cache import SpectraCache, tensor_hash
from gradience.intruders.detect import BaseSpectrum, LayerIntruders, layer_intruders, partial_base
from gradience.intruders.solver import LowRankPlus, TorchOperator, top_singular
from gradience.issues import Issue
from gradience.policy.thresholds import INTRUDER_BASE_P0, INTRUDER_EPS, INTRUDER_MAX_K, INTRUDER_TOP_K

ROW_KEYS: tuple[str, ...] = (
    "intruder_count", "intruder_indices", "intruder_sigma", "intruder_cos", "intruder_cos_upper",
    "intruder_energy", "intruder_energy_fraction", "intruder_decided_by",
)
SUMMARY_KEYS: tuple[str, ...] = (
    "intruder_k", "intruder_eps", "n_layers_intruder_checked", "n_layers_with_intruders", "intruder_layer_share",
    "intruder_count_total", "intruder_count_mean", "intruder_energy_total", "intruder_decided_partial_fraction",
)


@dataclass
class IntruderOptions:
    k: int = INTRUDER_TOP_K
    eps: float = INTRUDER_EPS
    device: str = "auto"        # "auto" (torch on the CPU when installed, else numpy) | "numpy" | "cpu" | "cuda"
    cache_dir: str | None = None
    use_cache: bool = True

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= INTRUDER_MAX_K:
            raise InputError(f"--intruder-k must be an integer in 1..{INTRUDER_MAX_K}, got {self.k}")
        if not (isinstance(self.eps, (int, float)) and 0.0 < float(self.eps) <= 1.0):
            raise InputError(f"--intruder-eps must be in (0, 1] (a |cos| threshold), got {self.eps}")
        if self.device not in ("auto", "numpy", "cpu", "cuda"):
            raise InputError(f"--device must be auto, numpy, cpu or cuda, got {self.device!r}")


@dataclass
class IntruderReport:
    per_layer: dict[str, LayerIntruders] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def torch_device(requested: str) -> tuple[str | None, Issue | None]:
    """The torch device for W's products, or None for numpy (with an info issue when a request falls back)."""
    if requested == "numpy":
        return None, None
    try:
        import torch
    except ImportError:
        if requested == "auto":
            return None, None
        return None, Issue("intruder_device_fallback", f"--device {requested}: torch is not installed (the "
                           "'hf' extra); numpy was used", "info")
    if requested == "cuda" and not torch.cuda.is_available():
        return "cpu", Issue("intruder_device_fallback", "--device cuda: no CUDA device is visible to torch; the "
                            "CPU was used", "info")
    return ("cpu" if requested == "auto" else requested), None


def stored_factors(pair: LoraPair, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) with s·L·R the update in the base weight's stored orientation (ΔW = s·B·A, or its transpose)."""
    a, b = pair.load_factors()
    a = np.asarray(a, dtype=np.float64).reshape(pair.r, -1)
    b = np.asarray(b, dtype=np.float64).reshape(-1, pair.r)
    return (a.T, b.T) if transposed else (b, a)


def measure_pairs(pairs: Sequence[LoraPair], weights: Any, matches: dict[str, tuple[str, bool]],
                  options: IntruderOptions) -> IntruderReport:
    """Intruders of each pair whose base tensor is in ``matches`` (pair name -> (tensor, stored transposed?))."""
    options.validate()
    report = IntruderReport()
    device, issue = torch_device(options.device)
    if issue is not None:
        report.issues.append(issue)
    cache = SpectraCache.at(options.cache_dir) if options.use_cache else None
    t0 = time.perf_counter()
    t_merged = t_base = t_read = 0.0
    base_computed = 0
    for pair in pairs:
        if pair.name not in matches:
            continue
        tname, transposed = matches[pair.name]
        t1 = time.perf_counter()
        w = weights.read_f32(tname)
        w = w.reshape(w.shape[0], -1)
        l_fac, r_fac = stored_factors(pair, transposed)
        if not (np.isfinite(l_fac).all() and np.isfinite(r_fac).all()) or not np.isfinite(w).all():
            report.issues.append(Issue("intruder_non_finite", f"{pair.name}: NaN/Inf in W or the factors; "
                                       "intruders not computed", "warning", modules=[pair.name]))
            continue
        key = tensor_hash(w, "f32", tuple(w.shape), False) if cache is not None else ""
        t2 = time.perf_counter()
        t_read += t2 - t1
        full = min(w.shape)
        latest: list[BaseSpectrum] = []

        def base_for(p: int, w: np.ndarray = w, key: str = key, full: int = full,
                     latest: list[BaseSpectrum] = latest) -> BaseSpectrum:
            nonlocal base_computed
            if latest and (latest[0].complete or latest[0].u.shape[1] >= min(p, full)):
                return latest[0]
            latest[:] = [_base_spectrum(p)]
            return latest[0]

        def _base_spectrum(p: int, w: np.ndarray = w, key: str = key, full: int = full) -> BaseSpectrum:
            nonlocal base_computed
            if cache is not None:
                hit = cache.get(key, w.shape[0], min(p, full))
                if hit is not None:
                    return hit
                cache.misses += 1
            spec = partial_base(w, p, device)
            base_computed += 1
            if cache is not None:
                cache.put(key, spec)
            return spec

        # The base side first: its top vectors and L start the merged Krylov near its answer (far fewer blocks).
        first = base_for(INTRUDER_BASE_P0)
        t3 = time.perf_counter()
        t_base += t3 - t2
        op = LowRankPlus(w, l_fac, r_fac, pair.scale) if device is None else TorchOperator(
            w, l_fac, r_fac, pair.scale, device=device)
        start = np.concatenate([l_fac, first.u[:, :options.k]], axis=1)
        merged = top_singular(op, options.k, start=start)
        t4 = time.perf_counter()
        t_merged += t4 - t3
        w_op = LowRankPlus(w) if device is None else TorchOperator(w, device=device)
        found, _base = layer_intruders(merged, base_for, full, min(options.k, full), float(options.eps),
                                       w_op=w_op)
        t_base += time.perf_counter() - t4
        if not merged.converged:
            report.issues.append(Issue("intruder_not_converged", f"{pair.name}: the top-{options.k} of W + ΔW did "
                                       f"not reach the residual stop (max residual {found.residual_max:.3g})",
                                       "info", modules=[pair.name]))
        report.per_layer[pair.name] = found
    if cache is not None:
        report.issues.extend(cache.issues)
    report.summary = summarize(report.per_layer, options)
    decided = [la.decided_by for la in report.per_layer.values()]
    report.stats = {
        "device": device or "numpy", "layers": len(report.per_layer),
        "decided_partial": decided.count("partial"), "decided_lanczos": decided.count("lanczos"),
        "decided_extended": decided.count("extended"),
        "decided_dense": decided.count("dense"), "base_spectra_computed": base_computed,
        "cache_dir": None if cache is None else str(cache.root),
        "cache_hits": 0 if cache is None else cache.hits, "cache_misses": 0 if cache is None else cache.misses,
        "krylov_products_total": sum(la.products for la in report.per_layer.values()),
        "time_read_s": t_read, "time_merged_s": t_merged, "time_base_s": t_base,
        "time_total_s": time.perf_counter() - t0,
    }
    return report


def summarize(per_layer: dict[str, LayerIntruders], options: IntruderOptions) -> dict[str, Any]:
    rows = list(per_layer.values())
    n = len(rows)
    with_intruders = sum(la.count > 0 for la in rows)
    return {
        "intruder_k": options.k, "intruder_eps": float(options.eps),
        "n_layers_intruder_checked": n,
        "n_layers_with_intruders": with_intruders,
        "intruder_layer_share": with_intruders / n if n else None,
        "intruder_count_total": sum(la.count for la in rows),
        "intruder_energy_total": math.fsum(la.energy for la in rows) if n else None,
        "intruder_decided_partial_fraction": (sum(la.decided_by in ("partial", "lanczos") for la in rows) / n)
        if n else None,
        "intruder_count_mean": stats.mean([la.count for la in rows]) if n else None,
    }


def row_values(found: LayerIntruders | None) -> dict[str, Any]:
    """The per-layer JSON keys (``ROW_KEYS``); all null when the layer was not checked."""
    if found is None:
        return dict.fromkeys(ROW_KEYS)
    return {
        "intruder_count": found.count, "intruder_indices": list(found.indices),
        "intruder_sigma": [found.sigma[i] for i in found.indices],
        "intruder_cos": list(found.cos), "intruder_cos_upper": list(found.cos_upper),
        "intruder_energy": found.energy, "intruder_energy_fraction": found.energy_fraction,
        "intruder_decided_by": found.decided_by,
    }
