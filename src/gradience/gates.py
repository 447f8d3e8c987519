"""``--fail-on`` gate rules shared by audit, monitor and check.

A rule is either a comparison ``<metric><op><number>`` (``utilization<0.25``, ``udr>1.0``, ``gap>=2``) or a
bare flag (``zero_update``, ``issues``, ``error``, ``warning``). Several rules are separated by commas or given
as several arguments. Each command decides what metrics and flags mean for it; this module parses, compares
and owns the one rule every command shares (SPEC §3.4): **a gate never passes by default**. A rule whose
metric could not be computed is not "not met": :func:`require_available` turns it into a usage error (exit 2)
that names the rule and why the metric is missing.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gradience.errors import InputError

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
    "=": operator.eq, "!=": operator.ne,
}
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>|=)\s*([-+0-9.eE]+|inf|nan)\s*$")
_FLAG = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str | None = None
    threshold: float | None = None

    @property
    def is_flag(self) -> bool:
        return self.op is None

    def compare(self, value: float) -> bool:
        assert self.op is not None and self.threshold is not None
        return _OPS[self.op](value, self.threshold)


def parse_gates(specs: Iterable[str] | str | None) -> list[Gate]:
    """Parse ``--fail-on`` values; an unparsable rule is a usage error (exit 2)."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    gates: list[Gate] = []
    for spec in specs:
        for part in spec.split(","):
            text = part.strip()
            if not text:
                continue
            m = _RULE.match(text)
            if m:
                try:
                    threshold = float(m.group(3))
                except ValueError:
                    raise InputError(f"--fail-on: cannot read the number in rule '{text}'") from None
                gates.append(Gate(text, m.group(1), m.group(2), threshold))
                continue
            m = _FLAG.match(text)
            if m:
                gates.append(Gate(text, m.group(1)))
                continue
            raise InputError(f"--fail-on: cannot parse rule '{text}' (expected e.g. 'utilization<0.25' or a flag)")
    return gates


def missing_metric_error(gate: Gate, why: str) -> InputError:
    """The error for a rule that cannot be evaluated because its metric (or signal) is missing."""
    return InputError(f"--fail-on: rule '{gate.text}' cannot be evaluated: {gate.metric} was not computed ({why}); "
                      "a gate on a missing metric never passes")


def require_available(gates: Sequence[Gate], why_missing: Callable[[Gate], str | None]) -> None:
    """Raise :func:`missing_metric_error` for the first gate whose ``why_missing`` gives a reason.

    ``why_missing(gate)`` returns None when the gate's metric is available, else a short reason such as
    "no base model was resolved; pass --base-model DIR_OR_ID". Commands call this before printing anything,
    so a CI job never reads a report and an exit 0 from a rule that was never checked.
    """
    for gate in gates:
        why = why_missing(gate)
        if why is not None:
            raise missing_metric_error(gate, why)
