"""Training curves for the report, collected in one streaming pass with bounded memory.

A 100k-step (or 10M-step) log must fit in a page of under 1 MB without losing what matters: a loss spike
that lasted one step. :class:`Downsampler` therefore keeps at most ``max_buckets`` buckets of consecutive
points, each with its min, max and mean (and whether a NaN/Inf fell in it); when full, neighbouring buckets
merge pairwise and the bucket width doubles. A spike is the max of its bucket, so it survives any amount of
thinning. While the log is short (one point per bucket) the curve is exact.

Pure Python: no numpy, no matplotlib (the chart code draws what this collects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CURVE_BUCKETS = 800          # buckets per curve: ~2 points per horizontal pixel of a 1400 px page
MAX_MARKED_NONFINITE = 2000  # NaN/Inf steps remembered per curve (the rest are counted)


@dataclass
class Bucket:
    x_first: float
    x_last: float
    n: int = 0                 # finite values
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    x_lo: float = 0.0          # x of the min / max (a spike is drawn at its own step)
    x_hi: float = 0.0
    nonfinite: int = 0

    def add(self, x: float, y: float) -> None:
        self.x_last = x
        if y - y != 0.0:  # NaN or +-inf
            self.nonfinite += 1
            return
        self.n += 1
        self.total += y
        if y < self.lo:
            self.lo, self.x_lo = y, x
        if y > self.hi:
            self.hi, self.x_hi = y, x

    def merge(self, other: Bucket) -> None:
        self.x_last = other.x_last
        self.n += other.n
        self.total += other.total
        self.nonfinite += other.nonfinite
        if other.lo < self.lo:
            self.lo, self.x_lo = other.lo, other.x_lo
        if other.hi > self.hi:
            self.hi, self.x_hi = other.hi, other.x_hi

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def x_mid(self) -> float:
        return 0.5 * (self.x_first + self.x_last)


class Downsampler:
    """Min/max/mean per bucket of consecutive points; at most ``max_buckets`` buckets whatever the length."""

    def __init__(self, max_buckets: int = CURVE_BUCKETS) -> None:
        self.max_buckets = max(2, max_buckets)
        self.buckets: list[Bucket] = []
        self.width = 1            # points per bucket
        self._fill = 0            # points in the last bucket
        self.count = 0
        self.nonfinite_steps: list[float] = []
        self.nonfinite_count = 0

    def add(self, x: float, y: float) -> None:
        self.count += 1
        if y - y != 0.0:
            self.nonfinite_count += 1
            if len(self.nonfinite_steps) < MAX_MARKED_NONFINITE:
                self.nonfinite_steps.append(x)
        if not self.buckets or self._fill >= self.width:
            if len(self.buckets) >= self.max_buckets:
                self._halve()
            if not self.buckets or self._fill >= self.width:
                self.buckets.append(Bucket(x, x))
                self._fill = 0
        self.buckets[-1].add(x, y)
        self._fill += 1

    def _halve(self) -> None:
        merged: list[Bucket] = []
        for i in range(0, len(self.buckets) - 1, 2):
            a = self.buckets[i]
            a.merge(self.buckets[i + 1])
            merged.append(a)
        # Called when the last bucket is full (``width`` points): merged with its neighbour it is full at the
        # new width; left alone (odd count) it is half full and keeps filling.
        if len(self.buckets) % 2 == 1:
            merged.append(self.buckets[-1])
            self._fill = self.width
        else:
            self._fill = 2 * self.width
        self.buckets = merged
        self.width *= 2

    @property
    def exact(self) -> bool:
        """Every point kept as is (no bucket holds more than one point)."""
        return self.width == 1

    def finite_count(self) -> int:
        return sum(b.n for b in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.count, "buckets": len(self.buckets), "bucket_width": self.width,
                "nonfinite": self.nonfinite_count}


@dataclass
class RunCurves:
    """Everything the report plots from a run's events (train steps and evals), split by metric."""

    loss: Downsampler = field(default_factory=Downsampler)
    lr: Downsampler = field(default_factory=Downsampler)
    grad_norm: Downsampler = field(default_factory=Downsampler)
    eval_loss: dict[str, Downsampler] = field(default_factory=dict)
    eval_accuracy: dict[str, Downsampler] = field(default_factory=dict)
    _index: int = 0

    def feed(self, event: str, step: int | None, data: dict[str, Any]) -> None:
        """One run event (telemetry record data, or an event derived from trainer_state.json)."""
        if event == "train_step":
            self._index += 1
            x = float(step if step is not None else self._index)
            for target, key, alt in ((self.loss, "loss", None), (self.lr, "lr", "learning_rate"),
                                     (self.grad_norm, "grad_norm", None)):
                value = data.get(key)
                if value is None and alt is not None:
                    value = data.get(alt)
                y = _number(value)
                if y is not None:
                    target.add(x, y)
        elif event == "eval":
            split = data.get("split")
            split = split if isinstance(split, str) and split else "unknown"
            metrics = data.get("metrics")
            if not isinstance(metrics, dict):
                metrics = data
            x = float(step if step is not None else self._index)
            loss = _number(metrics.get("loss"))
            if loss is not None:
                self.eval_loss.setdefault(split, Downsampler()).add(x, loss)
            acc = _number(metrics.get("accuracy", metrics.get("acc")))
            if acc is not None:
                self.eval_accuracy.setdefault(split, Downsampler()).add(x, acc / 100.0 if acc > 1.0 else acc)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
