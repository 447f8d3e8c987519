"""The report's matplotlib charts: training curves, singular-value spectra, the UDR histogram.

Each function takes plain data (what :mod:`gradience.report.curves` collected, audit rows) and returns an
inline SVG string, or None when there is nothing to draw (the page then says so in words). Non-finite values
never reach matplotlib as numbers to plot: NaN/Inf steps become gaps and red ticks on the x axis; values far
off the typical range are clipped to the top edge and marked, so one explosion does not flatten the curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradience import stats
from gradience.report.curves import Downsampler
from gradience.report.svg import (
    ACCENT,
    ACCENT_LIGHT,
    BAD,
    GOOD,
    INK,
    MUTED,
    SERIES,
    WARN,
    figure_to_svg,
    mpl_context,
    new_figure,
)

FULL_WIDTH_IN = 10.0
HALF_WIDTH_IN = 5.0
CURVE_HEIGHT_IN = 2.8
OFFSCALE_FACTOR = 1.0   # values above p98 + this x (p98 - min) are drawn clipped at the top edge
PLOT_LIMIT = 1e300      # |values| beyond this are drawn at it: axis spans and paddings of ±1e308 overflow to inf


@dataclass
class Series:
    label: str
    data: Downsampler
    color: str = ACCENT
    style: str = "line"        # "line" (train curves) or "points" (evals: few points, markers)


@dataclass
class Mark:
    """A finding to draw on a curve: points (spikes), or vertical lines (overfitting onset, best step)."""

    label: str
    kind: str                  # "points" | "vline"
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    color: str = BAD
    linestyle: str = "--"


def _clamp(v: float) -> float:
    return min(PLOT_LIMIT, max(-PLOT_LIMIT, v))


def _curve_xy(d: Downsampler) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, lo, hi) per bucket; NaN where a bucket holds no finite value (a gap in the line)."""
    xs, mean, lo, hi = [], [], [], []
    for b in d.buckets:
        xs.append(_clamp(b.x_first if d.exact else b.x_mid))
        if b.n:
            mean.append(_clamp(b.mean))
            lo.append(_clamp(b.lo))
            hi.append(_clamp(b.hi))
        else:
            mean.append(math.nan)
            lo.append(math.nan)
            hi.append(math.nan)
    return xs, mean, lo, hi


def _margins(fig: Any, width_in: float, height_in: float, *, left: float = 0.75, right: float = 0.2,
             top: float = 0.35, bottom: float = 0.5, wspace: float = 0.08) -> None:
    """Fixed margins in inches (``tight_layout`` costs ~10x the drawing itself on log axes)."""
    fig.subplots_adjust(left=left / width_in, right=1 - right / width_in, top=1 - top / height_in,
                        bottom=bottom / height_in, wspace=wspace)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _y_limits(values: list[float]) -> tuple[float, float, bool] | None:
    """(bottom, top, clipped): top is lowered to a robust bound when a few values are far above the rest."""
    if not values:
        return None
    values = [_clamp(v) for v in values]
    lo, hi = min(values), max(values)
    p98 = stats.percentile(values, 98.0)
    assert p98 is not None
    span = max(p98 - lo, abs(p98) * 0.05, 1e-12)
    cap = p98 + OFFSCALE_FACTOR * span * 2
    clipped = hi > cap and len(values) >= 10
    top = cap if clipped else hi
    pad = (top - lo) * 0.06 or abs(top) * 0.05 or 1.0
    bottom, top_lim = lo - pad, top + pad
    if not (math.isfinite(bottom) and math.isfinite(top_lim)):  # spans near the float limit
        bottom, top_lim = (lo, top) if top > lo else (lo - 1.0, lo + 1.0)
    return bottom, top_lim, clipped


