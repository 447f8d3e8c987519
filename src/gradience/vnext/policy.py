"""``gradience.vnext.policy``: the reference tool's ``check_config(config) -> list of recommendations``.

Its README loops ``for r in check_config(config): print(r.severity, r.action, r.message)``; this returns the
recommendations of this project's pre-flight check (:func:`gradience.policy.check_rules.check_config`, the
same rules ``gradience check`` runs), which carry those three fields.
"""

from __future__ import annotations

from typing import Any

from gradience.telemetry.types import ConfigSnapshot, Recommendation


def check_config(config: ConfigSnapshot | dict[str, Any]) -> list[Recommendation]:
    """The recommendations for ``config`` (a ConfigSnapshot, or a dict normalized into one)."""
    from gradience.policy.check_rules import check_config as run_check

    snapshot = config if isinstance(config, ConfigSnapshot) else ConfigSnapshot.from_dict(dict(config))
    return list(run_check(snapshot).recommendations)


__all__ = ["check_config"]
