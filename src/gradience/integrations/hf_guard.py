"""Guard hooks of the HF callback (SPEC §16): settings, the per-step calls into GuardRuntime, guard events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradience.integrations.hf_config import GradienceCallbackConfig


class GuardHooks:
    """Mixin of :class:`gradience.integrations.hf.GradienceCallback`; the guard logic itself lives in
    :mod:`gradience.integrations.guard` and :mod:`gradience.integrations.guard_runtime`."""

    config: GradienceCallbackConfig
    trainer: Any
    writer: Any
    rollback_guard: Any

    if TYPE_CHECKING:  # provided by GradienceCallback
        def _warn_once(self, kind: str, message: str) -> None: ...
        def _should_write(self, state: Any) -> bool: ...
        def _hook(self, name: str, fn: Any, *a: Any) -> None: ...

    def _guard_settings(self) -> Any:
        from gradience.integrations.guard import GuardSettings

        c = self.config
        return GuardSettings(snapshot_every=c.guard_snapshot_every, ring=c.guard_ring,
                             spike_factor=c.guard_spike_factor, lr_factor=c.guard_lr_factor,
                             max_rollbacks=c.guard_max_rollbacks, window=c.guard_window,
                             loss_source=c.guard_loss_source)

    def _guard_call(self, name: str, fn: Any, *a: Any) -> Any:
        """Run a guard step; a failure disables the guard for the rest of the run (training continues)."""
        try:
            return fn(*a)
        except Exception as exc:
            if self.rollback_guard is not None:
                self.rollback_guard.end()
            self.rollback_guard = None
            self._warn_once("guard", f"guard disabled: {name} failed: {type(exc).__name__}: {exc}")
            return None

    def _guard_begin(self, args: Any, state: Any, kwargs: Mapping[str, Any]) -> None:
        from gradience.integrations.guard_runtime import GuardRuntime

        self.rollback_guard = None
        trainer = self.trainer
        if getattr(trainer, "is_deepspeed_enabled", False):  # FSDP is supported: each rank guards its shards
            self._warn_once("guard", "guard disabled: DeepSpeed partitions the optimizer state inside its engine, "
                                     "out of the guard's reach (FSDP and DDP are supported)")
            return
        optimizer = kwargs.get("optimizer") or getattr(trainer, "optimizer", None)
        if optimizer is None:
            self._warn_once("guard", "guard disabled: the Trainer has no optimizer at on_train_begin")
            return
        runtime = GuardRuntime(self._guard_settings())
        runtime.begin(trainer, optimizer, kwargs.get("lr_scheduler") or getattr(trainer, "lr_scheduler", None),
                      int(state.global_step))
        self.rollback_guard = runtime

    def _guard_emit(self, state: Any, event: dict[str, Any] | None) -> None:
        """An alert plus a ``guard`` metrics event for one action (rank 0 writes)."""
        if event is None or not self._should_write(state):
            return
        from gradience.integrations.guard import alert_for

        severity, code, message = alert_for(event)
        self.writer.alert(severity, code, message, context=event, step=event["step"])
        self.writer.metrics("guard", event, step=event["step"])

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            self._guard_call("on_step_begin", self.rollback_guard.step_begin)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            event = self._guard_call("on_pre_optimizer_step", self.rollback_guard.pre_optimizer_step,
                                     state.global_step, control)
            self._hook("guard", self._guard_emit, state, event)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            self._guard_call("on_step_end", self.rollback_guard.step_end, state.global_step)
