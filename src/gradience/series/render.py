"""The series table as text (the CLI prints it; the library never prints)."""

from __future__ import annotations

from typing import Any

from gradience.textfmt import num


def render_text(doc: dict[str, Any]) -> str:
    metric = doc.get("metric") or "eval"
    header = ["checkpoint", "step", metric, "util", "stable_r", "k90_p50", "udr_med", "udr_p90"]
    rows = [header]
    for r in doc.get("checkpoints") or []:
        a = r.get("audit") or {}
        rows.append([str(r.get("checkpoint")), str(r.get("step") if r.get("step") is not None else "-"),
                     num((r.get("eval") or {}).get(metric), ".4g"), num(a.get("utilization_mean"), ".3f"),
                     num(a.get("stable_rank_mean"), ".2f"), num(a.get("energy_rank_90_p50"), ".3g"),
                     num(a.get("udr_median"), ".3g"), num(a.get("udr_p90"), ".3g")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["GRADIENCE SERIES", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    suggestion = doc.get("suggestion") or {}
    lines += ["", "Suggested: " + str(suggestion.get("text") or suggestion.get("reason") or "-")]
    if suggestion.get("note"):
        lines.append(f"  ({suggestion['note']})")
    for note in doc.get("notes") or []:
        lines.append(f"note: {note}")
    lines += audit_warnings(doc.get("checkpoints") or [])
    return "\n".join(lines) + "\n"


def audit_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """The audit's warnings and errors (a base model that did not resolve or does not fit, ...), once per
    distinct message with the checkpoints it concerns: without them a '-' in the UDR columns is unexplained."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        audit = r.get("audit") if isinstance(r, dict) else None
        issues = audit.get("issues") if isinstance(audit, dict) else None
        for issue in issues if isinstance(issues, list) else []:
            if not isinstance(issue, dict):
                continue
            key = (str(issue.get("severity")), str(issue.get("code")), str(issue.get("message")))
            seen.setdefault(key, []).append(str(r.get("checkpoint")))
    out = []
    for (severity, code, message), where in seen.items():
        shown = message if len(message) <= 240 else message[:237] + "..."
        names = ", ".join(where[:4]) + (f" (+{len(where) - 4} more)" if len(where) > 4 else "")
        out.append(f"{severity}: {code}: {shown} [{names}]")
    return out
