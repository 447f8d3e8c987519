"""UDR / SDI of each audited layer: resolve the base, map names, read only the needed tensors, summarize."""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gradience import stats
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import UDR_FRACTION_LEVELS, UDR_SDI_EPS, UDR_SIGMA_RTOL, UDR_STREAM_MIN_BYTES
from gradience.udr import SUMMARY_KEYS, UdrInput, UdrReport
from gradience.udr.base import BaseWeights
from gradience.udr.cache import CachedNorms, NormsCache
from gradience.udr.init_scale import random_init_issue
from gradience.udr.layout import stored_transposed, weight_fits
from gradience.udr.matching import LayerPlan, list_modules, match_layers, plan_issues
from gradience.udr.resolve import ResolvedBase, resolve_base, resolve_hint
from gradience.udr.spectral import DoraEffective
from gradience.udr.tensor_norms import MAX_WORKERS, _compute_tensor, _select_device, _TensorOutcome, _workers

# weight_fits / stored_transposed (verify, intruders) and MAX_WORKERS keep their old import path.
__all__ = ["MAX_WORKERS", "measure_udr", "stored_transposed", "summarize", "weight_fits"]

_EMPTY_ROW: dict[str, float | None] = {
    "base_sigma_max": None, "base_frob_norm": None, "udr": None, "udr_f": None, "sdi": None,
    "dora_eff_sigma_max": None, "dora_eff_frob_norm": None,
}


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
    """No base to measure against: an empty report that carries the one issue saying why."""
    return UdrReport(requested=False, base_model=None, per_layer={}, summary={k: None for k in SUMMARY_KEYS},
                     issues=[issue], stats={})


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


class _Todo(NamedTuple):
    """One base tensor to read: its norms are not cached, or a DoRA layer needs it for its effective update."""

    tensor: str
    file_fp: tuple[str, int, int] | None  # (file, size, mtime_ns) the cache entry is tied to; None if unknown
    need_norms: bool                      # False: norms came from the cache, only the DoRA layers need the read


@dataclass
class _Computed:
    """What the base reads produced besides the norms themselves: DoRA effects, failures, counts and times."""

    n_workers: int
    unreadable: list[Issue] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)  # Lanczos iterations of each σ₁ computed (cache misses)
    t_read: float = 0.0
    t_sigma: float = 0.0
    non_finite: list[str] = field(default_factory=list)     # layers whose base holds NaN/Inf
    not_converged: list[str] = field(default_factory=list)  # tensors whose σ₁ missed UDR_SIGMA_RTOL
    dora_eff: dict[str, DoraEffective] = field(default_factory=dict)
    dora_failed: dict[str, str] = field(default_factory=dict)  # layer -> why its effective update is missing
    streamed: list[str] = field(default_factory=list)

    def add(self, item: _Todo, outcome: _TensorOutcome, inputs: list[UdrInput], dtype: str,
            cache: NormsCache | None, norms_by_tensor: dict[str, CachedNorms]) -> None:
        """Record one tensor's outcome; only finite, converged norms enter the cache, so a rerun recomputes the rest."""
        self.t_read += outcome.t_read
        self.t_sigma += outcome.t_sigma
        if outcome.streamed:
            self.streamed.append(item.tensor)
        for name, found in outcome.dora.items():
            if isinstance(found, str):
                self.dora_failed[name] = found
            else:
                self.dora_eff[name] = found
        norms = outcome.norms
        if norms is None:
            return
        self.iterations.append(norms.iterations)
        if not math.isfinite(norms.sigma_max):
            self.non_finite.extend(i.name for i in inputs)
        elif norms.rtol > UDR_SIGMA_RTOL:
            self.not_converged.append(item.tensor)
        elif cache is not None:
            cache.put(item.tensor, dtype, item.file_fp, norms)
        norms_by_tensor[item.tensor] = norms


