"""``gradience monitor --fail-on`` semantics.

- Comparisons on run metrics: ``gap>1.5``, ``test_acc<0.6``, ``utilization<0.25``, ``nan_losses>0`` … (see
  ``METRICS``); an unknown value (no eval, no audit) never matches.
- Severity flags: ``info`` (any recommendation), ``warning`` (warning or worse), ``error``, ``critical``.
- ``issues`` (any telemetry issue of severity warning or error), ``alerts`` (any logged alert).
- Any other flag must be a recommendation action id (``nan_loss``, ``memorization_detected``, ``early_stop_at``,
  check actions such as ``lower_lr`` …): met when that recommendation was made.
- An unknown comparison metric or flag is a usage error (exit 2) that lists what is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradience.errors import InputError
from gradience.gates import Gate
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
