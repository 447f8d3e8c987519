"""UDR / SDI of each audited layer: resolve the base, map names, read only the needed tensors, summarize."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gradience import stats
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import UDR_FRACTION_LEVELS, UDR_SDI_EPS, UDR_SIGMA_RTOL, UDR_STREAM_MIN_BYTES
from gradience.udr import SUMMARY_KEYS, UdrInput, UdrReport
from gradience.udr.base import BaseWeights
from gradience.udr.cache import CachedNorms, NormsCache
from gradience.udr.init_scale import random_init_issue
from gradience.udr.layout import _fits, stored_transposed, weight_fits
from gradience.udr.names import BaseNameIndex
from gradience.udr.resolve import ResolvedBase, resolve_base, resolve_hint
from gradience.udr.spectral import DoraEffective
from gradience.udr.tensor_norms import MAX_WORKERS, _compute_tensor, _select_device, _TensorOutcome, _workers

# weight_fits / stored_transposed (verify, intruders) and MAX_WORKERS keep their old import path.
__all__ = ["MAX_WORKERS", "measure_udr", "stored_transposed", "summarize", "weight_fits"]

_EMPTY_ROW: dict[str, float | None] = {
    "base_sigma_max": None, "base_frob_norm": None, "udr": None, "udr_f": None, "sdi": None,
    "dora_eff_sigma_max": None, "dora_eff_frob_norm": None,
}
_LIST_LIMIT = 5  # modules named in an issue message (all of them are in Issue.modules)


def measure_udr(
    layers: list[UdrInput],
    base_model: str | None,
    *,
    adapter_base_hint: str | None = None,
    cache_path: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    device: str | None = None,
    workers: int | None = None,
    stream_min_bytes: int | None = None,
) -> UdrReport:
    """UDR/SDI per layer and summary. An explicit ``base_model`` that cannot be resolved raises InputError;
    an unresolvable ``adapter_base_hint`` only yields an info issue and ``requested=False``.

    ``device``: "cpu" (default) or "cuda" (needs torch with CUDA); ``GRADIENCE_UDR_DEVICE`` sets the default.
    ``workers``: tensors processed in parallel (default: the CPU count, capped; ``GRADIENCE_UDR_WORKERS``).
    ``stream_min_bytes``: non-float32 tensors whose float32 copy would be larger are streamed block by block
    (default ``UDR_STREAM_MIN_BYTES``). DoRA inputs get their UDR from the effective update (``dora_eff_*``).
    """
    t_start = time.perf_counter()
    if base_model:
        resolved = resolve_base(base_model, allow_download=True)
    else:
        found = resolve_hint(adapter_base_hint)
        if isinstance(found, Issue):
            return _not_requested(found)
        resolved = found
    return _measure(layers, resolved, cache_path=cache_path, use_cache=use_cache, progress=progress,
                    device=device or os.environ.get("GRADIENCE_UDR_DEVICE") or "cpu", workers=workers,
                    t_start=t_start,
                    stream_min_bytes=UDR_STREAM_MIN_BYTES if stream_min_bytes is None else stream_min_bytes)


def _not_requested(issue: Issue) -> UdrReport:
    return UdrReport(requested=False, base_model=None, per_layer={}, summary={k: None for k in SUMMARY_KEYS},
                     issues=[issue], stats={})


def _names(modules: list[str]) -> str:
    shown = ", ".join(modules[:_LIST_LIMIT])
    return shown + (f" (+{len(modules) - _LIST_LIMIT} more)" if len(modules) > _LIST_LIMIT else "")


class _Progress:
    """A dependency-free ``\\r`` progress bar on stderr, drawn only when enabled and stderr is a TTY."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0 and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\rUDR: base norms [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {label[-40:]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _measure(layers: list[UdrInput], resolved: ResolvedBase, *, cache_path: str | None, use_cache: bool,
             progress: bool, device: str, workers: int | None, t_start: float,
             stream_min_bytes: int = UDR_STREAM_MIN_BYTES) -> UdrReport:
    issues: list[Issue] = []
    device, device_issue = _select_device(device)
    if device_issue is not None:
        issues.append(device_issue)
    weights = BaseWeights(resolved)
    t_resolved = time.perf_counter()
    for fname, problem in sorted(weights.file_problems.items()):
        issues.append(Issue("base_shard_unreadable", f"base checkpoint file unusable: {problem}", "warning",
                            extra={"file": fname}))

    index = BaseNameIndex(weights.tensors)
    per_layer: dict[str, dict[str, float | None]] = {}
    plan: dict[str, list[UdrInput]] = defaultdict(list)
    problems: dict[str, list[str]] = defaultdict(list)
    ambiguous: dict[str, list[str]] = {}
    renamed: dict[str, str] = {}
    shape_details: dict[str, str] = {}
    for inp in layers:
        per_layer[inp.name] = dict(_EMPTY_ROW)
        match = index.match(inp.name)
        if match.tensor is None:
            problems["base_tensor_" + match.how].append(inp.name)
            if match.how == "ambiguous":
                ambiguous[inp.name] = list(match.candidates)
            continue
        info = weights.tensors[match.tensor]
        if info.file in weights.file_problems:
            problems["base_shard_unreadable"].append(inp.name)
        elif not info.is_float:
            problems["base_dtype_unsupported"].append(inp.name)
        elif not _fits(inp.kind, info.shape, inp.d_out, inp.d_in):
            problems["base_shape_mismatch"].append(inp.name)
            shape_details[inp.name] = f"{match.tensor} {list(info.shape)} vs ΔW {[inp.d_out, inp.d_in]}"
        else:
            plan[match.tensor].append(inp)
            if match.how != "exact":
                renamed[inp.name] = match.tensor
    issues.extend(_problem_issues(problems, ambiguous, shape_details, resolved))

    cache = NormsCache.load(cache_path, resolved.identity) if use_cache else None
    if cache is not None:
        issues.extend(cache.issues)
    order = sorted(plan, key=lambda t: (weights.tensors[t].file, weights.tensors[t].offset))
    norms_by_tensor: dict[str, CachedNorms] = {}
    # A tensor is read when its norms are not cached, or when a DoRA layer needs it for its effective update.
    todo: list[tuple[str, tuple[str, int, int] | None, bool]] = []
    for tname in order:
        info = weights.tensors[tname]
        fp = weights.fingerprint(info.file)
        file_fp = None if fp is None else (info.file, fp[0], fp[1])
        hit = cache.get(tname, info.dtype, file_fp, UDR_SIGMA_RTOL) if cache is not None else None
        if hit is not None:
            norms_by_tensor[tname] = hit
        if hit is None or any(inp.dora for inp in plan[tname]):
            todo.append((tname, file_fp, hit is None))

    bar = _Progress(len(todo), progress)
    iterations: list[int] = []
    t_read = t_sigma = 0.0
    non_finite: list[str] = []
    not_converged: list[str] = []
    dora_eff: dict[str, DoraEffective] = {}
    dora_failed: dict[str, str] = {}
    streamed: list[str] = []

    def work(item: tuple[str, tuple[str, int, int] | None, bool]) -> _TensorOutcome | InputError:
        tname, _fp, need_base = item
        try:
            return _compute_tensor(weights, weights.tensors[tname], device, need_base,
                                   [inp for inp in plan[tname] if inp.dora], stream_min_bytes)
        except InputError as exc:
            return exc

    # numpy releases the GIL inside BLAS, so threads (one single-threaded BLAS each) run the σ₁ products of
    # different tensors in parallel; a multi-threaded BLAS on each product is far slower on a busy machine.
    n_workers = _workers(len(todo), workers)
    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for (tname, file_fp, _need), outcome in zip(todo, pool.map(work, todo), strict=True):
                bar.step(tname)
                if isinstance(outcome, InputError):
                    issues.append(Issue("base_shard_unreadable", str(outcome), "warning",
                                        modules=[i.name for i in plan[tname]]))
                    norms_by_tensor.pop(tname, None)
                    continue
                t_read += outcome.t_read
                t_sigma += outcome.t_sigma
                if outcome.streamed:
                    streamed.append(tname)
                for name, found in outcome.dora.items():
                    if isinstance(found, str):
                        dora_failed[name] = found
                    else:
                        dora_eff[name] = found
                norms = outcome.norms
                if norms is None:
                    continue
                iterations.append(norms.iterations)
                if not math.isfinite(norms.sigma_max):
                    non_finite.extend(i.name for i in plan[tname])
                elif norms.rtol > UDR_SIGMA_RTOL:
                    not_converged.append(tname)
                elif cache is not None:
                    cache.put(tname, weights.tensors[tname].dtype, file_fp, norms)
                norms_by_tensor[tname] = norms
    finally:
        bar.close()

    zero_base: list[str] = []
    bases_seen: list[tuple[str, float, float, int, int]] = []  # for the random-init check (udr/init_scale.py)
    for tname, inputs in plan.items():
        base = norms_by_tensor.get(tname)
        if base is None or not math.isfinite(base.sigma_max):
            continue
        for inp in inputs:
            row = per_layer[inp.name]
            row["base_sigma_max"] = base.sigma_max
            row["base_frob_norm"] = base.frob_norm
            bases_seen.append((inp.name, base.sigma_max, base.frob_norm, inp.d_out, inp.d_in))
            if base.sigma_max <= 0.0:
                zero_base.append(inp.name)
                continue
            if inp.dora:
                # DoRA: the weight change is the effective update, never the directional s·B·A alone.
                eff = dora_eff.get(inp.name)
                if eff is None:
                    continue
                row["dora_eff_sigma_max"] = eff.sigma_max
                row["dora_eff_frob_norm"] = eff.frob_norm
                row["udr"] = _ratio(eff.sigma_max, base.sigma_max)
                row["udr_f"] = _ratio(eff.frob_norm, base.frob_norm)
            else:
                row["udr"] = _ratio(inp.delta_sigma_max, base.sigma_max)
                row["udr_f"] = _ratio(inp.delta_frob_norm, base.frob_norm)
            udr = row["udr"]
            row["sdi"] = None if udr is None else math.log10(udr + UDR_SDI_EPS)

    if dora_failed:
        failed = list(dora_failed)
        issues.append(Issue("dora_effective_unavailable",
                            f"the DoRA effective update could not be computed for {_names(failed)} "
                            f"({dora_failed[failed[0]]}); their UDR is null", "warning", modules=failed,
                            extra={"reasons": dict(dora_failed)}))
    if non_finite:
        issues.append(Issue("base_non_finite_weights",
                            f"base weights contain NaN/Inf; UDR is null for: {_names(non_finite)}", "warning",
                            modules=non_finite))
    if zero_base:
        issues.append(Issue("base_weight_zero", f"base weight is all zeros; UDR undefined for: {_names(zero_base)}",
                            "warning", modules=zero_base))
    random_init = random_init_issue(bases_seen)
    if random_init is not None:
        issues.append(random_init)
    if not_converged:
        issues.append(Issue("base_sigma_not_converged",
                            f"σ₁ of {len(not_converged)} base tensor(s) did not reach relative accuracy "
                            f"{UDR_SIGMA_RTOL:g} (e.g. {not_converged[0]}); their UDR is approximate", "info"))
    if cache is not None:
        stale = cache.stale_issue()
        if stale is not None:
            issues.append(stale)
        unwritable = cache.save()
        if unwritable is not None:
            issues.append(unwritable)

    summary = summarize(per_layer)
    if summary["n_layers_with_udr"] == 0 and layers:
        issues.append(Issue("udr_unavailable", "a base model was given but no layer could be matched to a usable "
                            "base weight; see the issues above", "warning"))
    t_end = time.perf_counter()
    run_stats: dict[str, Any] = {
        "base_identity": resolved.identity,
        "base_format": resolved.fmt,
        "base_files": len(resolved.files),
        "device": device,
        "workers": n_workers,
        "layers": len(layers),
        "tensors_needed": len(plan),
        "tensors_read": weights.tensors_read,
        "bytes_read": weights.bytes_read,
        "cache_path": None if cache is None else str(cache.path),
        "cache_hits": 0 if cache is None else cache.hits,
        "cache_misses": len(iterations),
        "sigma_rtol": UDR_SIGMA_RTOL,
        "max_iterations": max(iterations, default=0),
        "mean_iterations": (sum(iterations) / len(iterations)) if iterations else 0.0,
        "name_matches": renamed,
        "dora_layers": sum(inp.dora for inp in layers),
        "dora_effective": len(dora_eff),
        "streamed_tensors": streamed,
        "time_resolve_s": t_resolved - t_start,
        "time_read_s": t_read,
        "time_sigma_s": t_sigma,
        "time_total_s": t_end - t_start,
    }
    return UdrReport(requested=True, base_model=resolved.display, per_layer=per_layer, summary=summary,
                     issues=issues, stats=run_stats)


