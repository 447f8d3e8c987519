"""``compare(A, B, options) -> dict``: two adapters side by side, down to their update subspaces (SPEC §13).

Flow: each side is audited (an adapter directory) or read (an audit JSON) into an audit summary; modules are
matched by base-model name; per matched module the side metrics and their deltas are taken from the audit
rows, and, when both sides have factors, the cosine of the updates and the overlaps of their top-k singular
subspaces come from :mod:`gradience.compare.subspace`. The result is the ``gradience.compare/v1`` document;
renderers and gates read only that document.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from gradience import stats
from gradience.adapter.model import LoraPair
from gradience.compare.matching import Matching, match_modules
from gradience.compare.sides import Side, load_side, side_labels
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.modules import classify_module, layer_index
from gradience.policy.thresholds import COMPARE_MAX_WORKERS, COMPARE_TOP_DEFAULT, UDR_FRACTION_LEVELS
from gradience.textfmt import finite

SCHEMA = "gradience.compare/v1"
SortKey = Literal["udr", "cos", "overlap", "name"]
SORT_KEYS: tuple[str, ...] = ("udr", "cos", "overlap", "name")
# Each side's per-module values (SPEC §13), in output order; ``delta`` = B − A of each.
SIDE_KEYS: tuple[str, ...] = ("r", "scale", "utilization", "stable_rank", "energy_rank_90", "delta_sigma_max",
                              "delta_frob_norm", "udr")
# Each side's summary values, and the summary ``<key>_delta`` = B − A.
SIDE_SUMMARY_KEYS: tuple[str, ...] = ("udr_median", "fraction_udr_gt_0_3", "utilization_mean")
CROSS_KEYS: tuple[str, ...] = ("cos", "overlap_left", "overlap_right")
_LIST_LIMIT = 5


@dataclass
class CompareOptions:
    base_model: str | None = None
    base_norms_cache: str | None = None
    k: int | None = None                   # fixed k for the overlaps; None: min(energy_rank_90 of A, of B)
    sort: SortKey | None = None            # None: udr when both sides have UDR, else cos, else name
    top: int = COMPARE_TOP_DEFAULT
    progress: bool = False


def _names(modules: Sequence[str]) -> str:
    shown = ", ".join(modules[:_LIST_LIMIT])
    return shown + (f" (+{len(modules) - _LIST_LIMIT} more)" if len(modules) > _LIST_LIMIT else "")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _delta(a: Any, b: Any) -> float | int | None:
    if _is_int(a) and _is_int(b):
        return int(b) - int(a)
    fa, fb = finite(a), finite(b)
    return None if fa is None or fb is None else fb - fa


def _side_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's SPEC §13 values; integers (r, energy_rank_90) stay integers, non-numbers become null."""
    return {key: row.get(key) if _is_int(row.get(key)) else finite(row.get(key)) for key in SIDE_KEYS}


def _side_block(side: Side) -> dict[str, Any]:
    cfg = side.adapter_block
    r = cfg.get("r")
    return {
        "path": side.path,
        "label": side.label,
        "kind": side.kind,
        "base_model_name_or_path": side.base_model_name_or_path,
        "r": r if isinstance(r, int) else None,
        "alpha": finite(cfg.get("lora_alpha")),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "targets": cfg.get("target_modules"),
        "n_layers": len(side.rows),
        "udr_base_model": side.summary.get("udr_base_model"),
    }


def _side_summary(side: Side) -> dict[str, Any]:
    s = side.summary
    out: dict[str, Any] = {key: finite(s.get(key)) for key in SIDE_SUMMARY_KEYS}
    out["n_layers_with_udr"] = s.get("n_layers_with_udr") if isinstance(s.get("n_layers_with_udr"), int) else None
    return out