def _measure(layers: list[UdrInput], resolved: ResolvedBase, *, cache_path: str | None, use_cache: bool,
             progress: bool, device: str, workers: int | None, t_start: float,
             stream_min_bytes: int = UDR_STREAM_MIN_BYTES) -> UdrReport:
    """The measurement in its steps; each step adds its issues in the order the report lists them."""
    issues: list[Issue] = []
    device, device_issue = _select_device(device)
    if device_issue is not None:
        issues.append(device_issue)
    weights = BaseWeights(resolved)
    t_resolved = time.perf_counter()
    issues.extend(_shard_issues(weights))

    per_layer: dict[str, dict[str, float | None]] = {inp.name: dict(_EMPTY_ROW) for inp in layers}
    plan = match_layers(layers, weights)
    issues.extend(plan_issues(plan, resolved))

    cache = NormsCache.load(cache_path, resolved.identity) if use_cache else None
    if cache is not None:
        issues.extend(cache.issues)
    norms_by_tensor, todo = _cached_norms(plan.by_tensor, weights, cache)
    computed = _compute_norms(todo, plan.by_tensor, weights, cache, norms_by_tensor, device=device,
                              workers=workers, progress=progress, stream_min_bytes=stream_min_bytes)
    issues.extend(computed.unreadable)

    zero_base, bases_seen = _fill_rows(per_layer, plan.by_tensor, norms_by_tensor, computed.dora_eff)
    issues.extend(_result_issues(computed, zero_base, bases_seen))
    if cache is not None:
        issues.extend(_save_cache(cache))

    summary = summarize(per_layer)
    if summary["n_layers_with_udr"] == 0 and layers:
        issues.append(Issue("udr_unavailable", "a base model was given but no layer could be matched to a usable "
                            "base weight; see the issues above", "warning"))
    t_end = time.perf_counter()
    run_stats = _run_stats(layers, resolved, plan, weights, cache, computed, device=device,
                           times=(t_start, t_resolved, t_end))
    return UdrReport(requested=True, base_model=resolved.display, per_layer=per_layer, summary=summary,
                     issues=issues, stats=run_stats)


def _shard_issues(weights: BaseWeights) -> list[Issue]:
    """A warning per unusable checkpoint file, so that the layers it holds are not silently missing."""
    return [Issue("base_shard_unreadable", f"base checkpoint file unusable: {problem}", "warning",
                  extra={"file": fname}) for fname, problem in sorted(weights.file_problems.items())]


def _cached_norms(plan: dict[str, list[UdrInput]], weights: BaseWeights,
                  cache: NormsCache | None) -> tuple[dict[str, CachedNorms], list[_Todo]]:
    """Norms the cache already holds, and the tensors still to read, in file/offset order for sequential reads."""
    order = sorted(plan, key=lambda t: (weights.tensors[t].file, weights.tensors[t].offset))
    norms_by_tensor: dict[str, CachedNorms] = {}
    todo: list[_Todo] = []
    for tname in order:
        info = weights.tensors[tname]
        fp = weights.fingerprint(info.file)
        file_fp = None if fp is None else (info.file, fp[0], fp[1])
        hit = cache.get(tname, info.dtype, file_fp, UDR_SIGMA_RTOL) if cache is not None else None
        if hit is not None:
            norms_by_tensor[tname] = hit
        if hit is None or any(inp.dora for inp in plan[tname]):
            todo.append(_Todo(tname, file_fp, hit is None))
    return norms_by_tensor, todo


def _compute_norms(todo: list[_Todo], plan: dict[str, list[UdrInput]], weights: BaseWeights,
                   cache: NormsCache | None, norms_by_tensor: dict[str, CachedNorms], *, device: str,
                   workers: int | None, progress: bool, stream_min_bytes: int) -> _Computed:
    """Read the needed tensors in parallel (the slow part); an unreadable one costs its layers, not the run."""
    bar = _Progress(len(todo), progress)

    def work(item: _Todo) -> _TensorOutcome | InputError:
        try:
            return _compute_tensor(weights, weights.tensors[item.tensor], device, item.need_norms,
                                   [inp for inp in plan[item.tensor] if inp.dora], stream_min_bytes)
        except InputError as exc:
            return exc

    # numpy releases the GIL inside BLAS, so threads (one single-threaded BLAS each) run the σ₁ products of
    # different tensors in parallel; a multi-threaded BLAS on each product is far slower on a busy machine.
    computed = _Computed(n_workers=_workers(len(todo), workers))
    try:
        with ThreadPoolExecutor(max_workers=computed.n_workers) as pool:
            for item, outcome in zip(todo, pool.map(work, todo), strict=True):
                bar.step(item.tensor)
                if isinstance(outcome, InputError):
                    computed.unreadable.append(Issue("base_shard_unreadable", str(outcome), "warning",
                                                     modules=[i.name for i in plan[item.tensor]]))
                    norms_by_tensor.pop(item.tensor, None)
                    continue
                computed.add(item, outcome, plan[item.tensor], weights.tensors[item.tensor].dtype, cache,
                             norms_by_tensor)
    finally:
        bar.close()
    return computed


def _fill_rows(per_layer: dict[str, dict[str, float | None]], plan: dict[str, list[UdrInput]],
               norms_by_tensor: dict[str, CachedNorms], dora_eff: dict[str, DoraEffective],
               ) -> tuple[list[str], list[tuple[str, float, float, int, int]]]:
    """Each layer's base norms and ratios; returns the layers on an all-zero base and the bases seen."""
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
            _fill_ratios(row, inp, base, dora_eff)
    return zero_base, bases_seen


