"""The UDR sidebar: the distributions every view contributed, with their summary numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradience.policy.thresholds import UDR_FRACTION_LEVELS
from gradience.report import charts
from gradience.report.views.base import ChartIds, UdrGroup
from gradience.textfmt import num, pct

MAX_NAMES_IN_TITLE = 3
MAX_GROUPS_LISTED = 50   # distributions listed with their numbers (a bench of thousands of arms lists the first)


def _key(values: Sequence[float]) -> tuple[float, ...]:
    """Two groups show the same distribution when their sorted values agree to 6 significant digits."""
    return tuple(sorted(float(f"{v:.6g}") for v in values))


def collapse(groups: Sequence[UdrGroup]) -> list[tuple[list[str], UdrGroup]]:
    """Groups with identical distributions merged (first one's numbers, every label kept), in first-seen
    order; groups without values stay apart (each has its own reason)."""
    out: list[tuple[list[str], UdrGroup]] = []
    seen: dict[tuple[float, ...], int] = {}
    for g in groups:
        if not g.values:
            out.append(([g.label], g))
            continue
        key = _key(g.values)
        if key in seen:
            out[seen[key]][0].append(g.label)
            continue
        seen[key] = len(out)
        out.append(([g.label], g))
    return out


def _title(labels: list[str]) -> str:
    shown = " = ".join(labels[:MAX_NAMES_IN_TITLE])
    return shown + (f" (+{len(labels) - MAX_NAMES_IN_TITLE} identical)" if len(labels) > MAX_NAMES_IN_TITLE else "")


def udr_sidebar(groups: Sequence[UdrGroup], ids: ChartIds) -> dict[str, Any]:
    """The sidebar's UDR distributions: one small histogram per distinct distribution (identical ones, e.g.
    a no-op control arm and the probe, collapsed into one), with the summary numbers of each."""
    merged = collapse(groups)
    with_values = [(_title(labels), g.values) for labels, g in merged if g.values]
    svg = charts.udr_histogram(ids.next(), with_values, UDR_FRACTION_LEVELS) if with_values else None
    rows = []
    for labels, g in merged[:MAX_GROUPS_LISTED]:
        s = g.summary
        rows.append({
            "label": _title(labels), "labels": labels, "unavailable": g.unavailable, "base": s.get("base_model"),
            "stats": [("median", num(s.get("udr_median"), ".3g")), ("p90", num(s.get("udr_p90"), ".3g")),
                      ("max", num(s.get("udr_max"), ".3g")),
                      (f"> {UDR_FRACTION_LEVELS[0]:g}", pct(s.get("fraction_udr_gt_0_1"))),
                      (f"> {UDR_FRACTION_LEVELS[1]:g}", pct(s.get("fraction_udr_gt_0_3"))),
                      ("layers", str(s.get("n_layers_with_udr") if s.get("n_layers_with_udr") is not None
                                     else len(g.values)))],
        })
    return {"svg": svg, "groups": rows, "any": bool(with_values), "present": bool(groups),
            "n_distinct": len(with_values), "n_groups": len(groups), "n_unlisted": max(0, len(merged) - len(rows)),
            "n_drawn": min(len(with_values), charts.MAX_UDR_PANELS)}
