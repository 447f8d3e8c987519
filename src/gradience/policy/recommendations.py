"""Ordering and de-duplication of recommendations, the same for check and monitor, text and JSON."""

from __future__ import annotations

from collections.abc import Iterable

from gradience.telemetry.types import SEVERITY_RANK, Recommendation


def dedupe_and_sort(recs: Iterable[Recommendation]) -> list[Recommendation]:
    """Keep one recommendation per action (the more severe; on a tie the first), sorted by severity
    (most severe first) then action id."""
    best: dict[str, Recommendation] = {}
    for rec in recs:
        kept = best.get(rec.action)
        if kept is None or SEVERITY_RANK.get(rec.severity, 0) > SEVERITY_RANK.get(kept.severity, 0):
            best[rec.action] = rec
    return sorted(best.values(), key=lambda r: (-SEVERITY_RANK.get(r.severity, 0), r.action))
