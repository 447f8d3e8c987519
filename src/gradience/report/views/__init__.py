"""The report's views: one module per view family, each with one data function returning a :class:`View`.

Adding a view (e.g. merge): a module here with ``def merge_view(doc, ids) -> View``, a template block
``templates/views/merge.html.j2``, an entry in :data:`DOCUMENT_VIEWS` (``"merge": merge_view``, for documents
whose schema is ``gradience.merge/v1``) and its ``Shape`` in :data:`gradience.report.validate.SHAPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradience.report.views.adapter import adapter_heatmaps, adapter_view
from gradience.report.views.base import MAX_ISSUES_SHOWN, ChartIds, UdrGroup, View
from gradience.report.views.bench import bench_view
from gradience.report.views.compare import compare_view
from gradience.report.views.merge import merge_view
from gradience.report.views.run import run_view
from gradience.report.views.series import series_view
from gradience.report.views.sidebar import udr_sidebar
from gradience.report.views.trl import trl_view

#: Single-document inputs: kind -> the view that shows it. A JSON document whose ``schema`` is
#: ``gradience.<kind>/vN`` is checked against ``validate.SHAPES[kind]`` and shown by this function.
DOCUMENT_VIEWS: dict[str, Callable[[dict[str, Any], ChartIds], View]] = {
    "compare": compare_view,
    "bench": bench_view,
    "series": series_view,
    "merge": merge_view,
}

__all__ = ["DOCUMENT_VIEWS", "MAX_ISSUES_SHOWN", "ChartIds", "UdrGroup", "View", "adapter_heatmaps",
           "adapter_view", "bench_view", "compare_view", "merge_view", "run_view", "trl_view", "udr_sidebar"]
