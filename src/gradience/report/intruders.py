"""The intruder-dimensions heatmap of an audit (issue 23): intruders per (block, module), each cell's tooltip the
layer's best-|cos| profile over its top-k directions (intruders marked), drawn like every other heatmap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradience.report.heatmap import Grid, Heatmap, build_heatmap
from gradience.report.views.base import ChartIds
from gradience.textfmt import finite


def _profile(row: dict[str, Any]) -> str:
    cos = row.get("intruder_cos") or []
    marked = set(row.get("intruder_indices") or [])
    # three decimals rounded down: 0.4996 (an intruder at ε = 0.5) must not read "0.50*" beside "< 0.5"
    parts = [f"{math.floor(c * 1000) / 1000:.3f}{'*' if i in marked else ''}" for i, c in enumerate(cos[:64])
             if isinstance(c, (int, float)) and math.isfinite(c)]
    how = row.get("intruder_decided_by")
    return ("best |cos| vs base, top-k of W+ΔW (* intruder): " + " ".join(parts)
            + (f"\ndecided by: {how}" if how else ""))


def intruder_heatmap(rows: Sequence[dict[str, Any]], ids: ChartIds, summary: dict[str, Any]) -> Heatmap | None:
    """None when the audit did not ask for intruders (its rows have no ``intruder_count`` key)."""
    if not any("intruder_count" in r for r in rows):
        return None
    grid = Grid.from_names([str(r["name"]) for r in rows])
    counts = {str(r["name"]): finite(r.get("intruder_count")) for r in rows}
    k, eps = summary.get("intruder_k"), summary.get("intruder_eps")
    note = (f"top-{k} singular vectors of W + ΔW with best |cos| < {eps} against every singular vector of W "
            "(Shuttleworth et al. 2025); hover for each layer's cos profile")
    heat = build_heatmap("intruders", "intruders", grid, counts, None, lambda v: str(round(v)), uid=ids.next(),
                         note=note)
    by_name = {str(r["name"]): r for r in rows}
    for cell in heat.cells:
        row = by_name.get(cell.tooltip.split("\n", 1)[0])
        if row is not None and row.get("intruder_cos"):
            cell.tooltip += "\n" + _profile(row)
    return heat
