"""What ``monitor`` says about the Guard and about NaNs the logs may hide (SPEC §16, §6).

- **Guard actions**: the ``metrics`` events of kind ``guard`` written by ``GradienceCallbackConfig(guard=True)``
  (rollbacks and a final abort), and the guard settings from ``run_start.meta.guard``.
- **Hidden NaNs**: Hugging Face's ``logging_nan_inf_filter=True`` (the default) logs a NaN/Inf step loss as
  the running average while the optimizer step still happens, so the loss curve looks healthy. A NaN/Inf
  *gradient norm* cannot be filtered that way: a non-finite grad norm logged beside a finite loss, or any
  non-finite grad norm in a run whose TrainingArguments say ``logging_nan_inf_filter=True``, gives the warning
  ``nan_hidden_by_logging_filter``.

Memory is bounded: at most ``MAX_LISTED`` actions/steps are kept, the rest are counted. The advice built on
this summary lives in ``gradience.policy.guard_rules`` (policy never imports monitor).
"""

from __future__ import annotations

import math
from typing import Any

from gradience.textfmt import num

MAX_LISTED = 50


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


class GuardAnalyzer:
    """Fed by ``RunAnalyzer``: run_start, guard metrics events and train_step events of one run."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] | None = None
        self.nan_filter: bool | None = None
        self.actions: list[dict[str, Any]] = []
        self.n_actions = 0
        self.rollbacks = 0
        self.aborts = 0
        self.by_trigger: dict[str, int] = {}
        self.last_lr: float | None = None
        self.lr_scale: float | None = None
        self.action_steps: set[int] = set()
        self.nonfinite_grad = 0
        self.hidden_steps: list[int] = []   # non-finite grad norm logged with a finite loss
        self.n_hidden = 0

    def feed_start(self, data: dict[str, Any]) -> None:
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        assert isinstance(meta, dict)
        guard = meta.get("guard")
        self.settings = guard if isinstance(guard, dict) else None
        flag = _bool(meta.get("logging_nan_inf_filter"))
        if flag is None:
            config = data.get("config") if isinstance(data.get("config"), dict) else {}
            assert isinstance(config, dict)
            for block in (config.get("training"), config):
                extras = block.get("extras") if isinstance(block, dict) else None
                if isinstance(extras, dict) and _bool(extras.get("logging_nan_inf_filter")) is not None:
                    flag = _bool(extras.get("logging_nan_inf_filter"))
                    break
        self.nan_filter = flag

    def feed_action(self, step: int | None, metrics: dict[str, Any]) -> None:
        self.n_actions += 1
        action = str(metrics.get("action") or "rollback")
        trigger = str(metrics.get("trigger") or "unknown")
        if action == "abort":
            self.aborts += 1
        else:
            self.rollbacks += 1
        self.by_trigger[trigger] = self.by_trigger.get(trigger, 0) + 1
        s = metrics.get("step", step)
        s = s if isinstance(s, int) and not isinstance(s, bool) else step
        if s is not None and len(self.action_steps) < 100_000:
            self.action_steps.add(s)
        lr = _float(metrics.get("new_lr"))
        if lr is not None:
            self.last_lr = lr
        scale = _float(metrics.get("lr_scale"))
        if scale is not None:
            self.lr_scale = scale
        if len(self.actions) < MAX_LISTED:
            self.actions.append({"step": s, "action": action, "trigger": trigger,
                                 "restored_step": metrics.get("restored_step"), "new_lr": lr,
                                 "loss": _float(metrics.get("loss")), "grad_norm": _float(metrics.get("grad_norm"))})

    def feed_train_step(self, step: int | None, data: dict[str, Any]) -> None:
        grad = data.get("grad_norm")
        if type(grad) is not float or grad - grad == 0.0:  # only non-finite floats matter here (hot path)
            return
        self.nonfinite_grad += 1
        loss = _float(data.get("loss"))
        if loss is not None and math.isfinite(loss):
            self.n_hidden += 1
            if len(self.hidden_steps) < MAX_LISTED and step is not None:
                self.hidden_steps.append(step)

    def summary(self) -> dict[str, Any]:
        hidden_guarded = sum(1 for s in self.hidden_steps if s in self.action_steps)
        return {
            "enabled": self.settings is not None or self.n_actions > 0,
            "settings": self.settings,
            "actions": {"count": self.n_actions, "listed": list(self.actions)},
            "rollbacks": self.rollbacks,
            "aborted": self.aborts > 0,
            "by_trigger": dict(sorted(self.by_trigger.items())),
            "last_lr": self.last_lr,
            "lr_scale": self.lr_scale,
            "logging_nan_inf_filter": self.nan_filter,
            "nonfinite_grad_norm_steps": self.nonfinite_grad,
            "nan_hidden": {"count": self.n_hidden, "steps": list(self.hidden_steps),
                           "handled_by_guard": hidden_guarded if self.hidden_steps else 0},
        }


def guard_lines(guard: dict[str, Any] | None) -> list[str]:
    """The text block ``Guard:`` (empty when the run had no guard and nothing was hidden)."""
    if not guard:
        return []
    hidden = guard.get("nan_hidden") or {}
    if not guard.get("enabled") and not hidden.get("count"):
        return []
    lines = ["Guard:"]
    settings = guard.get("settings")
    if isinstance(settings, dict):
        lines.append(f"  Settings: snapshot every {settings.get('snapshot_every', '-')} steps (ring "
                     f"{settings.get('ring', '-')}), spike > {num(settings.get('spike_factor'), 'g')}x median, "
                     f"lr x{num(settings.get('lr_factor'), 'g')} per rollback, max "
                     f"{settings.get('max_rollbacks', '-')} rollbacks / {settings.get('window', '-')} steps, "
                     f"loss from {settings.get('loss_source', '-')}")
    elif guard.get("enabled"):
        lines.append("  Settings: - (not in run_start)")
    if guard.get("enabled"):
        actions = guard.get("actions") or {}
        lines.append(f"  Rollbacks: {guard.get('rollbacks', 0)}"
                     + ("; stopped training (aborted)" if guard.get("aborted") else ""))
        for a in (actions.get("listed") or [])[:10]:
            lr = f", lr -> {num(a.get('new_lr'), '.3g')}" if a.get("new_lr") is not None else ""
            lines.append(f"    step {a.get('step')}: {a.get('action')} on {a.get('trigger')}, restored step "
                         f"{a.get('restored_step')}{lr}")
        more = int(actions.get("count") or 0) - min(10, len(actions.get("listed") or []))
        if more > 0:
            lines.append(f"    … {more} more (see --json)")
    if hidden.get("count"):
        lines.append(f"  NaN hidden by logging filter: {hidden['count']} step(s) with a NaN/Inf grad norm and a "
                     "finite logged loss")
    return lines
