"""Monitor advice about the Guard and about NaNs hidden by HF's logging filter (SPEC §16, §6).

Input: the ``training.guard`` block built by ``gradience.monitor.guard.GuardAnalyzer`` (a plain dict, so the
rules can be tested with hand-written input).
"""

from __future__ import annotations

from typing import Any

from gradience.telemetry.types import Recommendation
from gradience.textfmt import num

MAX_LISTED = 50
GUARD_ACTIONS = ("nan_hidden_by_logging_filter", "guard_rollbacks", "guard_aborted")


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def guard_recommendations(guard: dict[str, Any] | None) -> list[Recommendation]:
    """``nan_hidden_by_logging_filter`` and the guard's own outcome, as monitor recommendations."""
    if not guard:
        return []
    recs: list[Recommendation] = []
    hidden = guard.get("nan_hidden") or {}
    n_hidden = int(hidden.get("count") or 0)
    n_bad_grad = int(guard.get("nonfinite_grad_norm_steps") or 0)
    nan_filter = guard.get("logging_nan_inf_filter")
    if n_hidden or (nan_filter is True and n_bad_grad):
        steps = hidden.get("steps") or []
        listed = steps[:MAX_LISTED]
        all_guarded = bool(listed) and hidden.get("handled_by_guard") == len(listed) and n_hidden == len(listed)
        where = f" (steps {', '.join(str(s) for s in listed[:10])}{' …' if len(listed) > 10 else ''})" \
            if listed else ""
        if n_hidden:
            what = (f"{n_hidden} train step(s) logged a NaN/Inf gradient norm beside a finite loss{where}")
        else:
            what = f"{n_bad_grad} train step(s) logged a NaN/Inf gradient norm"
        tail = ("the guard rolled those steps back." if all_guarded else
                "the optimizer still stepped on them. Rerun with TrainingArguments(logging_nan_inf_filter=False) "
                "to see the real losses, and consider GradienceCallbackConfig(guard=True).")
        recs.append(Recommendation(
            "info" if all_guarded else "warning", "nan_hidden_by_logging_filter",
            f"{what}: Hugging Face's logging_nan_inf_filter"
            f"{' (on in this run)' if nan_filter is True else ' (on by default)'} logs a NaN/Inf loss as the "
            f"running average, so the loss curve hides it; {tail}",
            rationale="A NaN gradient means the loss of that step was not finite (or overflowed in backward); "
                      "the filter only changes what is logged, not what the optimizer does.",
            confidence=0.8 if n_hidden else 0.6, scope="training",
            evidence={"steps_with_hidden_nan": n_hidden, "steps": listed,
                      "nonfinite_grad_norm_steps": n_bad_grad, "logging_nan_inf_filter": nan_filter,
                      "handled_by_guard": hidden.get("handled_by_guard")}))
    actions = guard.get("actions") or {}
    triggers = guard.get("by_trigger") or {}
    trig_text = ", ".join(f"{k} x{v}" for k, v in triggers.items())
    first_steps = [a.get("step") for a in (actions.get("listed") or [])][:10]
    if guard.get("aborted"):
        recs.append(Recommendation(
            "error", "guard_aborted",
            f"The guard stopped training after {guard.get('rollbacks', 0)} rollback(s) ({trig_text}): the run "
            "kept failing from a restored state. Check the data around the steps listed, lower the lr, clip "
            "gradients (max_grad_norm=1.0) or prefer bf16 over fp16.",
            rationale="Repeated failures after a rollback point at a systematic cause (data, lr, precision), "
                      "not a single bad batch.",
            confidence=0.8, scope="training",
            evidence={"rollbacks": guard.get("rollbacks"), "by_trigger": triggers, "steps": first_steps}))
    elif guard.get("rollbacks"):
        scale = guard.get("lr_scale")
        lowered = f" to {num(scale, 'g')}x its schedule" if _float(scale) is not None else ""
        recs.append(Recommendation(
            "warning", "guard_rollbacks",
            f"The guard rolled back {guard['rollbacks']} time(s) ({trig_text}) and lowered the lr{lowered}: the "
            "run finished, but check the data at those steps and start the next run at the lower lr.",
            rationale="Each rollback skipped a batch and restored an earlier state; the final adapter was "
                      "trained with a reduced learning rate from the first rollback on.",
            confidence=0.7, scope="training",
            evidence={"rollbacks": guard.get("rollbacks"), "by_trigger": triggers, "steps": first_steps,
                      "lr_scale": scale, "last_lr": guard.get("last_lr")}))
    return recs
