"""Run-failure signatures (issue 18 item 5): patterns in the logged numbers that mean the run is broken even
when nothing raised. Fed by the train-step analyser and the eval feed; ``summary()`` is the
``training.failure_signatures`` block, and :mod:`gradience.policy.signature_rules` turns it into alerts.

- ``nan_loss_logged_as_zero``: loss exactly 0 with a NaN/Inf gradient norm. HF ``Trainer`` with
  ``logging_nan_inf_filter`` (on by default) replaces a NaN step loss by the running average of the window,
  which is 0 when every step since the last log was NaN (trainer.py ``_inner_training_loop``).
- ``clipping_saturated``: the gradient norm at or above ``max_grad_norm`` on ``CLIP_SATURATED_WINDOW`` logged
  steps in a row. HF logs the pre-clip norm (``Trainer._clip_grad_norm``), other loops often the clipped one
  (then it is pinned at the threshold): either way every step was clipped.
- ``frozen_adapter``: gradient norm exactly 0 on ``FROZEN_GRAD_WINDOW`` logged steps in a row: no trainable
  parameter is reached by the loss (zero-initialised A and B, a detached graph, gradient checkpointing without
  input grads).
- ``lr_zero_after_warmup``: the lr is exactly 0 after it was positive, and training steps are still logged
  after that (a scheduler built for fewer steps than the run takes).
- ``eval_loss_nan``: a held-out eval loss is NaN/Inf while the train loss is finite (every eval label masked,
  fp16 overflow in eval, a broken eval collator).
"""

from __future__ import annotations

import math
from typing import Any

from gradience.monitor.streaming import _Findings, _nonfinite_name
from gradience.policy import thresholds as T

HF_DEFAULT_MAX_GRAD_NORM = 1.0   # transformers TrainingArguments.max_grad_norm default


class _Run:
    """Consecutive logged steps meeting a condition: the current run and the first one of ``window`` or more."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.length = 0
        self.start: int | None = None
        self.longest = 0
        self.first_window: dict[str, Any] | None = None
        self.hits = 0

    def feed(self, step: int, hit: bool) -> None:
        if not hit:
            self.length, self.start = 0, None
            return
        self.hits += 1
        if self.length == 0:
            self.start = step
        self.length += 1
        self.longest = max(self.longest, self.length)
        if self.length >= self.window:
            if self.first_window is None:
                self.first_window = {"from_step": self.start, "to_step": step, "steps": self.length}
            elif self.first_window["from_step"] == self.start:
                self.first_window.update(to_step=step, steps=self.length)

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "longest": self.longest, "steps_hit": self.hits,
                "first_window": self.first_window}


class FailureSignatures:
    """Streaming detector of the five signatures; memory is bounded (capped finding lists, a few counters)."""

    def __init__(self) -> None:
        self.max_grad_norm: float | None = None
        self.max_grad_norm_source: str | None = None
        self.zero_loss_bad_grad = _Findings()
        self.clipped = _Run(T.CLIP_SATURATED_WINDOW)
        self.frozen = _Run(T.FROZEN_GRAD_WINDOW)
        self.grad_steps = 0
        self._lr_was_positive = False
        self.lr_zero_step: int | None = None
        self.steps_after_lr_zero = 0
        self.last_train_loss: float | None = None
        self.eval_nan = _Findings()

    def configure(self, config: dict[str, Any] | None, meta: dict[str, Any] | None) -> None:
        """``max_grad_norm`` from the run's config (training extras), else transformers' default for an HF run."""
        value = None
        for block in ((config or {}).get("training"), config or {}):
            extras = block.get("extras") if isinstance(block, dict) else None
            if isinstance(extras, dict) and "max_grad_norm" in extras:
                value = extras["max_grad_norm"]
                break
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.max_grad_norm, self.max_grad_norm_source = float(value), "config"
        elif (meta or {}).get("framework") == "transformers" or (meta or {}).get("source") == "trainer_state":
            self.max_grad_norm = HF_DEFAULT_MAX_GRAD_NORM
            self.max_grad_norm_source = "transformers default"

    def feed_step(self, step: int, loss: float | None, grad: float | None, lr: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            self.last_train_loss = loss
        if grad is not None:
            self.grad_steps += 1
            finite = math.isfinite(grad)
            if loss == 0.0 and not finite:
                self.zero_loss_bad_grad.add(step=step, loss=0.0, grad_norm=_nonfinite_name(grad))
            self.frozen.feed(step, finite and grad == 0.0)
            limit = self.max_grad_norm
            if limit is not None and limit > 0:
                self.clipped.feed(step, finite and grad >= limit * (1.0 - T.CLIP_SATURATED_RTOL))
        if lr is not None and math.isfinite(lr) and lr > 0.0:
            self._lr_was_positive = True
            self.lr_zero_step, self.steps_after_lr_zero = None, 0  # (again) a live schedule: not stuck at 0
        elif self.lr_zero_step is not None:
            if step > self.lr_zero_step:
                self.steps_after_lr_zero += 1   # trained on (lr 0 or not logged) after the lr hit 0
        elif lr == 0.0 and self._lr_was_positive:
            self.lr_zero_step = step

    def feed_eval(self, step: int | None, split: str, loss: float | None) -> None:
        if split.lower() == "train" or loss is None or math.isfinite(loss):
            return
        if self.last_train_loss is not None:
            self.eval_nan.add(step=step, split=split, loss=_nonfinite_name(loss), train_loss=self.last_train_loss)

    def summary(self) -> dict[str, Any]:
        return {
            "nan_loss_logged_as_zero": self.zero_loss_bad_grad.to_dict(),
            "clipping": {**self.clipped.to_dict(), "max_grad_norm": self.max_grad_norm,
                         "max_grad_norm_source": self.max_grad_norm_source, "grad_steps": self.grad_steps},
            "zero_grad_norm": {**self.frozen.to_dict(), "grad_steps": self.grad_steps},
            "lr_zero_after_warmup": None if self.lr_zero_step is None or not self.steps_after_lr_zero else
            {"first_zero_step": self.lr_zero_step, "steps_logged_after": self.steps_after_lr_zero},
            "eval_loss_nan": self.eval_nan.to_dict(),
        }
