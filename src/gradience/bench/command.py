"""The one spelling of the "then verify" command that audit and monitor print after a compress suggestion.

Why one place: the advice must name a command that runs as printed (issue 18 item 3), with the user's own
adapter paths; ``BENCH.yaml`` stands for the user's bench config (the task and eval data to verify on).
"""

from __future__ import annotations

import shlex

VERIFY_CONFIG = "BENCH.yaml"


def verify_command(adapter: str, against: str | None = None, config: str = VERIFY_CONFIG) -> str:
    """``gradience bench --config C --peft-dir ADAPTER [--against ORIGINAL]``, each path shell-quoted."""
    cmd = f"gradience bench --config {shlex.quote(config)} --peft-dir {shlex.quote(adapter)}"
    return cmd + (f" --against {shlex.quote(against)}" if against else "")
