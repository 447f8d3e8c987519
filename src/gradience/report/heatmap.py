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
from dataclasses import dataclass
from typing import Any

from gradience.modules import classify_module, layer_index
from gradience.report.svg import require_report

CELL_W = 30
CELL_H = 13
LABEL_W = 64         # row labels (block index)
HEADER_H = 78        # rotated column labels
LEGEND_H = 34
NA_FILL = "#eef0f3"


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
    legend: list[tuple[int, str, str]]  # (x, fill, label or "")
    legend_y: int
    n_values: int
    cell_h: int = CELL_H

    @property
    def empty(self) -> bool:
        return self.n_values == 0


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
    """Value -> colour through a matplotlib colormap; linear or log10; clamped to [lo, hi]."""

    def __init__(self, cmap: str, lo: float, hi: float, *, log: bool = False) -> None:
        matplotlib = require_report("matplotlib")
        from matplotlib import colors

        self._cmap = matplotlib.colormaps[cmap]
        self._to_hex = colors.to_hex
        self.log = log
        self.lo, self.hi = lo, hi

    def position(self, value: float) -> float:
        lo, hi, v = self.lo, self.hi, value
        if self.log:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, self.lo))
        if hi <= lo:
            return 0.5
        return min(1.0, max(0.0, (v - lo) / (hi - lo)))

    def color(self, value: float) -> str:
        return str(self._to_hex(self._cmap(self.position(value))))

    def at(self, t: float) -> tuple[float, str]:
        """(value, colour) at fraction t of the scale."""
        if self.log:
            lo, hi = math.log10(self.lo), math.log10(self.hi)
            value = 10 ** (lo + t * (hi - lo))
        else:
            value = self.lo + t * (self.hi - self.lo)
        return value, str(self._to_hex(self._cmap(t)))


def build_heatmap(key: str, title: str, grid: Grid, values: dict[str, float | None], scale: ColorScale,
                  fmt: Callable[[float], str], *, note: str = "") -> Heatmap:
    """Cells for the modules of ``grid``; a module without a finite value is a grey cell saying why."""
    cells: list[Cell] = []
    n_values = 0
    # Few blocks (a toy model): taller cells, so the map stays legible; 32+ blocks: 13 px rows.
    cell_h = max(CELL_H, min(22, 300 // max(1, len(grid.rows))))
    for name, (r, c) in grid.where.items():
        value = values.get(name)
        x, y = LABEL_W + c * CELL_W, HEADER_H + r * cell_h
        if value is None or not math.isfinite(value):
            cells.append(Cell(x, y, NA_FILL, f"{name}\n{title}: -", True))
            continue
        n_values += 1
        cells.append(Cell(x, y, scale.color(value), f"{name}\n{title}: {fmt(value)}", False))
    width = LABEL_W + max(1, len(grid.columns)) * CELL_W + 8
    grid_bottom = HEADER_H + len(grid.rows) * cell_h
    legend: list[tuple[int, str, str]] = []
    steps = 10
    seg = max(8, (width - LABEL_W - 8) // steps)
    for i in range(steps):
        t = i / (steps - 1)
        value, fill = scale.at(t)
        label = fmt(value) if i in (0, steps - 1) else ""
        legend.append((LABEL_W + i * seg, fill, label))
    return Heatmap(key, title, note, grid.rows, grid.columns, cells, max(width, LABEL_W + steps * seg + 8),
                   grid_bottom + LEGEND_H, legend, grid_bottom + 8, n_values, cell_h)


def finite_values(values: dict[str, float | None]) -> list[float]:
    return [v for v in values.values() if v is not None and math.isfinite(v)]


def layout_info() -> dict[str, Any]:
    """Geometry constants the template needs."""
    return {"cell_w": CELL_W, "cell_h": CELL_H, "label_w": LABEL_W, "header_h": HEADER_H}
