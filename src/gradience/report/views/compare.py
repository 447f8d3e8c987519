"""The compare view: a ``gradience.compare/v1`` document as Δ heatmaps, cos/overlap per module, top modules."""

from __future__ import annotations

from typing import Any

from gradience import stats
from gradience.policy.thresholds import UDR_FRACTION_LEVELS
from gradience.report.heatmap import ColorScale, build_heatmap, finite_values
from gradience.report.views.base import MAX_ISSUES_SHOWN, ChartIds, ModuleRows, UdrGroup, View
from gradience.report.views.base import fact as _fact
from gradience.textfmt import finite, num, pct

TOP_COMPARE_ROWS = 25


def _side(module: dict[str, Any], side: str, key: str) -> float | None:
    """A per-side value of a compare module row: nested ``{"a": {...}}`` or flat ``a_<key>`` / ``<key>_a``."""
    nested = module.get(side)
    if isinstance(nested, dict) and key in nested:
        return finite(nested.get(key))
    for k in (f"{side}_{key}", f"{key}_{side}"):
        if k in module:
            return finite(module.get(k))
    return None


def _delta(module: dict[str, Any], key: str) -> float | None:
    d = module.get("delta")
    if isinstance(d, dict) and key in d:
        return finite(d.get(key))
    if f"delta_{key}" in module:
        return finite(module.get(f"delta_{key}"))
    a, b = _side(module, "a", key), _side(module, "b", key)
    return None if a is None or b is None else b - a


def _summary_side(summary: dict[str, Any], side: str, key: str) -> Any:
    nested = summary.get(side)
    if isinstance(nested, dict) and key in nested:
        return nested.get(key)
    for k in (f"{side}_{key}", f"{key}_{side}"):
        if k in summary:
            return summary.get(k)
    return None


