"""``gradience report``: one self-contained HTML page for a run, an adapter, an audit or a comparison (SPEC §14).

Pipeline: :mod:`~gradience.report.build` decides what PATH is and gets the data from the library APIs
(``gradience.monitor.monitor_run`` for the run story, a second streaming pass for the curves,
``gradience.audit.run_audit`` with UDR for an adapter) → one *data function* per view in
:mod:`~gradience.report.views` turns that into template context (charts as inline SVG from
:mod:`~gradience.report.charts`, heatmaps as cell lists from :mod:`~gradience.report.heatmap`) → Jinja2
renders ``templates/page.html.j2`` (autoescaped; the CSS is ``static/report.css``) with one template block
per view and the UDR sidebar.

The page loads nothing: no scripts, no fonts, no images, a Content-Security-Policy of ``default-src 'none'``;
the same input gives the same bytes. Needs the ``report`` extra (matplotlib, Jinja2), imported lazily.

Adding a view for a new JSON document kind (e.g. ``gradience.merge/v1``) is one module, one template block, and
two table entries:

1. ``views/merge.py`` with ``def merge_view(doc: dict, ids: ChartIds) -> View``, returning
   ``View(key="merge", title="Merge", template="views/merge.html.j2", context={...}, udr=[UdrGroup(...)])``:
   ``context`` is whatever the block shows (keys ending in ``_svg`` are inserted as markup, everything else is
   escaped; make charts with ``charts.*`` and ``ids.next()``), ``udr`` holds the distributions the sidebar
   shows (identical ones are collapsed there);
2. the block ``templates/views/merge.html.j2``: it sees its context as ``c`` and the macros of
   ``_macros.html.j2`` (``facts``, ``meta``, ``chart``, ``heatmap``, ``issues``);
3. ``"merge": merge_view`` in ``views.DOCUMENT_VIEWS`` and ``"merge": Shape(...)`` in ``validate.SHAPES`` (the
   keys the view reads and what they hold: checked once when the file is read, so the view needs no guards).

The page header links every view; the sidebar merges every view's UDR groups.

Python API: :func:`render_report` returns the HTML string, :func:`write_report` writes it atomically,
:func:`build_report` returns both with the views.
"""

from gradience.report.build import REPORT_FILENAME, Report, build_report, render_report
from gradience.report.write import write_report

__all__ = ["REPORT_FILENAME", "Report", "build_report", "render_report", "write_report"]
