"""What the monitor derives from ``train_step`` events: losses (non-finite, spikes, trend, smoothed history),
gradient norms (explosions), the lr schedule, and the run-failure signatures of
:mod:`gradience.monitor.signatures`. Bounded memory whatever the number of steps."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gradience.monitor.signatures import FailureSignatures
from gradience.monitor.streaming import _Findings, _nonfinite_name, _num, _RunningMedian, _Thinned
from gradience.policy import thresholds as T

_MIN_HISTORY = T.RUNNING_MEDIAN_MIN_HISTORY
_SPIKE_FACTOR = T.LOSS_SPIKE_FACTOR
_EXPLOSION_FACTOR = T.GRAD_EXPLOSION_FACTOR


def _median_exceeded(window: _RunningMedian, value: float, factor: float) -> float | None:
    """The running median of the earlier values when ``value`` exceeds ``factor`` x it (with enough history and a
    positive median), else None; then ``value`` joins the window. One rule for loss spikes and grad explosions."""
    med = window.median_if_at_least(_MIN_HISTORY)
    window.add(value)
    return med if med is not None and med > 0 and value > factor * med else None


def window_trend(pts: list[tuple[int, float]]) -> dict[str, Any] | None:
    """Least-squares slope of (step, value) points, as a change across them relative to their mean; "flat"
    within LOSS_TREND_FLAT_TOLERANCE. One trend rule for the loss and the other logged series (monitor/trl.py)."""
    if len(pts) < 3:
        return None
    xs = [float(p[0]) for p in pts]
    ys = [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    change = slope * (xs[-1] - xs[0])
    rel = change / abs(my) if my != 0 else None
    if rel is None:
        direction = "flat"
    elif rel < -T.LOSS_TREND_FLAT_TOLERANCE:
        direction = "decreasing"
    elif rel > T.LOSS_TREND_FLAT_TOLERANCE:
        direction = "increasing"
    else:
        direction = "flat"
    return {"direction": direction, "window": len(pts), "from_step": pts[0][0], "to_step": pts[-1][0],
            "slope_per_step": slope, "relative_change": rel}


class TrainStepAnalyzer:
    """Everything the monitor derives from ``train_step`` events."""

    def __init__(self) -> None:
        self.n = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.min_loss: float | None = None
        self.min_loss_step: int | None = None
        self.nonfinite_loss = _Findings()
        self.spikes = _Findings()
        self.explosions = _Findings()
        self.grad_norm_max: float | None = None
        self.grad_norm_max_step: int | None = None
        self.first_lr: float | None = None
        self.peak_lr: float | None = None
        self.peak_lr_step: int | None = None
        self.last_lr: float | None = None
        self.lr_rose = False
        self.lr_fell = False
        self._loss_median = _RunningMedian(T.LOSS_SPIKE_WINDOW)
        self._grad_median = _RunningMedian(T.LOSS_SPIKE_WINDOW)
        self._trend: deque[tuple[int, float]] = deque(maxlen=T.LOSS_TREND_WINDOW)
        self.loss_history = _Thinned()  # (step, running-median loss) for the overfitting analysis
        self.signatures = FailureSignatures()
        self._index = 0

    def feed(self, step: int | None, data: dict[str, Any]) -> None:
        self.n += 1
        self._index += 1
        s = step if step is not None else self._index
        if self.first_step is None:
            self.first_step = s
        self.last_step = s
        # Hot path (a million calls for a big log): JSON floats skip the generic conversion.
        loss = data.get("loss")
        if type(loss) is not float and loss is not None:
            loss = _num(loss)
        if loss is not None:
            self._feed_loss(s, loss)
        grad = data.get("grad_norm")
        if type(grad) is not float and grad is not None:
            grad = _num(grad)
        if grad is not None:
            self._feed_grad(s, grad)
        lr = data.get("lr")
        if lr is None:
            lr = data.get("learning_rate")
        if type(lr) is not float and lr is not None:
            lr = _num(lr)
        if lr is not None and math.isfinite(lr):
            self._feed_lr(s, lr)
        self.signatures.feed_step(s, loss, grad, lr)

    def _feed_loss(self, s: int, loss: float) -> None:
        self.last_loss = loss
        if loss - loss != 0.0:  # NaN or +-inf
            self.nonfinite_loss.add(step=s, value=_nonfinite_name(loss))
            return
        if self.min_loss is None or loss < self.min_loss:
            self.min_loss, self.min_loss_step = loss, s
        window = self._loss_median
        med = _median_exceeded(window, loss, _SPIKE_FACTOR)
        if med is not None:
            self.spikes.add(step=s, loss=loss, running_median=med, ratio=loss / med)
        self._trend.append((s, loss))
        history = self.loss_history
        if history.due():
            history.add((s, window.median()))
        else:
            history.skip()

    def _feed_grad(self, s: int, grad: float) -> None:
        if grad - grad != 0.0:
            self.explosions.add(step=s, grad_norm=_nonfinite_name(grad), running_median=None, ratio=None)
            return
        if self.grad_norm_max is None or grad > self.grad_norm_max:
            self.grad_norm_max, self.grad_norm_max_step = grad, s
        med = _median_exceeded(self._grad_median, grad, _EXPLOSION_FACTOR)
        if med is not None:
            self.explosions.add(step=s, grad_norm=grad, running_median=med, ratio=grad / med)

    def _feed_lr(self, s: int, lr: float) -> None:
        if self.first_lr is None:
            self.first_lr = self.peak_lr = lr
            self.peak_lr_step = s
        else:
            assert self.peak_lr is not None and self.last_lr is not None
            tol = T.LR_SCHEDULE_REL_TOL * max(abs(self.last_lr), 1e-30)
            if lr > self.last_lr + tol:
                self.lr_rose = True
            elif lr < self.last_lr - tol:
                self.lr_fell = True
            if lr > self.peak_lr:
                self.peak_lr, self.peak_lr_step = lr, s
        self.last_lr = lr

    def trend(self) -> dict[str, Any] | None:
        """Least-squares slope of the loss over the last window, as a relative change across it."""
        return window_trend(list(self._trend))

    def lr_schedule(self) -> dict[str, Any] | None:
        if self.first_lr is None:
            return None
        assert self.peak_lr is not None and self.last_lr is not None
        warmup = self.lr_rose and self.peak_lr > self.first_lr
        decay = self.lr_fell and self.last_lr < self.peak_lr
        if warmup and decay:
            shape = "warmup+decay"
        elif warmup:
            shape = "warmup"
        elif decay:
            shape = "decay"
        elif self.lr_rose or self.lr_fell:
            shape = "varying"
        else:
            shape = "constant"
        return {"shape": shape, "warmup": warmup, "decay": decay, "first": self.first_lr,
                "peak": self.peak_lr, "peak_step": self.peak_lr_step, "last": self.last_lr}

    def summary(self) -> dict[str, Any]:
        return {
            "steps_logged": self.n,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "last_loss": self.last_loss,
            "min_loss": self.min_loss,
            "min_loss_step": self.min_loss_step,
            "loss_trend": self.trend(),
            "nonfinite_loss": self.nonfinite_loss.to_dict(),
            "loss_spikes": {**self.spikes.to_dict(), "factor": T.LOSS_SPIKE_FACTOR,
                            "window": T.LOSS_SPIKE_WINDOW},
            "grad_norm_max": self.grad_norm_max,
            "grad_norm_max_step": self.grad_norm_max_step,
            "grad_explosions": {**self.explosions.to_dict(), "factor": T.GRAD_EXPLOSION_FACTOR,
                                "window": T.LOSS_SPIKE_WINDOW},
            "lr_schedule": self.lr_schedule(),
            "failure_signatures": self.signatures.summary(),
        }
