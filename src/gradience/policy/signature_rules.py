"""Monitor alerts for the run-failure signatures (issue 18 item 5), from ``training.failure_signatures`` built by
:mod:`gradience.monitor.signatures` (a plain dict, so each rule is testable with hand-written input).

Each is a finding (warning or error: it sets the run's status) with a stable action id and the source of the
mechanism it names.
"""

from __future__ import annotations

from typing import Any

from gradience.policy import sources as S
from gradience.telemetry.types import Recommendation

SIGNATURE_ACTIONS: tuple[str, ...] = (
    "nan_loss_logged_as_zero", "clipping_saturated", "frozen_adapter", "lr_zero_after_warmup", "eval_loss_nan",
)


def _steps(findings: dict[str, Any], limit: int = 10) -> list[Any]:
    return [item.get("step") for item in findings.get("listed", [])][:limit]


def signature_recommendations(signatures: dict[str, Any] | None) -> list[Recommendation]:
    """One recommendation per signature found."""
    if not signatures:
        return []
    recs: list[Recommendation] = []
    zero = signatures.get("nan_loss_logged_as_zero") or {}
    if zero.get("count"):
        steps = _steps(zero)
        recs.append(Recommendation(
            "error", "nan_loss_logged_as_zero",
            f"{zero['count']} logged step(s) show loss 0 with a NaN/Inf gradient norm (first at step {steps[0]}): "
            "every step in those logging windows produced a NaN loss, which Hugging Face's logging_nan_inf_filter "
            "logs as the window's running average (0). The run is diverged, not converged: lower the lr, use bf16 "
            "instead of fp16, check for batches whose labels are all masked (-100), and rerun with "
            "logging_nan_inf_filter=False to see the real losses.",
            rationale="A loss of exactly 0 beside a non-finite gradient is not a perfect fit: a real zero loss "
                      "has zero, not NaN, gradients.",
            confidence=0.85, scope="training", evidence={"count": zero["count"], "steps": steps},
            source=S.HF_TRAINER))
    clip = signatures.get("clipping") or {}
    window = clip.get("first_window")
    if window:
        limit = clip.get("max_grad_norm")
        recs.append(Recommendation(
            "warning", "clipping_saturated",
            f"The gradient norm was at or above max_grad_norm={limit:g} ({clip.get('max_grad_norm_source')}) on "
            f"{window['steps']} logged steps in a row (steps {window['from_step']}-{window['to_step']}; "
            f"{clip.get('steps_hit')} of {clip.get('grad_steps')} logged steps clipped): every update is rescaled, "
            "so the lr no longer sets the step size. Lower the lr (or check the loss scale) until most steps are "
            "below the clip.",
            rationale="Clipping is a guard against rare spikes; when it acts on every step, training runs as "
                      "normalized-gradient descent and the schedule's lr stops meaning what it says.",
            confidence=0.6, scope="optimizer",
            evidence={"max_grad_norm": limit, "max_grad_norm_source": clip.get("max_grad_norm_source"),
                      "window": clip.get("window"), "first_window": dict(window), "longest": clip.get("longest"),
                      "steps_clipped": clip.get("steps_hit"), "grad_steps": clip.get("grad_steps")},
            source=S.HF_TRAINER))
    frozen = signatures.get("zero_grad_norm") or {}
    window = frozen.get("first_window")
    if window:
        recs.append(Recommendation(
            "error", "frozen_adapter",
            f"The gradient norm was exactly 0 on {window['steps']} logged steps in a row (steps "
            f"{window['from_step']}-{window['to_step']}): no trainable parameter receives a gradient, so the "
            "adapter is not learning. Check model.print_trainable_parameters(), that the loss depends on the "
            "adapted modules, and with gradient checkpointing call model.enable_input_require_grads().",
            rationale="Any trainable parameter on the loss's path gives a non-zero gradient norm; exactly 0 "
                      "means the graph does not reach the adapter (or both LoRA factors are zero).",
            confidence=0.85, scope="training",
            evidence={"window": frozen.get("window"), "first_window": dict(window), "longest": frozen.get("longest"),
                      "grad_steps": frozen.get("grad_steps")},
            source=S.HEURISTIC))
    lr_zero = signatures.get("lr_zero_after_warmup")
    if lr_zero:
        recs.append(Recommendation(
            "warning", "lr_zero_after_warmup",
            f"The learning rate reached exactly 0 at step {lr_zero['first_zero_step']} and training went on for "
            f"{lr_zero['steps_logged_after']} more logged step(s): those steps changed nothing. The scheduler was "
            "probably built for fewer steps than the run takes (num_training_steps vs max_steps / epochs, or a "
            "resumed run).",
            rationale="Linear and cosine schedules reach 0 exactly at their last step; a zero lr before the run "
                      "ends means the schedule and the run disagree on its length.",
            confidence=0.7, scope="optimizer", evidence=dict(lr_zero), source=S.HF_SCHEDULER))
    bad_eval = signatures.get("eval_loss_nan") or {}
    if bad_eval.get("count"):
        first = (bad_eval.get("listed") or [{}])[0]
        recs.append(Recommendation(
            "error", "eval_loss_nan",
            f"{bad_eval['count']} eval(s) logged a NaN/Inf {first.get('split')} loss while the train loss was "
            f"finite (first at step {first.get('step')}, train loss {first.get('train_loss')}): the held-out "
            "numbers are unusable. Check that eval labels are not all masked (-100), the eval collator, and fp16 "
            "overflow in eval (use bf16 or fp32 eval).",
            rationale="A model whose train loss is finite gives a finite loss on held-out data unless the eval "
                      "batch itself is degenerate or overflows.",
            confidence=0.8, scope="eval",
            evidence={"count": bad_eval["count"], "steps": _steps(bad_eval), "split": first.get("split")},
            source=S.HF_TRAINER))
    return recs