def _fill_ratios(row: dict[str, float | None], inp: UdrInput, base: CachedNorms,
                 dora_eff: dict[str, DoraEffective]) -> None:
    """UDR, UDR_F and SDI of one layer against its (non-zero) base norms."""
    if inp.dora:
        # DoRA: the weight change is the effective update, never the directional s·B·A alone.
        eff = dora_eff.get(inp.name)
        if eff is None:
            return
        row["dora_eff_sigma_max"] = eff.sigma_max
        row["dora_eff_frob_norm"] = eff.frob_norm
        row["udr"] = _ratio(eff.sigma_max, base.sigma_max)
        row["udr_f"] = _ratio(eff.frob_norm, base.frob_norm)
    else:
        row["udr"] = _ratio(inp.delta_sigma_max, base.sigma_max)
        row["udr_f"] = _ratio(inp.delta_frob_norm, base.frob_norm)
    udr = row["udr"]
    row["sdi"] = None if udr is None else math.log10(udr + UDR_SDI_EPS)


def _result_issues(computed: _Computed, zero_base: list[str],
                   bases_seen: list[tuple[str, float, float, int, int]]) -> list[Issue]:
    """Why some matched layers still have no (or only an approximate) UDR, and whether the base looks untrained."""
    issues: list[Issue] = []
    dora_failed = computed.dora_failed
    if dora_failed:
        failed = list(dora_failed)
        issues.append(Issue("dora_effective_unavailable",
                            f"the DoRA effective update could not be computed for {list_modules(failed)} "
                            f"({dora_failed[failed[0]]}); their UDR is null", "warning", modules=failed,
                            extra={"reasons": dict(dora_failed)}))
    if computed.non_finite:
        issues.append(Issue("base_non_finite_weights",
                            f"base weights contain NaN/Inf; UDR is null for: {list_modules(computed.non_finite)}",
                            "warning", modules=computed.non_finite))
    if zero_base:
        issues.append(Issue("base_weight_zero",
                            f"base weight is all zeros; UDR undefined for: {list_modules(zero_base)}",
                            "warning", modules=zero_base))
    random_init = random_init_issue(bases_seen)
    if random_init is not None:
        issues.append(random_init)
    not_converged = computed.not_converged
    if not_converged:
        issues.append(Issue("base_sigma_not_converged",
                            f"σ₁ of {len(not_converged)} base tensor(s) did not reach relative accuracy "
                            f"{UDR_SIGMA_RTOL:g} (e.g. {not_converged[0]}); their UDR is approximate", "info"))
    return issues


def _save_cache(cache: NormsCache) -> list[Issue]:
    """Write the norms cache back; say so when its entries are stale or it cannot be written."""
    issues: list[Issue] = []
    stale = cache.stale_issue()
    if stale is not None:
        issues.append(stale)
    unwritable = cache.save()
    if unwritable is not None:
        issues.append(unwritable)
    return issues


def _run_stats(layers: list[UdrInput], resolved: ResolvedBase, plan: LayerPlan, weights: BaseWeights,
               cache: NormsCache | None, computed: _Computed, *, device: str,
               times: tuple[float, float, float]) -> dict[str, Any]:
    """The report's ``stats``: what was read, cached and computed, and where the time went (start/resolved/end)."""
    t_start, t_resolved, t_end = times
    iterations = computed.iterations
    return {
        "base_identity": resolved.identity,
        "base_format": resolved.fmt,
        "base_files": len(resolved.files),
        "device": device,
        "workers": computed.n_workers,
        "layers": len(layers),
        "tensors_needed": len(plan.by_tensor),
        "tensors_read": weights.tensors_read,
        "bytes_read": weights.bytes_read,
        "cache_path": None if cache is None else str(cache.path),
        "cache_hits": 0 if cache is None else cache.hits,
        "cache_misses": len(iterations),
        "sigma_rtol": UDR_SIGMA_RTOL,
        "max_iterations": max(iterations, default=0),
        "mean_iterations": (sum(iterations) / len(iterations)) if iterations else 0.0,
        "name_matches": plan.renamed,
        "dora_layers": sum(inp.dora for inp in layers),
        "dora_effective": len(computed.dora_eff),
        "streamed_tensors": computed.streamed,
        "time_resolve_s": t_resolved - t_start,
        "time_read_s": computed.t_read,
        "time_sigma_s": computed.t_sigma,
        "time_total_s": t_end - t_start,
    }


def _ratio(num: float | None, den: float) -> float | None:
    """|num| / den, or None when either side is missing, non-finite or the base norm is not positive."""
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
