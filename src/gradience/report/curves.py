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
import operator
from dataclasses import dataclass
from functools import reduce
from typing import Any

from gradience.monitor.trl import PLAIN_TRAIN_KEYS

CURVE_BUCKETS = 800          # buckets per curve: ~2 points per horizontal pixel of a 1400 px page
MAX_MARKED_NONFINITE = 2000  # NaN/Inf steps remembered per curve (the rest are counted)
FLUSH_POINTS = 4096          # points buffered per curve before they are folded into its buckets
MAX_TRL_EVAL_SPLITS = 4      # eval splits whose TRL headline metrics are drawn (monitor's JSON has them all)
# TRL's headline metrics per monitor/trl.py group, drawn as small multiples (what a user of each trainer watches:
# trl/trainer/dpo_trainer.py rewards/*, grpo_trainer.py reward and kl, reward_trainer.py, sft_trainer.py).
TRL_CHARTS: dict[str, tuple[str, ...]] = {
    "preference": ("rewards/margins", "rewards/accuracies"),
    "online_rl": ("reward", "kl"),
    "reward_model": ("accuracy", "margin"),
    "shared": ("mean_token_accuracy", "entropy"),
}
TRL_CHART_NAMES = tuple(dict.fromkeys(n for names in TRL_CHARTS.values() for n in names))
# An eval's ``accuracy`` is the run's eval accuracy (its own chart; monitor's TRL block leaves it out too).
_TRL_EVAL_NAMES = tuple(n for n in TRL_CHART_NAMES if n != "accuracy")


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

    def add_finite_run(self, xs: list[float], ys: list[float], start: int, stop: int) -> None:
        """``add`` of the finite points ``start..stop-1`` at once: the same result bit for bit (the running
        sum left to right, the first occurrence of the min and of the max)."""
        run = ys[start:stop]
        self.x_last = xs[stop - 1]
        self.n += stop - start
        self.total = reduce(operator.add, run, self.total)  # not sum(): Python >= 3.12 compensates it
        lo, hi = min(run), max(run)
        if lo < self.lo:
            self.lo, self.x_lo = lo, xs[start + run.index(lo)]
        if hi > self.hi:
            self.hi, self.x_hi = hi, xs[start + run.index(hi)]

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
    """Min/max/mean per bucket of consecutive points; at most ``max_buckets`` buckets whatever the length.

    Points are buffered (at most ``FLUSH_POINTS``) and folded into the buckets a run of points at a time:
    a full bucket-width of finite values costs a few C-level calls (``min``, ``max``, a left-to-right sum)
    instead of a Python call per point. The result is the one point-by-point folding gives, bit for bit
    (the same bucket boundaries, the same summation order, the first min / max kept); reading any
    attribute below flushes the buffer first.
    """

    def __init__(self, max_buckets: int = CURVE_BUCKETS) -> None:
        self.max_buckets = max(2, max_buckets)
        self._buckets: list[Bucket] = []
        self._width = 1           # points per bucket
        self._fill = 0            # points in the last bucket
        self._count = 0
        self._nonfinite_steps: list[float] = []
        self._nonfinite_count = 0
        self._xs: list[float] = []  # buffered points, not yet in a bucket
        self._ys: list[float] = []

    def add(self, x: float, y: float) -> None:
        self._xs.append(x)
        self._ys.append(y)
        if len(self._ys) >= FLUSH_POINTS:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered points into the buckets (in order)."""
        if self._ys:
            xs, ys = self._xs, self._ys
            self._xs, self._ys = [], []
            self.add_run(xs, ys)

    def add_run(self, xs: list[float], ys: list[float]) -> None:
        """``add`` of every ``(xs[i], ys[i])`` in order, a bucket-width at a time (after any buffered points)."""
        if self._ys:
            self.flush()
        n = len(ys)
        if not n:
            return
        self._count += n
        total = sum(ys)
        finite = total - total == 0.0  # a NaN/Inf anywhere makes the sum NaN/Inf (so can an overflow)
        if not finite:
            for i, y in enumerate(ys):
                if y - y != 0.0:
                    self._nonfinite_count += 1
                    if len(self._nonfinite_steps) < MAX_MARKED_NONFINITE:
                        self._nonfinite_steps.append(xs[i])
        buckets = self._buckets
        i = 0
        while i < n:
            if not buckets or self._fill >= self._width:
                if len(buckets) >= self.max_buckets:
                    self._halve()
                    buckets = self._buckets
                if not buckets or self._fill >= self._width:
                    buckets.append(Bucket(xs[i], xs[i]))
                    self._fill = 0
            take = min(self._width - self._fill, n - i)
            last = buckets[-1]
            if take == 1 or not finite:
                for j in range(i, i + take):
                    last.add(xs[j], ys[j])
            else:
                last.add_finite_run(xs, ys, i, i + take)
            self._fill += take
            i += take

    def _halve(self) -> None:
        merged: list[Bucket] = []
        buckets = self._buckets
        for i in range(0, len(buckets) - 1, 2):
            a = buckets[i]
            a.merge(buckets[i + 1])
            merged.append(a)
        # Called when the last bucket is full (``width`` points): merged with its neighbour it is full at the
        # new width; left alone (odd count) it is half full and keeps filling.
        if len(buckets) % 2 == 1:
            merged.append(buckets[-1])
            self._fill = self._width
        else:
            self._fill = 2 * self._width
        self._buckets = merged
        self._width *= 2

    @property
    def buckets(self) -> list[Bucket]:
        self.flush()
        return self._buckets

    @property
    def width(self) -> int:
        self.flush()
        return self._width

    @property
    def count(self) -> int:
        self.flush()
        return self._count

    @property
    def nonfinite_steps(self) -> list[float]:
        self.flush()
        return self._nonfinite_steps

    @property
    def nonfinite_count(self) -> int:
        self.flush()
        return self._nonfinite_count

    @property
    def exact(self) -> bool:
        """Every point kept as is (no bucket holds more than one point)."""
        return self.width == 1

    def finite_count(self) -> int:
        return sum(b.n for b in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.count, "buckets": len(self.buckets), "bucket_width": self.width,
                "nonfinite": self.nonfinite_count}


class RunCurves:
    """Everything the report plots from a run's events (train steps and evals), split by metric.

    A train step costs one Python call: its x and its three values are appended to buffers (``None`` where a
    value is missing) that are folded into the three curves ``FLUSH_POINTS`` steps at a time; reading
    ``loss``, ``lr`` or ``grad_norm`` folds what is buffered first.
    """

    def __init__(self) -> None:
        self._loss = Downsampler()
        self._lr = Downsampler()
        self._grad_norm = Downsampler()
        self.eval_loss: dict[str, Downsampler] = {}
        self.eval_accuracy: dict[str, Downsampler] = {}
        self._index = 0
        self._steps: list[float] = []              # x of each buffered train step
        self._loss_ys: list[float | None] = []
        self._lr_ys: list[float | None] = []
        self._grad_ys: list[float | None] = []
        # TRL's headline metrics (report/views/trl.py charts them): train curves, and eval points per split.
        self.trl: dict[str, Downsampler] = {}
        self.trl_eval: dict[str, dict[str, Downsampler]] = {}

    @staticmethod
    def _feed_trl(x: float, data: dict[str, Any], into: dict[str, Downsampler],
                  names: tuple[str, ...] = TRL_CHART_NAMES) -> None:
        for name in names:
            value = data.get(name)
            if value is None:
                continue
            if type(value) is not float:
                value = _number(value)
                if value is None:
                    continue
            curve = into.get(name)
            if curve is None:
                curve = into[name] = Downsampler()
            curve.add(x, value)

    def feed(self, event: str, step: int | None, data: dict[str, Any]) -> None:
        """One run event (telemetry record data, or an event derived from trainer_state.json)."""
        if event == "train_step":
            self._index += 1
            self._steps.append(float(step if step is not None else self._index))
            # A float (every value of a well-formed log) goes in as is; anything else through _number.
            value = data.get("loss")
            self._loss_ys.append(value if type(value) is float else _number(value))
            value = data.get("lr")
            if value is None:
                value = data.get("learning_rate")
            self._lr_ys.append(value if type(value) is float else _number(value))
            value = data.get("grad_norm")
            self._grad_ys.append(value if type(value) is float else _number(value))
            if not _plain_train(data):  # keys beyond the Trainer's: maybe TRL's (a C-level test, as monitor's)
                self._feed_trl(self._steps[-1], data, self.trl)
            if len(self._steps) >= FLUSH_POINTS:
                self._flush()
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
            if split in self.trl_eval or len(self.trl_eval) < MAX_TRL_EVAL_SPLITS:
                into = self.trl_eval.get(split, {})
                self._feed_trl(x, metrics, into, _TRL_EVAL_NAMES)
                if into:
                    self.trl_eval[split] = into

    def _flush(self) -> None:
        steps = self._steps
        if not steps:
            return
        for curve, ys in ((self._loss, self._loss_ys), (self._lr, self._lr_ys), (self._grad_norm, self._grad_ys)):
            if None in ys:
                pairs = [(x, y) for x, y in zip(steps, ys, strict=True) if y is not None]
                curve.add_run([x for x, _ in pairs], [y for _, y in pairs])
            else:
                curve.add_run(steps, ys)  # type: ignore[arg-type]
        self._steps, self._loss_ys, self._lr_ys, self._grad_ys = [], [], [], []

    @property
    def loss(self) -> Downsampler:
        self._flush()
        return self._loss

    @property
    def lr(self) -> Downsampler:
        self._flush()
        return self._lr

    @property
    def grad_norm(self) -> Downsampler:
        self._flush()
        return self._grad_norm


_plain_train = PLAIN_TRAIN_KEYS.issuperset


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
