"""``gradience monitor --fail-on`` semantics.

- Comparisons on run metrics: ``gap>1.5``, ``test_acc<0.6``, ``utilization<0.25``, ``nan_losses>0`` … (see
  ``METRICS``).
- Severity flags: ``info`` (any recommendation), ``warning`` (warning or worse), ``error``, ``critical``.
- ``issues`` (any telemetry issue of severity warning or error), ``alerts`` (any logged alert).
- Any other flag must be a recommendation action id (``nan_loss``, ``memorization_detected``, ``early_stop_at``,
  check actions such as ``lower_lr`` …): met when that recommendation was made.
- An unknown comparison metric or flag is a usage error (exit 2) that lists what is known.
- A gate never passes by default (SPEC §3.4): a comparison whose value the log does not provide (``gap>1.5``
  without a train and a test eval, ``utilization<0.25`` without a ``lora_audit`` event, ``nan_losses>0``
  without any ``train_step``) and an action flag whose signal is absent (``memorization_detected`` without a
  gap, ``compress_rank`` without an audit, ``early_stop_at`` without test evals) are usage errors (exit 2)
  naming the rule and what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradience.errors import InputError
from gradience.gates import Gate, require_available
from gradience.monitor.core import MonitorReport
from gradience.telemetry.types import SEVERITY_RANK
from gradience.textfmt import finite


def _count(block: Any) -> int:
    return int(block.get("count", 0)) if isinstance(block, dict) else 0


def _audit(key: str) -> Callable[[MonitorReport], Any]:
    return lambda rep: (rep.audit or {}).get(key)


METRICS: dict[str, Callable[[MonitorReport], Any]] = {
    "gap": lambda rep: rep.signals.get("gap"),
    "train_ppl": lambda rep: rep.signals.get("train_ppl"),
    "test_ppl": lambda rep: rep.signals.get("test_ppl"),
    "train_acc": lambda rep: rep.signals.get("train_accuracy"),
    "test_acc": lambda rep: rep.signals.get("test_accuracy"),
    "steps": lambda rep: rep.training.get("steps_logged"),
    "last_loss": lambda rep: rep.training.get("last_loss"),
    "min_loss": lambda rep: rep.training.get("min_loss"),
    "grad_norm_max": lambda rep: rep.training.get("grad_norm_max"),
    "nan_losses": lambda rep: _count(rep.training.get("nonfinite_loss")),
    "loss_spikes": lambda rep: _count(rep.training.get("loss_spikes")),
    "grad_explosions": lambda rep: _count(rep.training.get("grad_explosions")),
    "utilization": _audit("utilization_mean"),
    "utilization_mean": _audit("utilization_mean"),
    "stable_rank": _audit("stable_rank_mean"),
    "stable_rank_mean": _audit("stable_rank_mean"),
    "energy_rank_90_p50": _audit("energy_rank_90_p50"),
    "energy_rank_90_p90": _audit("energy_rank_90_p90"),
    "suggested_r_global_median": _audit("suggested_r_global_median"),
    "suggested_r_global_90": _audit("suggested_r_global_90"),
    "udr_median": _audit("udr_median"),
    "recommendations": lambda rep: len(rep.recommendations),
    "alerts": lambda rep: rep.alerts.get("total", 0),
    "telemetry_issues": lambda rep: len(rep.telemetry_issues),
}
SEVERITY_FLAGS = ("info", "warning", "error", "critical")

_NO_AUDIT = ("the log has no lora_audit metrics event; add one with "
             "'gradience audit --peft-dir ADAPTER_DIR --append RUN.jsonl'")
_NO_STEPS = "the log has no train_step events with a loss"


def _why_no_gap(rep: MonitorReport) -> str | None:
    sig = rep.signals
    if finite(sig.get("gap")) is not None:
        return None
    if not sig.get("train"):
        return "the log has no 'train' split eval (log train loss/ppl, e.g. with the callback's train eval)"
    if not sig.get("test"):
        return "the log has no test/val/eval split eval"
    return "the latest train or test eval has no usable loss or ppl"


def _why_eval_value(split: str, key: str, label: str) -> Callable[[MonitorReport], str | None]:
    def why(rep: MonitorReport) -> str | None:
        block = rep.signals.get(split)
        if not block:
            return f"the log has no {'train' if split == 'train' else 'test/val/eval'} split eval"
        return None if finite(block.get(key)) is not None else f"the latest {block.get('split')} eval has no {label}"
    return why


def _why_steps(rep: MonitorReport) -> str | None:
    return None if rep.training.get("steps_logged") else _NO_STEPS


def _why_grad_norm(rep: MonitorReport) -> str | None:
    if not rep.training.get("steps_logged"):
        return _NO_STEPS
    return None if finite(rep.training.get("grad_norm_max")) is not None else "no train_step logged a grad_norm"


def _why_audit(key: str) -> Callable[[MonitorReport], str | None]:
    def why(rep: MonitorReport) -> str | None:
        if rep.audit is None:
            return _NO_AUDIT
        if finite(rep.audit.get(key)) is not None:
            return None
        if key.startswith(("udr", "sdi", "fraction_udr")):
            return f"the last lora_audit event has no {key} (UDR was not computed: audit with --base-model)"
        return f"the last lora_audit event has no {key}"
    return why


def _why_test_history(rep: MonitorReport) -> str | None:
    return None if rep.signals.get("test") else "the log has no test/val/eval split eval"


# What each comparison metric / action flag needs from the log; None from the function means available.
WHY_MISSING: dict[str, Callable[[MonitorReport], str | None]] = {
    "gap": _why_no_gap, "train_ppl": _why_eval_value("train", "ppl", "loss or ppl"),
    "test_ppl": _why_eval_value("test", "ppl", "loss or ppl"),
    "train_acc": _why_eval_value("train", "accuracy", "accuracy"),
    "test_acc": _why_eval_value("test", "accuracy", "accuracy"),
    "steps": lambda rep: None, "last_loss": _why_steps, "min_loss": _why_steps, "nan_losses": _why_steps,
    "loss_spikes": _why_steps, "grad_norm_max": _why_grad_norm, "grad_explosions": _why_grad_norm,
    **{name: _why_audit(key) for name, key in (
        ("utilization", "utilization_mean"), ("utilization_mean", "utilization_mean"),
        ("stable_rank", "stable_rank_mean"), ("stable_rank_mean", "stable_rank_mean"),
        ("energy_rank_90_p50", "energy_rank_90_p50"), ("energy_rank_90_p90", "energy_rank_90_p90"),
        ("suggested_r_global_median", "suggested_r_global_median"),
        ("suggested_r_global_90", "suggested_r_global_90"), ("udr_median", "udr_median"))},
    # action flags whose rule reads a signal the log may not have
    "memorization_detected": _why_no_gap, "possible_underfitting": _why_no_gap,
    "low_utilization": _why_audit("utilization_mean"), "compress_rank": _why_audit("utilization_mean"),
    "compress_mlp_targets": _why_audit("utilization_mean"), "nan_loss": _why_steps,
    "loss_spikes_flag": _why_steps, "grad_explosion": _why_grad_norm, "early_stop_at": _why_test_history,
}


def why_missing(gate: Gate, report: MonitorReport) -> str | None:
    """None when ``gate`` can be decided on this run; else what the log lacks."""
    if gate.is_flag:
        key = "loss_spikes_flag" if gate.metric == "loss_spikes" else gate.metric
        fn = WHY_MISSING.get(key)
        return None if fn is None else fn(report)
    fn = WHY_MISSING.get(gate.metric)
    if fn is not None:
        return fn(report)
    return None if finite(METRICS[gate.metric](report)) is not None else "it was not computed for this run"


def validate_gates(gates: Sequence[Gate]) -> None:
    """Reject unknown metrics and unknown flags (a typo must not silently never fire)."""
    from gradience.policy.check_rules import ACTIONS as CHECK_ACTIONS
    from gradience.policy.run_rules import RUN_ACTIONS

    known_flags = (*SEVERITY_FLAGS, "issues", "alerts", *RUN_ACTIONS, *CHECK_ACTIONS)
    for gate in gates:
        if not gate.is_flag and gate.metric not in METRICS:
            raise InputError(f"--fail-on: unknown metric '{gate.metric}' (known: {', '.join(METRICS)})")
        if gate.is_flag and gate.metric not in known_flags:
            raise InputError(f"--fail-on: unknown flag '{gate.metric}' (a severity: {', '.join(SEVERITY_FLAGS)}; "
                             f"'issues'; 'alerts'; or a recommendation action id such as "
                             f"{', '.join(RUN_ACTIONS[:4])}, ...)")


def evaluate_gates(gates: Sequence[Gate], report: MonitorReport) -> list[str]:
    """One message per met rule (empty when none is met)."""
    validate_gates(gates)
    require_available(gates, lambda gate: why_missing(gate, report))
    met: list[str] = []
    for gate in gates:
        if not gate.is_flag:
            value = finite(METRICS[gate.metric](report))
            if value is not None and gate.compare(value):
                met.append(f"{gate.text}: {gate.metric} = {value:g}")
            continue
        flag = gate.metric
        if flag in SEVERITY_FLAGS:
            floor = SEVERITY_RANK[flag]
            hits = [r.action for r in report.recommendations if SEVERITY_RANK.get(r.severity, 0) >= floor]
            if hits:
                met.append(f"{gate.text}: {len(hits)} recommendation(s) at {flag} or above ({', '.join(hits)})")
        elif flag == "issues":
            bad = [i for i in report.telemetry_issues if i.severity in ("warning", "error")]
            if bad:
                met.append(f"{gate.text}: {len(bad)} telemetry issue(s)")
        elif flag == "alerts":
            if report.alerts.get("total"):
                met.append(f"{gate.text}: {report.alerts['total']} alert(s) logged")
        else:
            rec = next((r for r in report.recommendations if r.action == flag), None)
            if rec is not None:
                met.append(f"{gate.text}: [{rec.severity}] {rec.message}")
    return met
