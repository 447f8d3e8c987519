"""Per-layer heatmaps (block index x module) as plain data; the template draws them as SVG rectangles.

Drawn by the template rather than matplotlib so that every cell carries its own ``<title>`` tooltip (module
name and value, escaped by the template like any other input-derived text) and works without JavaScript.
Rows are transformer blocks (``layers.N``, ``h.N`` ... through the one layer-index extractor); an
encoder-decoder model gets one row per (stack, block); modules without a block (embeddings, heads) share a
last row. Columns are the module path inside the block (``self_attn.q_proj``), shortened to the leaf when
leaves are unique.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradience.modules import classify_module, layer_index
from gradience.report.svg import require_report

CELL_W = 30
CELL_H = 15          # row pitch: the smallest drawn cell is 29 x 14 px (1 px gap), readable and hoverable
LABEL_W = 40         # narrowest row-label column ("block", "31"); wider for "encoder 11" or "other"
COL_LABEL_MAX = 24   # column labels longer than this are shortened with "…" (the full name is the tooltip)
CHAR_W = 5.6         # px per character of the 9 px label font (DejaVu Sans average), for the header's size
LEGEND_H = 40
NA_FILL = "#f3f4f6"  # the background of the "not computed" hatch
NA_STROKE = "#9aa5b1"
# One palette direction for "more" on every map: light = less, dark blue = more. Sequential maps use
# YlGnBu; signed maps (Δ, cos) use RdBu, whose positive end is the same blue and whose middle is white.
SEQUENTIAL = "YlGnBu"
DIVERGING = "RdBu"
LEGEND_STEPS = 24


@dataclass
class Cell:
    x: int
    y: int
    fill: str
    tooltip: str
    missing: bool


@dataclass
class Heatmap:
    key: str
    title: str
    note: str
    rows: list[str]
    columns: list[str]
    cells: list[Cell]
    width: int
    height: int
    legend: list[tuple[int, str, str]]  # (x, fill, "") colour-bar segments, data min to data max
    legend_y: int
    n_values: int
    cell_h: int = CELL_H
    uid: str = "h"                      # page-unique prefix for the ids inside this map (the hatch pattern)
    header_h: int = 78
    legend_labels: list[tuple[int, str, str]] = field(default_factory=list)  # (x, anchor, text)
    legend_w: int = 0
    n_missing: int = 0
    vmin: float | None = None
    vmax: float | None = None
    column_labels: list[str] = field(default_factory=list)
    label_w: int = LABEL_W

    @property
    def empty(self) -> bool:
        return self.n_values == 0

    @property
    def segment_w(self) -> int:
        return self.legend[1][0] - self.legend[0][0] if len(self.legend) > 1 else self.legend_w


def _split(name: str) -> tuple[str, int | None, str]:
    """(stack prefix, block index, module path inside the block) of a module name."""
    idx = layer_index(name)
    if idx is None:
        return "", None, name
    segs = name.split(".")
    for j in range(1, len(segs)):
        if segs[j] == str(idx):
            return ".".join(segs[: j - 1]), idx, ".".join(segs[j + 1:]) or segs[-1]
    return "", idx, segs[-1]


# Usual order of projections inside a block (attention in, attention out, MLP in, MLP out); others follow
# by type, then name.
_LEAF_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_lin", "k_lin", "v_lin", "out_lin",
               "query", "key", "value", "c_attn", "query_key_value", "wqkv", "out_proj", "gate_proj", "up_proj",
               "down_proj", "c_fc", "c_proj", "fc1", "fc2", "lin1", "lin2", "w1", "w3", "w2", "dense_h_to_4h",
               "dense_4h_to_h", "dense")
_TYPE_ORDER = {"attn": 0, "mlp": 1, "embed": 2, "other": 3}


def _column_order(col: str) -> tuple[int, int, str]:
    leaf = col.rsplit(".", 1)[-1]
    leaf_rank = _LEAF_ORDER.index(leaf) if leaf in _LEAF_ORDER else len(_LEAF_ORDER)
    return _TYPE_ORDER.get(classify_module(col), 3), leaf_rank, col


@dataclass
class Grid:
    """Row and column of every module name, shared by all heatmaps of one adapter (same layout)."""

    rows: list[str]
    columns: list[str]
    where: dict[str, tuple[int, int]]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Grid:
        parts = {n: _split(n) for n in names}
        stacks = sorted({p[0] for p in parts.values() if p[1] is not None})
        row_keys = sorted({(p[0], p[1]) for p in parts.values() if p[1] is not None},
                          key=lambda k: (stacks.index(k[0]), k[1]))
        col_keys = sorted({parts[n][2] for n in names if parts[n][1] is not None}, key=_column_order)
        outside = [n for n in names if parts[n][1] is None]
        # Modules outside blocks get one column each in a last row, so nothing is hidden.
        col_keys += [n for n in sorted(outside) if n not in col_keys]
        leaves = [c.rsplit(".", 1)[-1] for c in col_keys]
        short = leaves if len(set(leaves)) == len(leaves) else col_keys
        multi_stack = len(stacks) > 1
        row_labels = [(f"{s.rsplit('.', 1)[-1]} {i}" if multi_stack and s else str(i)) for s, i in row_keys]
        if outside:
            row_labels.append("other")
        where: dict[str, tuple[int, int]] = {}
        for n in names:
            stack, idx, inner = parts[n]
            if idx is None:
                where[n] = (len(row_keys), col_keys.index(n))
            else:
                where[n] = (row_keys.index((stack, idx)), col_keys.index(inner))
        return cls(row_labels, short, where)


class ColorScale:
    """Value -> colour through a matplotlib colormap; linear or log10; clamped to [lo, hi]. A diverging
    scale (``center`` set) maps ``center`` to the colormap's middle and ±max|v − center| to its ends."""

    def __init__(self, cmap: str, lo: float, hi: float, *, log: bool = False, center: float | None = None) -> None:
        matplotlib = require_report("matplotlib")
        from matplotlib import colors

        self._cmap = matplotlib.colormaps[cmap]
        self._to_hex = colors.to_hex
        self.log = log
        self.center = center
        if center is not None:
            half = max(abs(lo - center), abs(hi - center))
            lo, hi = center - half, center + half
        self.lo, self.hi = lo, hi

    @classmethod
    def for_data(cls, values: Sequence[float], *, diverging: bool = False, log: bool = False) -> ColorScale:
        """The scale a map of ``values`` uses: sequential from the data's min to its max (log10 for ratios
        spanning decades), or diverging around 0 for signed differences."""
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if diverging:
            return cls(DIVERGING, lo, hi, center=0.0)
        if log and lo > 0:
            return cls(SEQUENTIAL, lo, hi, log=True)
        return cls(SEQUENTIAL, lo, hi)

    def position(self, value: float) -> float:
        lo, hi, v = self.lo, self.hi, value
        if self.log:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, self.lo))
        if not hi > lo:
            return 0.5 if self.center is not None else 1.0
        return min(1.0, max(0.0, (v - lo) / (hi - lo)))

    def color(self, value: float) -> str:
        return str(self._to_hex(self._cmap(self.position(value))))

    def between(self, lo: float, hi: float, t: float) -> float:
        """The value at fraction t of [lo, hi] (geometric on a log scale): where the colour bar samples."""
        if self.log and lo > 0 and hi > 0:
            return float(10 ** (math.log10(lo) + t * (math.log10(hi) - math.log10(lo))))
        return lo + t * (hi - lo)


