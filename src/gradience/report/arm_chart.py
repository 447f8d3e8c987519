"""The bench's Δ-metric-against-parameters chart: one point per arm, labels that never overlap.

Arms of a bench sit at a few parameter shares of the probe (1/16, 1/8, ... of it): on a linear axis they
crowd the left edge, so the x axis is log2 (each halving of the rank one step). Arms at the same share are
dodged sideways so their error bars stay apart. Labels are not put next to their points (eight arms near
Δ = 0 would pile up): they form a column right of the plot, ordered like the points' heights, at least one
line apart (:func:`spread_labels`), each joined to its point by a thin leader line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradience.report.svg import BAD, GOOD, INK, MUTED, figure_to_svg, mpl_context, new_figure

WIDTH_IN = 9.0
LABEL_COL_IN = 2.1        # the label column right of the axes
LABEL_FONT_PT = 7.5
LABEL_GAP_IN = 0.17       # centre-to-centre distance of two labels (the font is ~0.1 in tall)
MAX_LABEL_CHARS = 30      # longer arm names are shortened in the chart (the table has them in full)
DODGE_LOG2 = 0.09         # sideways step between arms at the same share (in log2 units)
LABEL_GID = "gx-arm-label"
MAX_ARMS_DRAWN = 40       # a bench.json with thousands of arms draws the first 40 (the table lists every one)


@dataclass
class ArmPoint:
    """One bench arm for the parameters-vs-metric plot: its size against the probe and its Δ."""

    label: str
    params_ratio: float
    mean_delta: float
    sd_delta: float | None
    passed: bool | None
    control: bool = False


def spread_labels(wanted: Sequence[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label heights as close as possible to ``wanted`` (any order), each pair ≥ ``gap`` apart, inside
    [lo, hi] when they fit (else from ``lo`` up). Returns the heights in the order of ``wanted``."""
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    ys = [min(max(wanted[i], lo), hi) for i in order]
    for j in range(1, len(ys)):                     # push up what is too close to the one below
        ys[j] = max(ys[j], ys[j - 1] + gap)
    if ys and ys[-1] > hi:                          # then pull the column back down from the top
        ys[-1] = hi
        for j in range(len(ys) - 2, -1, -1):
            ys[j] = min(ys[j], ys[j + 1] - gap)
        if ys[0] < lo:                              # no room: stack from the bottom (the figure grows instead)
            ys = [lo + j * gap for j in range(len(ys))]
    out = [0.0] * len(wanted)
    for j, i in enumerate(order):
        out[i] = ys[j]
    return out


