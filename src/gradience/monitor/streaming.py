"""Bounded-memory building blocks of the streaming run analysis (``gradience.monitor.analysis``): evenly thinned
histories, fixed-window running medians and capped finding lists, plus the number helpers the analysers share.
Split out of analysis.py so each analyser module stays short; the names are re-exported there."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

MAX_LISTED_STEPS = 50       # steps listed per finding (NaN losses, spikes …); the rest are counted
HISTORY_POINTS = 4096       # samples kept of loss/eval histories (evenly thinned beyond that)
MAX_ALERT_KINDS = 100       # distinct (severity, code) alert groups kept

def _num(value: Any) -> float | None:
    """A float from a JSON value, or None (bools and non-numbers are not numbers here)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _nonfinite_name(x: float) -> str:
    """Telemetry's spelling of a non-finite float (so JSON output stays strict and readable)."""
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _Thinned:
    """Evenly spaced samples of an unbounded sequence: when full, every other sample is dropped and the
    sampling stride doubles. The last item appended is always remembered separately."""

    def __init__(self, capacity: int = HISTORY_POINTS) -> None:
        self.capacity = capacity
        self.items: list[tuple[int, float]] = []
        self._stride = 1
        self._count = 0

    def due(self) -> bool:
        """Whether the next ``add`` will be kept (lets callers skip computing a value that is dropped)."""
        return self._count % self._stride == 0

    def add(self, item: tuple[int, float]) -> None:
        if self._count % self._stride == 0:
            self.items.append(item)
            if len(self.items) >= self.capacity:
                self.items = self.items[::2]
                self._stride *= 2
        self._count += 1

    def skip(self) -> None:
        self._count += 1


class _RunningMedian:
    """Median of the last ``window`` values, in O(window) per update with a sorted list."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def median(self) -> float:
        xs = self._sorted
        n = len(xs)
        mid = n // 2
        return xs[mid] if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])

    def add(self, value: float) -> None:
        order, xs = self._order, self._sorted
        order.append(value)
        bisect.insort(xs, value)
        if len(order) > self.window:
            del xs[bisect.bisect_left(xs, order.popleft())]

    def median_if_at_least(self, n: int) -> float | None:
        """The median when the window holds at least ``n`` values, else None."""
        xs = self._sorted
        size = len(xs)
        if size < n:
            return None
        mid = size // 2
        return xs[mid] if size % 2 else 0.5 * (xs[mid - 1] + xs[mid])


class _Findings:
    """Steps at which something happened: the first MAX_LISTED_STEPS kept, all counted."""

    def __init__(self) -> None:
        self.count = 0
        self.items: list[dict[str, Any]] = []

    def add(self, **item: Any) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED_STEPS:
            self.items.append(item)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "listed": list(self.items)}