def _col_label(col: str) -> str:
    return col if len(col) <= COL_LABEL_MAX else col[: COL_LABEL_MAX - 1] + "…"


def build_heatmap(key: str, title: str, grid: Grid, values: dict[str, float | None], scale: ColorScale | None,
                  fmt: Callable[[float], str], *, note: str = "", uid: str = "h") -> Heatmap:
    """Cells for the modules of ``grid``; a module without a finite value is a hatched cell ("not computed",
    never a colour of the scale). ``scale`` None: :meth:`ColorScale.for_data` of the finite values. The
    colour bar spans the data's min to max, both labelled (and 0 on a signed map that crosses it)."""
    finite_vals = [v for v in (values.get(n) for n in grid.where) if v is not None and math.isfinite(v)]
    label_w = max(LABEL_W, int(12 + CHAR_W * max((len(r) for r in grid.rows), default=0)))
    if scale is None:
        scale = ColorScale.for_data(finite_vals)
    labels = [_col_label(c) for c in grid.columns]
    header_h = int(max(40, 12 + 0.87 * CHAR_W * max((len(c) for c in labels), default=4)))
    # Rotated labels lean right: the last column's label reaches this far past the grid.
    overhang = int(0.5 * CHAR_W * max((len(c) for c in labels[-3:]), default=0))
    cells: list[Cell] = []
    n_values = n_missing = 0
    # Few blocks (a toy model): taller cells, so the map stays legible; 20+ blocks: 15 px rows.
    cell_h = max(CELL_H, min(22, 300 // max(1, len(grid.rows))))
    for name, (r, c) in grid.where.items():
        value = values.get(name)
        x, y = label_w + c * CELL_W, header_h + r * cell_h
        if value is None or not math.isfinite(value):
            n_missing += 1
            cells.append(Cell(x, y, f"url(#{uid}-na)", f"{name}\n{title}: not computed", True))
            continue
        n_values += 1
        cells.append(Cell(x, y, scale.color(value), f"{name}\n{title}: {fmt(value)}", False))
    grid_w = max(1, len(grid.columns)) * CELL_W
    grid_bottom = header_h + len(grid.rows) * cell_h
    legend_w = max(grid_w, 150)
    seg = legend_w / LEGEND_STEPS
    legend: list[tuple[int, str, str]] = []
    legend_labels: list[tuple[int, str, str]] = []
    vmin = min(finite_vals) if finite_vals else None
    vmax = max(finite_vals) if finite_vals else None
    if vmin is not None and vmax is not None:
        for i in range(LEGEND_STEPS):
            t = (i + 0.5) / LEGEND_STEPS
            legend.append((label_w + round(i * seg), scale.color(scale.between(vmin, vmax, t)), ""))
        if vmin == vmax:
            legend_labels.append((label_w, "start", f"all {fmt(vmin)}"))
        else:
            legend_labels.append((label_w, "start", fmt(vmin)))
            legend_labels.append((label_w + legend_w, "end", fmt(vmax)))
            if scale.center is not None and vmin < scale.center < vmax and not scale.log:
                t = (scale.center - vmin) / (vmax - vmin)
                if 0.2 < t < 0.8:  # room between the end labels
                    legend_labels.append((label_w + round(t * legend_w), "middle", "0"))
    width = label_w + max(grid_w + overhang, legend_w) + 8
    if n_missing:
        width = max(width, label_w + legend_w + 8)
    return Heatmap(key, title, note, grid.rows, grid.columns, cells, width, grid_bottom + LEGEND_H + (
        16 if n_missing else 0), legend, grid_bottom + 8, n_values, cell_h, uid=uid, header_h=header_h,
        legend_labels=legend_labels, legend_w=legend_w, n_missing=n_missing, vmin=vmin, vmax=vmax,
        column_labels=labels, label_w=label_w)


def finite_values(values: dict[str, float | None]) -> list[float]:
    return [v for v in values.values() if v is not None and math.isfinite(v)]


def layout_info() -> dict[str, Any]:
    """Geometry constants the template needs."""
    return {"cell_w": CELL_W, "cell_h": CELL_H, "label_w": LABEL_W, "na_fill": NA_FILL, "na_stroke": NA_STROKE}