def curve_chart(chart_id: str, title: str, ylabel: str, series: Sequence[Series],
                marks: Sequence[Mark] = (), *, width_in: float = FULL_WIDTH_IN,
                height_in: float = CURVE_HEIGHT_IN, log_y: bool | None = None,
                percent: bool = False) -> str | None:
    """A line chart of one metric over steps (one line per series), with NaN ticks and findings marked."""
    drawn = [s for s in series if s.data.count]
    if not drawn:
        return None
    all_vals: list[float] = []
    for s in drawn:
        for b in s.data.buckets:
            if b.n:
                all_vals.extend((b.lo, b.hi))
    for m in marks:
        if m.kind == "points":
            all_vals.extend(_finite(m.ys))
    positive = [v for v in all_vals if v > 0]
    if log_y is None:
        log_y = bool(all_vals) and len(positive) == len(all_vals) and max(positive) / min(positive) > 100.0
    with mpl_context():
        fig = new_figure(width_in, height_in)
        ax = fig.add_subplot()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        limits = None if log_y else _y_limits(all_vals)
        top = limits[1] if limits else None
        nonfinite_total = 0
        for s in drawn:
            xs, mean, lo, hi = _curve_xy(s.data)
            if s.style == "points":
                ax.plot(xs, mean, marker="o", markersize=3.5, linewidth=1.2, color=s.color, label=s.label)
            elif s.data.exact:
                ax.plot(xs, mean, linewidth=1.1, color=s.color, label=s.label)
            else:
                # The band's edges are drawn as thin lines: a one-step spike is a one-pixel sliver of band,
                # but its max line still reaches the spike's height.
                band = f"{s.label}: min–max per {s.data.width} steps"
                ax.fill_between(xs, lo, hi, color=s.color, alpha=0.18, linewidth=0, label=band)
                ax.plot(xs, hi, linewidth=0.5, color=s.color, alpha=0.7, label=band)
                ax.plot(xs, lo, linewidth=0.5, color=s.color, alpha=0.7, label=band)
                ax.plot(xs, mean, linewidth=1.1, color=s.color, label=f"{s.label} (mean)")
            nonfinite_total += s.data.nonfinite_count
            if s.data.nonfinite_steps:
                ax.vlines(s.data.nonfinite_steps, 0.0, 0.07, transform=ax.get_xaxis_transform(), color=BAD,
                          linewidth=1.2, label=f"NaN/Inf ({s.data.nonfinite_count} steps)")
        for m in marks:
            if m.kind == "vline":
                for x in m.xs:
                    ax.axvline(x, color=m.color, linestyle=m.linestyle, linewidth=1.2, label=m.label)
            elif m.xs:
                ys = [_clamp(min(y, top)) if top is not None and math.isfinite(y) else y for y in m.ys]
                ax.scatter(m.xs, ys, marker="v", s=22, color=m.color, zorder=5, label=m.label)
        if log_y:
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
        elif limits is not None:
            bottom, top_lim, clipped = limits
            ax.set_ylim(bottom, top_lim)
            if clipped:
                peak = max(all_vals)
                ax.annotate(f"clipped: max {peak:.4g}", xy=(1.0, 1.0), xycoords="axes fraction",
                            ha="right", va="bottom", fontsize=8, color=BAD)
        if percent:
            ax.yaxis.set_major_formatter(_percent_formatter())
        elif not log_y:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        handles, labels = ax.get_legend_handles_labels()
        bottom = 0.5
        if handles:
            # Below the axes, never over the data (a legend "in the best place" hides spikes).
            unique = dict(zip(labels, handles, strict=True))
            ncols = 4 if width_in >= FULL_WIDTH_IN else 2
            rows = -(-len(unique) // ncols)
            ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(0.0, -0.42 / (height_in - 0.85)),
                      ncols=ncols, borderaxespad=0.0)
            bottom += 0.2 * rows + 0.1
        fig.set_size_inches(width_in, height_in + bottom - 0.5)
        _margins(fig, width_in, height_in + bottom - 0.5, bottom=bottom)
        return figure_to_svg(fig, chart_id, title)