def compare_view(doc: dict[str, Any], ids: ChartIds) -> View:
    """A ``gradience.compare/v1`` document: summary, delta heatmaps, cos/overlap per module, top modules."""
    a, b = doc.get("a") or {}, doc.get("b") or {}
    summary = doc.get("summary") or {}
    table = ModuleRows.of(doc)
    modules, grid, col = table.rows, table.grid, table.column

    d_util = col(lambda m: _delta(m, "utilization"))
    d_udr = col(lambda m: _delta(m, "udr"))
    cos = col(lambda m: finite(m.get("cos")))
    ov_l = col(lambda m: finite(m.get("overlap_left")))
    ov_r = col(lambda m: finite(m.get("overlap_right")))
    signed = lambda v: f"{v:+.3g}"  # noqa: E731
    three = lambda v: f"{v:.3f}"  # noqa: E731
    diverging = lambda vals: ColorScale.for_data(finite_values(vals), diverging=True)  # noqa: E731
    heatmaps = [
        build_heatmap("d_util", "Δ utilization (B − A)", grid, d_util, diverging(d_util), signed, uid=ids.next(),
                      note="blue: B uses more of its rank, red: less"),
        build_heatmap("d_udr", "Δ UDR (B − A)", grid, d_udr, diverging(d_udr), signed, uid=ids.next(),
                      note="blue: B moved the base weight more, red: less" if finite_values(d_udr)
                      else "UDR needs a base model (compare --base-model)"),
        build_heatmap("cos", "cos(ΔW_A, ΔW_B)", grid, cos, diverging(cos), three, uid=ids.next(),
                      note="1: same update direction, 0: unrelated, −1: opposite"),
        build_heatmap("overlap_left", "overlap (left)", grid, ov_l, None, three, uid=ids.next(),
                      note="‖U_Aᵀ U_B‖²_F / k of the top-k output directions (1: same subspace)"),
        build_heatmap("overlap_right", "overlap (right)", grid, ov_r, None, three, uid=ids.next(),
                      note="the same for the input directions"),
    ]
    unavailable_raw = summary.get("unavailable")
    unavailable: dict[str, Any] = unavailable_raw if isinstance(unavailable_raw, dict) else {}
    for h in heatmaps:  # an empty map says why (the compare document records the reason per measure)
        if h.empty:
            reason = unavailable.get(h.key.removeprefix("d_")) or unavailable.get(h.key)
            h.note = str(reason) if reason else "not computed for any matched module"

    def order_key(m: dict[str, Any]) -> tuple[float, str]:
        d = _delta(m, "udr")
        return (-abs(d) if d is not None else 0.0, str(m["name"]))

    top = sorted(modules, key=order_key)[:TOP_COMPARE_ROWS]
    rows = [{"name": str(m["name"]),
             "util_a": pct(_side(m, "a", "utilization")), "util_b": pct(_side(m, "b", "utilization")),
             "udr_a": num(_side(m, "a", "udr"), ".3g"), "udr_b": num(_side(m, "b", "udr"), ".3g"),
             "d_udr": num(_delta(m, "udr"), "+.3g"), "cos": num(m.get("cos"), ".3f"),
             "ov_l": num(m.get("overlap_left"), ".3f"), "ov_r": num(m.get("overlap_right"), ".3f"),
             "k": m.get("k") if m.get("k") is not None else "-"} for m in top]

    def side_meta(side: dict[str, Any]) -> str:
        targets = side.get("targets")
        targets_s = ", ".join(map(str, targets)) if isinstance(targets, list) else str(targets or "-")
        return (f"{side.get('path') or '-'} · base {side.get('base_model_name_or_path') or '-'} · "
                f"r={side.get('r', '-')} · alpha={side.get('alpha', '-')} · targets {targets_s}")

    only_a, only_b = summary.get("only_in_a"), summary.get("only_in_b")
    cards = [
        _fact("Matched modules", str(summary.get("n_matched", len(modules)))),
        _fact("Only in A / B", f"{_count(only_a)} / {_count(only_b)}"),
        _fact("cos mean / median", f"{num(summary.get('cos_mean'), '.3f')} / {num(summary.get('cos_median'), '.3f')}"),
        _fact("overlap left / right", f"{num(summary.get('overlap_left_mean'), '.3f')} / "
                                      f"{num(summary.get('overlap_right_mean'), '.3f')}"),
    ]
    sides = []
    for side in ("a", "b"):
        sides.append({"side": side.upper(),
                      "udr_median": num(_summary_side(summary, side, "udr_median"), ".3g"),
                      "frac": pct(_summary_side(summary, side, "fraction_udr_gt_0_3")),
                      "util": pct(_summary_side(summary, side, "utilization_mean"))})
    udr_groups = []
    for side, label in (("a", "A"), ("b", "B")):
        vals = [v for m in modules if (v := _side(m, side, "udr")) is not None]
        udr_groups.append(UdrGroup(label, vals, {
            "udr_median": _summary_side(summary, side, "udr_median") if vals else None,
            "udr_p90": stats.percentile(vals, 90.0), "udr_max": max(vals) if vals else None,
            "fraction_udr_gt_0_3": _summary_side(summary, side, "fraction_udr_gt_0_3"),
            "fraction_udr_gt_0_1": (sum(v > UDR_FRACTION_LEVELS[0] for v in vals) / len(vals)) if vals else None,
            "n_layers_with_udr": len(vals)},
            None if vals else str(unavailable.get("udr") or "no UDR in this comparison (compare --base-model)")))
    context = {
        "a_meta": side_meta(a), "b_meta": side_meta(b), "cards": cards, "sides": sides, "heatmaps": heatmaps,
        "rows": rows, "n_rows": len(modules), "sorted_by_udr": any(_delta(m, "udr") is not None for m in modules),
        "only_in_a": _names(only_a), "only_in_b": _names(only_b),
        "issues": (doc.get("issues") or [])[:MAX_ISSUES_SHOWN],
        "biggest": summary.get("biggest_udr_differences") or summary.get("top_udr_differences"),
    }
    return View("compare", "Comparison A ↔ B", "views/compare.html.j2", context, udr_groups)


def _count(x: Any) -> str:
    if isinstance(x, list):
        return str(len(x))
    return str(x) if isinstance(x, int) else "-"


def _names(x: Any) -> list[str]:
    return [str(n) for n in x] if isinstance(x, list) else []

