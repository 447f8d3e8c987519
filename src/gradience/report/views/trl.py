"""The TRL view: monitor's ``trl`` block (src/gradience/monitor/trl.py) as one table per TRL trainer group, plus
small multiples of each group's headline metrics drawn by the run view's chart code.

Why a section of its own: a DPO or GRPO run's story is in the reward margins, accuracies, reward and KL that
TRL logs, not in the Trainer's loss. Like monitor, the page states these as facts (first, last, min/max with
their steps, the trend of the last window); no advice is derived. A run without TRL metrics gets no section.
"""

from __future__ import annotations

import math
from typing import Any

from gradience.monitor.trl import HEADLINE, group_of
from gradience.report import charts
from gradience.report.curves import TRL_CHARTS, Downsampler, RunCurves
from gradience.report.views.base import ChartIds, View
from gradience.textfmt import safe_text

MAX_ROWS_PER_SIDE = 40   # metric rows per group and side on the page; all of them are in monitor --json
_PERCENT = frozenset({"rewards/accuracies", "accuracy", "mean_token_accuracy"})  # fractions in [0, 1]


def _v(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, ".4g")


def _at(value: Any, step: Any) -> str:
    return f"{_v(value)} @ {step}" if step is not None else _v(value)


def _row(name: str, m: dict[str, Any]) -> dict[str, Any]:
    trend = m.get("trend") or None
    return {
        "name": safe_text(name, max_len=80),
        "n": m.get("n", 0), "nonfinite": m.get("nonfinite", 0),
        "first": _at(m.get("first"), m.get("first_step")), "last": _at(m.get("last"), m.get("last_step")),
        "min": _at(m.get("min"), m.get("min_step")), "max": _at(m.get("max"), m.get("max_step")),
        "direction": trend.get("direction", "-") if trend else "-",
        "change": f"{trend['change']:+.4g} over steps {trend['from_step']}–{trend['to_step']}"
        if trend and isinstance(trend.get("change"), (int, float)) and math.isfinite(trend["change"]) else "",
    }


def _ordered(names: list[str]) -> list[str]:
    """Headline names first (monitor's text order), then the rest by name."""
    return [n for n in HEADLINE if n in names] + sorted(n for n in names if n not in HEADLINE)


def _sides(block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sides: list[tuple[str, dict[str, Any]]] = []
    if isinstance(block.get("train"), dict):
        sides.append(("train", block["train"]))
    for split, side in sorted((block.get("eval") or {}).items()):
        if isinstance(side, dict):
            sides.append((f"eval: {safe_text(str(split), max_len=60)}", side))
    return sides


def _steps(side: dict[str, Any]) -> str:
    first, last = side.get("first_step"), side.get("last_step")
    return f"step {first}" if first == last else f"steps {first}–{last}"


def _chart(ids: ChartIds, name: str, curves: RunCurves) -> str | None:
    """One small multiple: the train curve and each eval split's points of one metric."""
    series: list[charts.Series] = []
    train = curves.trl.get(name)
    if train is not None:
        series.append(charts.Series("train", train, charts.ACCENT))
    evals: list[tuple[str, Downsampler]] = sorted(
        (split, d[name]) for split, d in curves.trl_eval.items() if name in d)
    for j, (split, d) in enumerate(evals):
        series.append(charts.Series(f"eval: {split}", d, charts.SERIES[(j + 1) % len(charts.SERIES)], "points"))
    if not series:
        return None
    return charts.curve_chart(ids.next(), name, name, series, width_in=charts.HALF_WIDTH_IN, log_y=False,
                              percent=name in _PERCENT)


def trl_view(block: dict[str, Any] | None, curves: RunCurves, ids: ChartIds) -> View | None:
    """The section for monitor's ``trl`` block; None when the run logged no TRL metric (no section)."""
    if not isinstance(block, dict) or not block:
        return None
    group_info: dict[str, Any] = block.get("groups") or {}
    sides = _sides(block)
    groups = []
    for key, info in group_info.items():
        if not isinstance(info, dict):
            continue
        tables = []
        for label, side in sides:
            names = [n for n in (side.get("groups") or {}).get(key) or [] if n in (side.get("metrics") or {})]
            if not names:
                continue
            ordered = _ordered(names)
            shown = ordered[:MAX_ROWS_PER_SIDE]
            tables.append({"label": label, "steps": _steps(side), "records": side.get("records", 0),
                           "rows": [_row(n, side["metrics"][n]) for n in shown],
                           "more": len(ordered) - len(shown)})
        svgs, elsewhere = [], []
        for name in TRL_CHARTS.get(key, ()):
            svg = _chart(ids, name, curves)
            if svg is not None:
                svgs.append(svg)
                if group_of(name) != key:  # GRPO's kl: charted with GRPO, its row is with the shared names
                    other = group_info.get(group_of(name)) or {}
                    elsewhere.append(f"{name}: its row is under {other.get('trainers') or group_of(name)}")
        groups.append({"key": key, "trainers": str(info.get("trainers") or key),
                       "source": str(info.get("source") or ""), "tables": tables, "chart_svgs": svgs,
                       "elsewhere": elsewhere})
    not_listed = sum(int(side.get("names_not_listed") or 0) for _, side in sides)
    context = {"groups": groups, "note": str(block.get("note") or ""), "not_listed": not_listed}
    return View("trl", "TRL metrics", "views/trl.html.j2", context)
