"""The series view: a ``gradience.series/v1`` document (``gradience series``) as the suggestion, the table, and
eval metric, rank use and UDR over the checkpoints' steps."""

from __future__ import annotations

from typing import Any

from gradience.report.views.base import ChartIds, View
from gradience.report.views.base import fact as _fact
from gradience.series.render import audit_warnings
from gradience.textfmt import finite, num


def _curve(ids: ChartIds, title: str, ylabel: str, lines: list[tuple[str, list[tuple[float, float]]]]) -> str | None:
    from gradience.report.charts import Series, curve_chart
    from gradience.report.curves import Downsampler

    series = []
    colors = ("#2563eb", "#dc2626", "#059669")
    for i, (label, points) in enumerate(lines):
        d = Downsampler()
        for x, y in points:
            d.add(x, y)
        series.append(Series(label, d, colors[i % len(colors)], "points" if len(points) < 3 else "line"))
    return curve_chart(ids.next(), title, ylabel, series)


def series_view(doc: dict[str, Any], ids: ChartIds) -> View:
    metric = str(doc.get("metric") or "-")
    rows_in = [r for r in doc.get("checkpoints") or [] if isinstance(r, dict)]
    raw = doc.get("suggestion")
    suggestion: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rows: list[dict[str, Any]] = []
    eval_pts: list[tuple[float, float]] = []
    util_pts: list[tuple[float, float]] = []
    udr_pts: list[tuple[float, float]] = []
    for r in rows_in:
        a: dict[str, Any] = r["audit"] if isinstance(r.get("audit"), dict) else {}
        ev: dict[str, Any] = r["eval"] if isinstance(r.get("eval"), dict) else {}
        step = finite(r.get("step"))
        value = finite(ev.get(metric))
        rows.append({"checkpoint": str(r.get("checkpoint")), "step": num(r.get("step"), "d") if step is not None
                     else "-", "metric": num(value, ".4g"), "util": num(a.get("utilization_mean"), ".3f"),
                     "stable": num(a.get("stable_rank_mean"), ".2f"), "k90": num(a.get("energy_rank_90_p50"), ".3g"),
                     "udr_med": num(a.get("udr_median"), ".3g"), "udr_p90": num(a.get("udr_p90"), ".3g"),
                     "best": r.get("checkpoint") == suggestion.get("checkpoint")})
        if step is None:
            continue
        for pts, v in ((eval_pts, value), (util_pts, finite(a.get("utilization_mean"))),
                       (udr_pts, finite(a.get("udr_median")))):
            if v is not None:
                pts.append((step, v))
    cards = [_fact("Suggested checkpoint", str(suggestion.get("checkpoint") or "none"),
                   f"best {metric}" if suggestion.get("checkpoint") else str(suggestion.get("reason") or ""),
                   "good" if suggestion.get("checkpoint") else ""),
             _fact("Checkpoints", str(len(rows_in))),
             _fact(f"Best {metric}", num(suggestion.get("value"), ".4g"), str(doc.get("mode") or ""))]
    context = {
        "cards": cards, "rows": rows, "metric": metric, "text": str(suggestion.get("text") or ""),
        "note": str(suggestion.get("note") or ""),
        # the notes and the audit's warnings (why a UDR cell is empty), as the text table prints them
        "notes": ([str(n) for n in doc.get("notes") or []] + audit_warnings(rows_in))[:20],
        "eval_svg": _curve(ids, f"{metric} over steps", metric, [(metric, eval_pts)]),
        "audit_svg": _curve(ids, "rank use and UDR over steps", "value",
                            [("utilization (mean)", util_pts), ("UDR (median)", udr_pts)]),
    }
    return View("series", "Checkpoint series", "views/series.html.j2", context)