def _log_axis(axis: Any) -> None:
    """Plain tick labels on a log axis ("0.01", "100"): matplotlib's default ones are mathtext, which the
    report turns off (input names may contain '$')."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10.0))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


@dataclass
class SpectrumLine:
    label: str
    sigma: list[float]         # unscaled singular values, descending
    k90: int | None


def spectra_chart(chart_id: str, most: Sequence[SpectrumLine], least: Sequence[SpectrumLine]) -> str | None:
    """σ_i / σ_1 (log scale) for the most and least used layers side by side; a dot marks k@90%."""
    panels = [("Most used layers (highest utilization)", most), ("Least used layers (lowest utilization)", least)]
    if not any(lines for _, lines in panels):
        return None
    with mpl_context():
        fig = new_figure(FULL_WIDTH_IN, 3.0)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (title, lines) in zip(axes, panels, strict=True):
            ax.set_title(title)
            ax.set_xlabel("singular value index i")
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
            for j, line in enumerate(lines):
                s1 = line.sigma[0] if line.sigma else 0.0
                if not s1 > 0:
                    continue
                rel = [s / s1 if s > 0 else math.nan for s in line.sigma]
                xs = list(range(1, len(rel) + 1))
                color = SERIES[j % len(SERIES)]
                ax.plot(xs, rel, marker="o", markersize=3, linewidth=1.1, color=color, label=line.label)
                if line.k90 and 1 <= line.k90 <= len(rel) and math.isfinite(rel[line.k90 - 1]):
                    ax.plot([line.k90], [rel[line.k90 - 1]], marker="o", markersize=8, fillstyle="none",
                            color=color, linewidth=0)
            if lines:
                ax.legend(loc="lower left", fontsize=7)
            else:
                ax.text(0.5, 0.5, "no layer", transform=ax.transAxes, ha="center", color=MUTED)
        axes[0].set_ylabel("σᵢ / σ₁")
        _margins(fig, FULL_WIDTH_IN, 3.0)
        return figure_to_svg(fig, chart_id, "singular value spectra")


UDR_PANEL_H_IN = 0.62     # one small multiple of the sidebar
UDR_CHART_W_IN = 3.3
MAX_UDR_PANELS = 12


def udr_histogram(chart_id: str, groups: Sequence[tuple[str, list[float]]],
                  thresholds: Sequence[float]) -> str | None:
    """Per-layer UDR on a log axis: one small histogram per group (shared x axis, each titled with its
    label) instead of overlaid ones, so every distribution stays readable; threshold lines at 0.1 / 0.3.
    Callers collapse identical distributions into one group first."""
    positive = [(label, [v for v in vals if math.isfinite(v) and v > 0]) for label, vals in groups]
    positive = [(label, vals) for label, vals in positive if vals][:MAX_UDR_PANELS]
    everything = [v for _, vals in positive for v in vals]
    if not everything:
        return None
    lo, hi = math.log10(min(everything)), math.log10(max(everything))
    lo = min(lo, math.log10(min(thresholds))) - 0.1 if thresholds else lo - 0.1
    hi = max(hi, math.log10(max(thresholds))) + 0.1 if thresholds else hi + 0.1
    n_bins = 24
    edges = [10 ** (lo + (hi - lo) * i / n_bins) for i in range(n_bins + 1)]
    n = len(positive)
    single = n == 1
    panel_h = 1.6 if single else UDR_PANEL_H_IN
    top_in, bottom_in, gap_in = 0.25, 0.45, 0.3
    height = top_in + bottom_in + n * panel_h + (n - 1) * gap_in
    with mpl_context():
        fig = new_figure(UDR_CHART_W_IN, height)
        axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
        for ax, (label, vals) in zip(axes, positive, strict=True):
            ax.set_xscale("log")
            ax.hist(vals, bins=edges, color=SERIES[0], alpha=0.9, histtype="stepfilled")
            ax.set_xlim(edges[0], edges[-1])
            ax.tick_params(axis="y", labelsize=6.5)
            ax.yaxis.set_major_locator(_max_n_locator(2))
            for t, color in zip(thresholds, (WARN, BAD, INK), strict=False):
                ax.axvline(t, color=color, linestyle="--", linewidth=0.9)
                if single:  # several panels: their titles take the top; the sidebar text names the lines
                    ax.annotate(f"{t:g}", xy=(t, 1.0), xycoords=("data", "axes fraction"), ha="center",
                                va="bottom", fontsize=7, color=color)
            if not single:
                ax.set_title(label, fontsize=7.5, loc="left", pad=2, fontweight="normal", color=INK)
        _log_axis(axes[-1].xaxis)
        axes[-1].set_xlabel("UDR = ‖ΔW‖₂ / ‖W‖₂")
        fig.supylabel("layers", fontsize=8, x=0.02)
        fig.subplots_adjust(left=0.45 / UDR_CHART_W_IN, right=1 - 0.1 / UDR_CHART_W_IN, top=1 - top_in / height,
                            bottom=bottom_in / height, hspace=gap_in / panel_h)
        return figure_to_svg(fig, chart_id, "UDR distribution")


def _max_n_locator(n: int) -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=n, integer=True)


# Colours exported for the view code (marks on curves).
COLORS = {"accent": ACCENT, "accent_light": ACCENT_LIGHT, "bad": BAD, "good": GOOD, "warn": WARN,
          "muted": MUTED, "series": SERIES}
