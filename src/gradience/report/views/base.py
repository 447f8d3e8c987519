"""What every view shares: the :class:`View` a data function returns, sidebar UDR groups, chart ids, fact cards.

A data function turns library results (``MonitorReport``, the audit summary, a compare or bench JSON) into
plain template context: numbers already formatted where the formatting is a decision (``-`` for unknown),
charts as inline SVG strings, heatmaps as cell lists. Templates only lay out; every input-derived string
reaches the page through Jinja's autoescaping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradience.report.heatmap import Grid

MAX_ISSUES_SHOWN = 50


@dataclass
class UdrGroup:
    """One UDR distribution for the sidebar: per-layer values plus the summary, or why there is none."""

    label: str
    values: list[float]
    summary: dict[str, Any]
    unavailable: str | None = None   # reason, when UDR could not be computed


@dataclass
class View:
    """What one view contributes to the page: a template block, its context, sidebar UDR groups."""

    key: str                  # anchor id, unique on the page
    title: str
    template: str             # template file under templates/views/
    context: dict[str, Any]
    udr: list[UdrGroup] = field(default_factory=list)


class ChartIds:
    """Deterministic, page-unique chart ids (prefix for the ids inside each SVG)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n}"



def fact(label: str, value: str, hint: str = "", level: str = "") -> dict[str, str]:
    """One card of a fact grid (``level``: "", "warn", "bad", "good")."""
    return {"label": label, "value": value, "hint": hint, "level": level}


@dataclass
class ModuleRows:
    """A document's per-module rows (dicts with a name) and the heatmap grid of their names: what the compare
    and merge views both read from ``doc["modules"]`` before building their own columns."""

    rows: list[dict[str, Any]]
    grid: Grid

    @classmethod
    def of(cls, doc: dict[str, Any]) -> ModuleRows:
        rows = [m for m in doc.get("modules") or [] if isinstance(m, dict) and m.get("name") is not None]
        return cls(rows, Grid.from_names([str(m["name"]) for m in rows]))

    def column(self, fn: Callable[[dict[str, Any]], float | None]) -> dict[str, float | None]:
        """``fn`` of every row, keyed by module name (a heatmap's values)."""
        return {str(m["name"]): fn(m) for m in self.rows}