class _CrossState:
    """Which modules had no (or reduced) cross metrics and why: one issue per reason."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {"zero": [], "non_finite": [], "shape": [], "k_clamped": [],
                                                "dora": []}

    def add(self, name: str, reasons: Sequence[str]) -> None:
        for reason in reasons:
            self.by_reason[reason].append(name)


_NO_CROSS: dict[str, Any] = {"cos": None, "overlap_left": None, "overlap_right": None, "k": None}


def _cross(pa: LoraPair, pb: LoraPair, row_a: Mapping[str, Any], row_b: Mapping[str, Any],
           k_fixed: int | None) -> tuple[dict[str, Any], list[str]]:
    """Cross metrics of one matched module and the reasons (for issues) when some are null or reduced."""
    from gradience.compare.subspace import compare_factors

    if (pa.d_out, pa.d_in) != (pb.d_out, pb.d_in):
        return dict(_NO_CROSS), ["shape"]
    if row_a.get("status") == "non_finite" or row_b.get("status") == "non_finite":
        return dict(_NO_CROSS), ["non_finite"]
    reasons = ["dora"] if pa.dora or pb.dora else []
    a_a, b_a = pa.load_factors()
    a_b, b_b = pb.load_factors()
    try:
        pc = compare_factors(a_a, b_a, pa.scale, a_b, b_b, pb.scale)
    except ValueError:
        return dict(_NO_CROSS), [*reasons, "non_finite"]
    if pc.cos is None or pc.svd_a is None or pc.svd_b is None:
        return {**_NO_CROSS, "cos": pc.cos}, [*reasons, "zero"]
    if k_fixed is not None:
        k_wanted = k_fixed
    else:
        ka, kb = row_a.get("energy_rank_90"), row_b.get("energy_rank_90")
        k_wanted = max(1, min(ka if isinstance(ka, int) else pa.r, kb if isinstance(kb, int) else pb.r))
    k = max(1, min(k_wanted, pc.numerical_rank("a"), pc.numerical_rank("b")))
    if k < k_wanted:
        reasons.append("k_clamped")
    left, right = pc.overlaps(k)
    return {"cos": pc.cos, "overlap_left": left, "overlap_right": right, "k": k}, reasons


def _workers(n_tasks: int) -> int:
    """Modules compared in parallel: numpy releases the GIL in its copies and BLAS calls, so threads (each
    with single-threaded BLAS) overlap; ``GRADIENCE_COMPARE_WORKERS`` overrides (1 = serial)."""
    env = os.environ.get("GRADIENCE_COMPARE_WORKERS", "")
    n = int(env) if env.isdigit() and int(env) > 0 else min(os.cpu_count() or 1, COMPARE_MAX_WORKERS)
    return max(1, min(n, n_tasks))


def _cross_all(side_a: Side, side_b: Side, pairs: Sequence[tuple[str, str]], rows_a: Mapping[str, Any],
               rows_b: Mapping[str, Any], k_fixed: int | None) -> list[tuple[dict[str, Any], list[str]]]:
    from gradience.audit.core import _single_threaded_blas

    def one(names: tuple[str, str]) -> tuple[dict[str, Any], list[str]]:
        na, nb = names
        return _cross(side_a.pairs[na], side_b.pairs[nb], rows_a[na], rows_b[nb], k_fixed)

    workers = _workers(len(pairs))
    with _single_threaded_blas():
        if workers == 1:
            return [one(p) for p in pairs]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, pairs))


def _sort_value(module: Mapping[str, Any], key: str) -> tuple[Any, ...]:
    """Sort order: largest |Δudr| first; lowest cos / overlap first (most different); missing values last."""
    name = module["name"]
    if key == "udr":
        d = module["delta"]["udr"]
        return (d is None, -abs(d) if d is not None else 0.0, name)
    if key == "cos":
        c = module["cos"]
        return (c is None, c if c is not None else 0.0, name)
    if key == "overlap":
        ol, orr = module["overlap_left"], module["overlap_right"]
        v = None if ol is None or orr is None else 0.5 * (ol + orr)
        return (v is None, v if v is not None else 0.0, name)
    return (False, 0.0, name)


def _issues_of(side: Side, tag: str) -> list[dict[str, Any]]:
    out = []
    for issue in side.summary.get("issues") or []:
        if isinstance(issue, dict):
            item = dict(issue)
            item["message"] = f"{tag}: {item.get('message', '')}"
            item["side"] = tag[0].lower()
            out.append(item)
    return out


def compare_sides(side_a: Side, side_b: Side, options: CompareOptions,
                  extra_issues: Sequence[Issue] = ()) -> dict[str, Any]:
    """The ``gradience.compare/v1`` document of two loaded sides."""
    if options.k is not None and options.k < 1:
        raise InputError(f"--k must be >= 1, got {options.k}")
    if options.sort is not None and options.sort not in SORT_KEYS:
        raise InputError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {options.sort!r}")
    rows_a = {row["name"]: row for row in side_a.rows}
    rows_b = {row["name"]: row for row in side_b.rows}
    matching: Matching = match_modules(list(rows_a), list(rows_b))
    issues: list[dict[str, Any]] = [i.to_dict() for i in extra_issues]
    both_factors = side_a.kind == "adapter" and side_b.kind == "adapter"
    unavailable: dict[str, str] = {}
    if not both_factors:
        which = " and ".join(f"{tag} ({s.path})" for tag, s in (("A", side_a), ("B", side_b))
                             if s.kind == "audit_json")
        reason = (f"{which} {'is an audit JSON file' if ' and ' not in which else 'are audit JSON files'}: "
                  "the factors are needed for the update cosine and subspace overlaps; pass adapter directories")
        for key in (*CROSS_KEYS, "k"):
            unavailable[key] = reason
        issues.append({"code": "measures_unavailable", "severity": "info",
                       "message": f"cos, overlap_left, overlap_right not computed: {reason}"})

    state = _CrossState()
    crosses = (_cross_all(side_a, side_b, matching.pairs, rows_a, rows_b, options.k) if both_factors
               else [(dict(_NO_CROSS), []) for _ in matching.pairs])
    modules: list[dict[str, Any]] = []
    for (name_a, name_b), (cross, reasons) in zip(matching.pairs, crosses, strict=True):
        row_a, row_b = rows_a[name_a], rows_b[name_b]
        va, vb = _side_values(row_a), _side_values(row_b)
        module: dict[str, Any] = {
            "name": name_a,
            "name_b": name_b,
            "module_type": row_a.get("module_type") or classify_module(name_a),
            "layer": row_a.get("layer") if "layer" in row_a else layer_index(name_a),
            "a": va,
            "b": vb,
            "delta": {key: _delta(va[key], vb[key]) for key in SIDE_KEYS},
        }
        module.update(cross)
        state.add(name_a, reasons)
        modules.append(module)

    issues += _cross_issues(state, options.k)
    issues += _matching_issues(matching, side_a, side_b)
    issues += _issues_of(side_a, f"A ({side_a.label})") + _issues_of(side_b, f"B ({side_b.label})")

    have_udr = any(m["delta"]["udr"] is not None for m in modules)
    have_cos = any(m["cos"] is not None for m in modules)
    if not have_udr:
        missing = [f"{tag} ({s.label})" for tag, s in (("A", side_a), ("B", side_b))
                   if not finite(s.summary.get("n_layers_with_udr"))]
        why = (f"no base model resolved for {' and '.join(missing)}; pass --base-model DIR_OR_ID" if missing
               else "no matched module has a UDR on both sides")
        unavailable["udr"] = why
    sort = options.sort or ("udr" if have_udr else "cos" if have_cos else "name")
    if sort != "name" and options.sort is not None and not (have_udr if sort == "udr" else have_cos):
        issues.append({"code": "sort_key_unavailable", "severity": "info",
                       "message": f"--sort {sort}: {sort} is not available for any module "
                                  f"({unavailable.get('udr' if sort == 'udr' else 'cos', '-')}); "
                                  "modules are listed by name"})
        sort = "name"
    modules.sort(key=lambda m: _sort_value(m, sort))

    summary = _summary(modules, matching, side_a, side_b, options, unavailable)
    return {
        "schema": SCHEMA,
        "a": _side_block(side_a),
        "b": _side_block(side_b),
        "options": {"base_model": options.base_model, "k": options.k, "sort": sort, "top": options.top},
        "udr": {"a": _udr_stats(side_a), "b": _udr_stats(side_b)},
        "summary": summary,
        "modules": modules,
        "issues": issues,
    }


def _udr_stats(side: Side) -> dict[str, Any] | None:
    st = side.udr_stats
    if not st:
        return None
    return {key: st.get(key) for key in ("base_identity", "tensors_needed", "tensors_read", "cache_hits",
                                         "cache_misses", "cache_path")}


def _summary(modules: Sequence[Mapping[str, Any]], matching: Matching, side_a: Side, side_b: Side,
             options: CompareOptions, unavailable: Mapping[str, str]) -> dict[str, Any]:
    cos = [m["cos"] for m in modules]
    sa, sb = _side_summary(side_a), _side_summary(side_b)
    by_udr = sorted((m for m in modules if m["delta"]["udr"] is not None), key=lambda m: _sort_value(m, "udr"))
    out: dict[str, Any] = {
        "n_matched": len(modules),
        "only_in_a": list(matching.only_in_a),
        "only_in_b": list(matching.only_in_b),
        "cos_mean": stats.mean(cos),
        "cos_median": stats.median(cos),
        "overlap_left_mean": stats.mean(m["overlap_left"] for m in modules),
        "overlap_right_mean": stats.mean(m["overlap_right"] for m in modules),
        "k": options.k if options.k is not None else "min_energy_rank_90",
        "a": sa,
        "b": sb,
    }
    for key in SIDE_SUMMARY_KEYS:
        out[f"{key}_delta"] = _delta(sa[key], sb[key])
    out["biggest_udr_differences"] = [
        {"name": m["name"], "udr_a": m["a"]["udr"], "udr_b": m["b"]["udr"], "delta": m["delta"]["udr"]}
        for m in by_udr[: max(0, options.top)]]
    out["unavailable"] = dict(unavailable)
    return out


def _cross_issues(state: _CrossState, k_fixed: int | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    zero, non_finite, shape = state.by_reason["zero"], state.by_reason["non_finite"], state.by_reason["shape"]
    k_clamped, dora = state.by_reason["k_clamped"], state.by_reason["dora"]
    if zero:
        out.append({"code": "zero_update", "severity": "warning", "modules": zero,
                    "message": f"{len(zero)} matched modules have a zero update on one side (e.g. saved "
                               f"before training); cos/overlaps are null for: {_names(zero)}"})
    if non_finite:
        out.append({"code": "non_finite_weights", "severity": "error", "modules": non_finite,
                    "message": f"NaN/Inf factors; cos/overlaps are null for: {_names(non_finite)}"})
    if shape:
        out.append({"code": "shape_mismatch", "severity": "warning", "modules": shape,
                    "message": "the two updates have different shapes (different base models?); cos/overlaps "
                               f"are null for: {_names(shape)}"})
    if k_clamped:
        why = f"--k {k_fixed} exceeds" if k_fixed is not None else "min(energy_rank_90) exceeds"
        out.append({"code": "k_clamped", "severity": "info", "modules": k_clamped,
                    "message": f"{why} the number of non-zero singular directions of one side; k was lowered "
                               f"for: {_names(k_clamped)}"})
    if dora:
        out.append({"code": "dora_directional_only", "severity": "info", "modules": dora,
                    "message": "DoRA modules are compared on their directional update s·B·A (magnitude vectors "
                               f"not included): {_names(dora)}"})
    return out


def _matching_issues(matching: Matching, side_a: Side, side_b: Side) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    base_a, base_b = side_a.base_model_name_or_path, side_b.base_model_name_or_path
    if base_a and base_b and base_a != base_b:
        out.append({"code": "base_model_mismatch", "severity": "warning",
                    "message": f"the adapters name different base models (A: {base_a}, B: {base_b}); a "
                               "comparison is meaningful only when both modify the same weights",
                    "base_model_a": base_a, "base_model_b": base_b})
    if matching.only_in_a or matching.only_in_b:
        out.append({"code": "unmatched_modules", "severity": "info",
                    "message": f"{len(matching.only_in_a)} modules only in A, {len(matching.only_in_b)} only "
                               "in B (listed in summary.only_in_a / only_in_b)",
                    "modules": list(matching.only_in_a) + list(matching.only_in_b)})
    if matching.ambiguous:
        names = sorted(matching.ambiguous)
        out.append({"code": "ambiguous_match", "severity": "warning", "modules": names,
                    "message": f"several modules of B match these modules of A; left unmatched: {_names(names)}",
                    "candidates": dict(matching.ambiguous)})
    if matching.renamed:
        out.append({"code": "matched_by_suffix", "severity": "info", "modules": sorted(matching.renamed),
                    "message": f"{len(matching.renamed)} modules matched across a task-head prefix "
                               f"(e.g. {next(iter(matching.renamed))} = {next(iter(matching.renamed.values()))})"})
    if not matching.pairs:
        out.append({"code": "no_matched_modules", "severity": "warning",
                    "message": "no module of A matches a module of B; nothing to compare per module"})
    return out


def compare(path_a: str, path_b: str, options: CompareOptions | None = None) -> dict[str, Any]:
    """Compare two adapters (directories or audit JSON files); returns the ``gradience.compare/v1`` document.

    With ``options.base_model`` both sides get UDR against it through one norms cache, so the base weights
    are read once: the second side's base norms are cache hits.
    """
    options = options or CompareOptions()
    if options.k is not None and options.k < 1:
        raise InputError(f"--k must be >= 1, got {options.k}")
    cache = options.base_norms_cache  # the same file for both sides (None: the default cache file)
    side_a, issues_a = load_side(path_a, base_model=options.base_model, base_norms_cache=cache,
                                 progress=options.progress)
    side_b, issues_b = load_side(path_b, base_model=options.base_model, base_norms_cache=cache,
                                 progress=options.progress)
    side_a.label, side_b.label = side_labels(path_a, path_b)
    extra = [_tag(i, "A", side_a.label) for i in issues_a] + [_tag(i, "B", side_b.label) for i in issues_b]
    return compare_sides(side_a, side_b, options, extra)


def _tag(issue: Issue, tag: str, label: str) -> Issue:
    return Issue(issue.code, f"{tag} ({label}): {issue.message}", issue.severity, modules=issue.modules,
                 extra={**issue.extra, "side": tag.lower()})


def fraction_level() -> float:
    """The UDR level of ``fraction_udr_gt_0_3`` (for labels)."""
    return float(UDR_FRACTION_LEVELS[1])
