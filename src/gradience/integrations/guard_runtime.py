"""The guard as the HF callback runs it (:class:`GuardRuntime`), split from :mod:`gradience.integrations.guard`
(which documents what the guard does and its limits, and still exports this class)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gradience.integrations.guard import GuardPolicy, GuardSettings, SnapshotRing, Verdict
from gradience.integrations.guard_state import TrainableState, scale_lr, step_signals, torch_isfinite


class GuardRuntime:
    """The guard as the HF callback runs it: state between hooks, actions, and the events to write.

    Hooks (all ranks): :meth:`begin` (on_train_begin), :meth:`step_begin`, :meth:`pre_optimizer_step`,
    :meth:`step_end`, :meth:`logged_loss` (on_log), :meth:`end`. Each action is returned as an event dict
    (the ``guard`` metrics payload) that the callback writes on rank 0 together with an ``alert``.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.policy = GuardPolicy(settings)
        self.ring = SnapshotRing(settings.ring)
        self.state: TrainableState | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.trainer: Any = None
        self.loss_source = "log"
        self.check_grads = True
        self.sharded = False   # FSDP: each rank snapshots and restores its own shards
        self.nan_filter = False
        self.events: list[dict[str, Any]] = []
        self.abort_reason: str | None = None
        self.lr_scale = 1.0
        self._mark: Any = None
        self._rejected_step: int | None = None
        self._pending: tuple[int, Any] | None = None  # log mode: a snapshot whose loss is not yet judged
        self._spare: Any = None                        # buffers of a discarded snapshot, for reuse

    # -- lifecycle ------------------------------------------------------------------------------------------
    def begin(self, trainer: Any, optimizer: Any, scheduler: Any, step: int) -> None:
        import torch

        self.trainer, self.optimizer, self.scheduler = trainer, optimizer, scheduler
        self.state = TrainableState(optimizer)
        has_acc = isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor)
        if self.settings.loss_source == "step" and not has_acc:
            raise ValueError("guard_loss_source='step' needs transformers' Trainer._tr_loss (transformers 5.x); "
                             "use 'auto' or 'log'")
        self.loss_source = "step" if has_acc and self.settings.loss_source != "log" else "log"
        accelerator = getattr(trainer, "accelerator", None)
        self.check_grads = getattr(accelerator, "scaler", None) is None
        self.nan_filter = bool(getattr(getattr(trainer, "args", None), "logging_nan_inf_filter", False))
        self.sharded = bool(getattr(trainer, "is_fsdp_enabled", False))
        self.take_snapshot(step)

    def end(self) -> None:
        """Free the snapshots (the events and the abort reason stay readable)."""
        self.ring.clear()
        self._pending = self._spare = None
        self._mark = None
        self.state = None

    @property
    def aborted(self) -> bool:
        return self.abort_reason is not None

    def describe(self) -> dict[str, Any]:
        out = self.settings.to_dict()
        out["loss_source"] = self.loss_source
        out["grad_trigger"] = self.check_grads
        out["trainable_params"] = self.state.numel if self.state is not None else None
        out["sharded"] = self.sharded
        return out

    # -- hooks ----------------------------------------------------------------------------------------------
    def take_snapshot(self, step: int) -> None:
        assert self.state is not None
        state = self.state
        self.ring.push(step, lambda reuse: state.capture(reuse))

    def step_begin(self) -> None:
        self._rejected_step = None
        if self.loss_source == "step":
            acc = self.trainer._tr_loss
            self._mark = acc.detach().clone()

    def pre_optimizer_step(self, global_step: int, control: Any) -> dict[str, Any] | None:
        """Judge the step about to be applied (it will become step ``global_step + 1``)."""
        if self.aborted or self.state is None:
            return None
        step = global_step + 1
        loss_t = None
        if self.loss_source == "step" and self._mark is not None:
            loss_t = self.trainer._tr_loss - self._mark
        loss, grad_norm = step_signals(self.state.params, loss_t, check_grads=self.check_grads,
                                       sharded=self.sharded)
        verdict = self.policy.check(step, loss, grad_norm)
        if verdict is None:
            return None
        self._rejected_step = step
        if verdict.trigger == "nonfinite_grad_norm" and self.nan_filter:
            # HF's logging_nan_inf_filter already replaced a NaN/Inf loss of this step by an average: the
            # accumulated value says nothing about the real loss, so it is not reported as one.
            verdict = replace(verdict, loss=None)
        event = self._act(verdict, control)
        self.state.drop_grads()
        if self.loss_source == "step" and self._mark is not None:
            acc = self.trainer._tr_loss
            if not bool(torch_isfinite(acc)):
                median = self.policy.running_median()
                acc.copy_(self._mark + (median if median is not None else 0.0))
        return event

    def step_end(self, global_step: int) -> None:
        if self.aborted or self.state is None or self._rejected_step == global_step:
            return
        if not self.policy.snapshot_due(global_step):
            return
        if self.loss_source == "step":
            self.take_snapshot(global_step)
        else:
            # The loss of this step is judged only at the next on_log: keep the snapshot aside until then, so
            # that a spike found there never restores the very state it produced.
            self._pending = (global_step, self.state.capture(self._spare))
            self._spare = None

    def logged_loss(self, step: int, loss: float | None, control: Any) -> dict[str, Any] | None:
        """Loss triggers from ``on_log`` when the per-step loss is not available."""
        if self.loss_source != "log" or self.aborted or self.state is None or loss is None:
            return None
        verdict = self.policy.check(step, loss, None)
        if verdict is None:
            if self._pending is not None and self._pending[0] <= step:
                pending_step, payload = self._pending
                self._pending = None
                evicted: list[Any] = []

                def keep(reuse: Any) -> Any:
                    evicted.append(reuse)
                    return payload

                self.ring.push(pending_step, keep)
                self._spare = evicted[0] if evicted else None
            return None
        return self._act(verdict, control)

    # -- actions --------------------------------------------------------------------------------------------
    def _act(self, verdict: Verdict, control: Any) -> dict[str, Any]:
        assert self.state is not None
        if self._pending is not None:  # not judged yet: never restored, never kept
            self._spare = self._pending[1]
            self._pending = None
        restored_step, snap = self.ring.choose()
        self.state.restore(snap)
        new_lr: float | None
        if verdict.action == "rollback":
            lrs = scale_lr(self.optimizer, self.scheduler, self.settings.lr_factor)
            self.lr_scale *= self.settings.lr_factor
            new_lr = lrs[0] if lrs else None
        else:
            new_lr = None
            self.abort_reason = (
                f"guard: {verdict.trigger.replace('_', ' ')} at step {verdict.step} after "
                f"{verdict.rollbacks_in_window} rollback(s) within {self.settings.window} steps "
                f"(guard_max_rollbacks={self.settings.max_rollbacks}); restored step {restored_step}")
            control.should_training_stop = True
        event = {
            "action": verdict.action,
            "step": verdict.step,
            "trigger": verdict.trigger,
            "restored_step": restored_step,
            "new_lr": new_lr,
            "lr_scale": self.lr_scale,
            "loss": verdict.loss,
            "grad_norm": verdict.grad_norm,
            "running_median": verdict.running_median,
            "rollbacks": self.policy.rollbacks,
            "rollbacks_in_window": verdict.rollbacks_in_window + (verdict.action == "rollback"),
            "max_rollbacks": self.settings.max_rollbacks,
            "window": self.settings.window,
            "loss_source": self.loss_source,
        }
        self.events.append(event)
        return event