def _dodged_x(points: Sequence[ArmPoint]) -> list[float]:
    """log2 x of each point, arms at (nearly) the same share spread symmetrically around it."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(round(math.log2(p.params_ratio) / DODGE_LOG2 / 2), []).append(i)
    xs = [math.log2(p.params_ratio) for p in points]
    for members in groups.values():
        m = len(members)
        for k, i in enumerate(sorted(members, key=lambda i: points[i].label)):
            xs[i] += (k - (m - 1) / 2) * DODGE_LOG2
    return xs


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def params_metric_chart(chart_id: str, points: Sequence[ArmPoint], tolerance: float, higher_is_better: bool,
                        metric: str, n_seeds: int) -> str | None:
    """Δ metric (arm − probe; mean over seeds, bars ± sd) against LoRA parameters as a share of the probe's
    (log2 axis); the tolerance line dashed, PASS green, FAIL red, controls hollow, labels in a column."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    pts = [p for p in points if math.isfinite(p.params_ratio) and p.params_ratio > 0
           and math.isfinite(p.mean_delta)]
    if not pts:
        return None
    shown_note = f" (first {MAX_ARMS_DRAWN} of {len(pts)} arms)" if len(pts) > MAX_ARMS_DRAWN else ""
    pts = pts[:MAX_ARMS_DRAWN]
    probe = ArmPoint("probe", 1.0, 0.0, None, None)
    everyone = [*pts, probe]
    n = len(everyone)
    plot_h = max(2.6, (n + 1) * LABEL_GAP_IN)
    top_in, bottom_in = 0.35, 0.95                      # bottom: x label and a two-row legend
    height = top_in + plot_h + bottom_in
    left_in = 0.85
    axes_right_in = WIDTH_IN - LABEL_COL_IN
    bars = n_seeds > 1 and any(p.sd_delta for p in pts)
    with mpl_context():
        fig = new_figure(WIDTH_IN, height)
        fig.subplots_adjust(left=left_in / WIDTH_IN, right=axes_right_in / WIDTH_IN, top=1 - top_in / height,
                            bottom=bottom_in / height)
        ax = fig.add_subplot()
        ax.set_title(f"Δ {metric} against LoRA parameters{shown_note}")
        ax.set_xlabel("LoRA parameters, share of the probe's (log scale: each step halves the rank)")
        ax.set_ylabel(f"Δ {metric} (arm − probe)")
        bad_side = -tolerance if higher_is_better else tolerance
        ax.axhline(0.0, color=MUTED, linewidth=0.8)
        ax.axhline(bad_side, color=BAD, linestyle="--", linewidth=1.0)
        xs = _dodged_x(everyone)
        for x, p in zip(xs, everyone, strict=True):
            if p is probe:
                ax.plot([x], [0.0], marker="D", markersize=6, color=INK, linewidth=0)
                continue
            color = GOOD if p.passed else (BAD if p.passed is False else MUTED)
            sd = p.sd_delta if bars and p.sd_delta is not None and math.isfinite(p.sd_delta) else 0.0
            ax.errorbar([x], [p.mean_delta], yerr=[[sd], [sd]], fmt="o", markersize=6, color=color, ecolor=color,
                        capsize=3, markerfacecolor="white" if p.control else color, linewidth=1.1)
        ys_all = [v for p in everyone for v in (p.mean_delta - (p.sd_delta or 0.0) * bars,
                                                p.mean_delta + (p.sd_delta or 0.0) * bars)]
        ys_all += [0.0, bad_side]
        y_lo, y_hi = min(ys_all), max(ys_all)
        pad = (y_hi - y_lo) * 0.08 or 0.01
        ax.set_ylim(y_lo - pad, y_hi + pad)
        x_lo, x_hi = min(xs) - 0.5, max(xs) + 0.5
        ax.set_xlim(x_lo, x_hi)
        ticks = list(range(math.floor(x_lo), math.ceil(x_hi) + 1))
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{100 * 2.0 ** v:.3g}%"))
        # Labels: a column right of the axes, in the points' vertical order, one line apart.
        to_fig = fig.transFigure.inverted()
        wanted = [float(to_fig.transform(ax.transData.transform((x, p.mean_delta)))[1])
                  for x, p in zip(xs, everyone, strict=True)]
        gap = LABEL_GAP_IN / height
        placed = spread_labels(wanted, gap, bottom_in / height + gap / 2, 1 - top_in / height - gap / 2)
        label_x = (axes_right_in + 0.3) / WIDTH_IN
        for i, (x, p, y) in enumerate(zip(xs, everyone, placed, strict=True)):
            # The label takes its point's colour, so a label and its point pair up even where lines converge.
            color = INK if p is probe else (GOOD if p.passed else (BAD if p.passed is False else MUTED))
            ann = ax.annotate(_short(p.label), xy=(x, p.mean_delta), xycoords="data", xytext=(label_x, y),
                              textcoords="figure fraction", ha="left", va="center", fontsize=LABEL_FONT_PT,
                              color=color, annotation_clip=False,
                              arrowprops={"arrowstyle": "-", "color": MUTED, "linewidth": 0.5,
                                          "shrinkA": 2, "shrinkB": 4})
            ann.set_gid(f"{LABEL_GID}-{i}")
        handles = [Line2D([], [], marker="o", color=GOOD, linewidth=0, label="PASS"),
                   Line2D([], [], marker="o", color=BAD, linewidth=0, label="FAIL"),
                   Line2D([], [], marker="o", color=MUTED, markerfacecolor="white", linewidth=0,
                          label="control (hollow)"),
                   Line2D([], [], marker="D", color=INK, linewidth=0, label="probe (Δ = 0 by definition)"),
                   Line2D([], [], color=BAD, linestyle="--", label=f"tolerance: FAIL below Δ = {bad_side:+g}"
                          if higher_is_better else f"tolerance: FAIL above Δ = {bad_side:+g}")]
        bar_note = (f"bars: ± 1 sd of Δ over {n_seeds} seeds (points: the mean)" if bars
                    else "one seed: no error bars (per-seed 95% intervals in the table)")
        handles.append(Line2D([], [], color=MUTED, marker="|", markersize=9, linewidth=0, label=bar_note))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.55 / plot_h), ncols=3,
                  fontsize=7.5, borderaxespad=0.0)
        return figure_to_svg(fig, chart_id, "delta against parameters")
