"""Render views into the one HTML page with Jinja2 (autoescape on, templates and CSS as package data)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from gradience._version import __version__
from gradience.policy.thresholds import UDR_FRACTION_LEVELS
from gradience.report import heatmap
from gradience.report.svg import require_report
from gradience.report.views import ChartIds, View, udr_sidebar
from gradience.textfmt import human_count, num, pct, rank_value, times

_ENV: Any = None


def _environment() -> Any:
    global _ENV
    if _ENV is None:
        jinja2 = require_report("jinja2")
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("gradience.report", "templates"),
            autoescape=True,                     # every input-derived string is escaped
            undefined=jinja2.StrictUndefined,    # a template typo is a bug, not a blank
            trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        )
        env.filters.update({"num": num, "pct": pct, "times": times, "rank": rank_value, "count": human_count,
                            "wbr": _wbr})
        _ENV = env
    return _ENV


# After "_", "/", ":" anywhere, after "." or "-" that follow a letter (never inside a number: 0.2341, -0.01).
_BREAK_AFTER = re.compile(r"([_/:]+|(?<=[A-Za-z])[.-]+)")


def _wbr(text: Any) -> Any:
    """Escaped text with a line-break opportunity after ``_ / :`` and a letter's ``. -``: a long module or arm name
    wraps between its parts (``retrain_/per_/layer``), never inside a word."""
    from markupsafe import Markup, escape

    parts = _BREAK_AFTER.split(str(text))
    return Markup("").join(escape(part) + (Markup("<wbr>") if i % 2 == 1 else "") for i, part in enumerate(parts))


def _css() -> str:
    return (resources.files("gradience.report") / "static" / "report.css").read_text(encoding="utf-8")


def render_page(views: Sequence[View], *, title: str, subtitle: str = "", notes: Sequence[str] = (),
                ids: ChartIds | None = None, source: str = "") -> str:
    """The whole page. Chart SVGs come from our own renderer and are inserted as markup; every other value
    is escaped by the template."""
    env = _environment()
    from markupsafe import Markup

    ids = ids or ChartIds("s")
    sidebar = udr_sidebar([g for v in views for g in v.udr], ids)
    _mark_svgs(views, Markup)
    if sidebar.get("svg"):
        sidebar["svg"] = Markup(sidebar["svg"])
    template = env.get_template("page.html.j2")
    html = str(template.render(
        title=title, subtitle=subtitle, notes=list(notes), views=list(views), sidebar=sidebar,
        version=__version__, css=Markup(_css()), geo=heatmap.layout_info(),
        udr_levels=[f"{x:g}" for x in UDR_FRACTION_LEVELS], source=source,
    ))
    # Lone surrogates (undecodable bytes of a file name or argument, "\ud800" escapes in a JSON input)
    # cannot be written as UTF-8: they appear escaped, as \udcff, instead of failing the write.
    return html.encode("utf-8", "backslashreplace").decode("utf-8")


def _mark_svgs(views: Sequence[View], markup: Any) -> None:
    """Context keys ending in ``_svg`` hold SVG produced by :mod:`gradience.report.svg` (trusted markup); so do
    the items of ``_svgs`` lists, at any depth of dicts in lists (a view's per-group small multiples)."""
    def mark(context: dict[str, Any]) -> None:
        for key, value in list(context.items()):
            if key.endswith("_svg") and isinstance(value, str):
                context[key] = markup(value)
            elif key.endswith("_svgs") and isinstance(value, list):
                context[key] = [markup(v) if isinstance(v, str) else v for v in value]
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        mark(item)

    for view in views:
        mark(view.context)
