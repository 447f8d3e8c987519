"""matplotlib figures -> inline SVG that is deterministic, self-contained and safe to paste into the page.

matplotlib is imported lazily (the ``report`` extra); a missing install is one error naming the extra.
Determinism: a fixed ``svg.hashsalt`` (ids of clip paths and markers are hashes), no ``Date`` metadata,
text kept as ``<text>`` (``svg.fonttype: none``, no embedded glyph paths, smaller and selectable).
Self-contained: the XML declaration, DOCTYPE (it names a DTD on w3.org) and the ``<metadata>`` block (it
names matplotlib's web site) are removed, and so are the namespace attributes, which inline SVG in HTML does
not need. Ids are prefixed per chart so several charts on one page never share an id.
"""

from __future__ import annotations

import io
import re
from contextlib import AbstractContextManager
from typing import Any

from gradience.errors import MissingDependencyError

PURPOSE = "gradience report"
SVG_HASHSALT = "gradience-report"
KEEP_ID_PREFIX = "gx-"

# Colours used by the charts and the CSS (kept in one place so the page reads as one design).
INK = "#1f2933"
MUTED = "#7b8794"
GRID = "#e4e7eb"
ACCENT = "#2563eb"
ACCENT_LIGHT = "#bfdbfe"
WARN = "#d97706"
BAD = "#dc2626"
GOOD = "#059669"
SERIES = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#9333ea")

RC: dict[str, Any] = {
    "svg.hashsalt": SVG_HASHSALT,
    "svg.fonttype": "none",
    "text.parse_math": False,      # names from inputs may hold '$': never mathtext
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9.0,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "axes.titlesize": 10.0,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.6,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "legend.frameon": False,
    "legend.fontsize": 8.0,
    "path.simplify": False,        # keep every min/max point of a downsampled curve
    "figure.dpi": 100.0,
}


def require_report(package: str) -> Any:
    """Import ``package`` of the report extra, or raise the one-line error naming the extra."""
    try:
        return __import__(package)
    except ImportError as exc:
        raise MissingDependencyError(package, "report", PURPOSE) from exc


def mpl_context() -> AbstractContextManager[Any]:
    """matplotlib settings of every report chart (a context, so a caller's rcParams are left alone)."""
    matplotlib = require_report("matplotlib")
    return matplotlib.rc_context(RC)


def new_figure(width_in: float, height_in: float) -> Any:
    """A Figure with the SVG canvas attached, without pyplot (no global state, no GUI backend)."""
    require_report("matplotlib")
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasSVG(fig)
    return fig


_XML_DECL = re.compile(r"<\?xml[^>]*\?>\s*")
_DOCTYPE = re.compile(r"<!DOCTYPE[^>]*>\s*", re.IGNORECASE)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')
_ID = re.compile(r'\s\bid="([^"]+)"')
_REF = re.compile(r'(?:url\(|href=")#([^)"]+)')
_REF_SUB = re.compile(r'(url\(|href=")#([^)"]+)([)"])')
_GROUP_NOID = re.compile(r"<g\s*>")
_INDENT = re.compile(r" *\n\s*")
_TEXT = re.compile(r"(<text\b[^>]*>)(.*?)(</text>)", re.DOTALL)
_SIZE = re.compile(r'<svg([^>]*?)\swidth="([\d.]+)pt"\s+height="([\d.]+)pt"')


def figure_to_svg(fig: Any, chart_id: str, label: str) -> str:
    """The figure as an inline ``<svg>`` element (see the module docstring for what is stripped)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = _XML_DECL.sub("", svg)
    svg = _DOCTYPE.sub("", svg)
    svg = _METADATA.sub("", svg)
    svg = _XMLNS.sub("", svg)
    # Only clip paths and markers are referenced (url(#id), href="#id"); every other id is dropped, the
    # referenced ones get the chart's prefix.
    referenced = set(_REF.findall(svg))
    # Ids set on purpose (``set_gid("gx-...")``: the arm labels a test measures) are kept too.
    svg = _ID.sub(lambda m: f' id="{chart_id}-{m.group(1)}"'
                  if m.group(1) in referenced or m.group(1).startswith(KEEP_ID_PREFIX) else "", svg)
    svg = _REF_SUB.sub(lambda m: f"{m.group(1)}#{chart_id}-{m.group(2)}{m.group(3)}", svg)
    svg = _GROUP_NOID.sub("<g>", svg)
    # Text from inputs is already XML-escaped by matplotlib; quotes are escaped too, so that no input
    # fragment such as '"onmouseover=' appears verbatim anywhere in the page.
    svg = _TEXT.sub(lambda m: m.group(1) + m.group(2).replace('"', "&#34;").replace("'", "&#39;") + m.group(3),
                    svg)
    svg = _INDENT.sub("\n", svg)
    # Scale with the page: the viewBox keeps the aspect ratio; the pt size becomes a max width.
    svg = _SIZE.sub(lambda m: f'<svg{m.group(1)} class="chart" role="img" aria-label="{_attr(label)}" '
                              f'style="max-width:{float(m.group(2)) * 4 / 3:.0f}px"', svg, count=1)
    return svg.strip()


def _attr(text: str) -> str:
    return (text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;"))