def _ratio(num: float | None, den: float) -> float | None:
    if num is None or not math.isfinite(num) or den <= 0.0 or not math.isfinite(den):
        return None
    return abs(num) / den


def summarize(per_layer: dict[str, dict[str, float | None]]) -> dict[str, float | int | None]:
    """The SPEC §4 summary keys over the layers that have a UDR (fractions use a strict ``>``)."""
    udrs = [r["udr"] for r in per_layer.values() if r.get("udr") is not None]
    values = [float(u) for u in udrs if u is not None]
    sdis = [r["sdi"] for r in per_layer.values() if r.get("udr") is not None]
    n = len(values)
    low, high = UDR_FRACTION_LEVELS
    return {
        "udr_mean": stats.mean(values),
        "udr_median": stats.median(values),
        "udr_p90": stats.percentile(values, 90.0),
        "udr_max": max(values) if values else None,
        "fraction_udr_gt_0_1": (sum(u > low for u in values) / n) if n else None,
        "fraction_udr_gt_0_3": (sum(u > high for u in values) / n) if n else None,
        "sdi_mean": stats.mean(sdis),
        "sdi_median": stats.median(sdis),
        "sdi_p90": stats.percentile(sdis, 90.0),
        "n_layers_with_udr": n,
    }


def _problem_issues(problems: dict[str, list[str]], ambiguous: dict[str, list[str]], details: dict[str, str],
                    resolved: ResolvedBase) -> list[Issue]:
    out: list[Issue] = []
    where = resolved.display
    for code, modules in problems.items():
        if code == "base_tensor_missing":
            msg = f"no base weight found in {where} for: {_names(modules)}"
            extra: dict[str, Any] = {}
        elif code == "base_tensor_ambiguous":
            first = modules[0]
            msg = (f"several base weights in {where} match {first} ({', '.join(ambiguous[first][:3])}"
                   f"{' ...' if len(ambiguous[first]) > 3 else ''}); UDR skipped for: {_names(modules)}")
            extra = {"candidates": {m: ambiguous[m] for m in modules}}
        elif code == "base_shape_mismatch":
            msg = f"base weight shape differs from the update's: {details[modules[0]]}; UDR skipped for: " \
                  f"{_names(modules)}"
            extra = {"shapes": {m: details[m] for m in modules}}
        elif code == "base_dtype_unsupported":
            msg = f"base weight is not a floating-point tensor (quantized?); UDR skipped for: {_names(modules)}"
            extra = {}
        else:  # base_shard_unreadable
            msg = f"base weight lives in an unusable checkpoint file; UDR skipped for: {_names(modules)}"
            extra = {}
        out.append(Issue(code, msg, "warning", modules=list(modules), extra=extra))
    return out
