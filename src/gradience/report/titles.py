"""How a report names what it shows: the page title and its subject line (run id, adapter names, the bench's
model and task), and readable adapter names. Split from :mod:`gradience.report.build`, which plans and renders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradience.report.build import _Plan
    from gradience.report.views import View


# Directory names that say nothing about the adapter (the demo's "peft", a trainer's "checkpoint-500"): the
# title then names the directory above too.
_GENERIC_NAMES = re.compile(r"^(peft|adapter|adapters|lora|final|best|output|outputs|out|model|checkpoint-\d+|"
                            r"adapter_model|adapter_config\.json|\.)$", re.IGNORECASE)


def adapter_name(path: str | os.PathLike[str] | None) -> str:
    """A readable name for an adapter directory: its own name, with the parent's when its own is generic."""
    if not path:
        return "adapter"
    p = Path(path)
    if p.name.lower() == "adapter_config.json":
        p = p.parent
    name = p.name or str(p)
    if _GENERIC_NAMES.match(name) and p.parent.name:
        return f"{p.parent.name}/{name}"
    return name


def default_title(p: _Plan, subject: str) -> str:
    """The page is titled after what it shows: the run id, the adapter's or the compared adapters' names, the
    bench's model and task; the file or directory name only when the input names nothing better."""
    if subject:
        return subject
    src = p.source
    name = src.name or str(src)
    if src.is_dir():
        return name
    return f"{src.parent.name}/{name}" if src.parent.name else name


def subject_of(p: _Plan, views: list[View], run_id: str | None) -> str:
    place = p.source.name if p.source.is_dir() else p.source.parent.name
    if p.kind == "run":
        where = f" · {place}" if place else ""
        return (f"Run {run_id}" if run_id else "Training run") + where
    if p.kind == "adapter":
        return f"Adapter {adapter_name(p.adapter)}"
    doc = p.document or {}
    if p.kind == "audit":
        if isinstance(doc.get("adapters"), dict):
            return f"Audit of {len(doc['adapters'])} adapters" + (f" · {place}" if place else "")
        return f"Audit of {adapter_name(doc.get('peft_dir'))}" if doc.get("peft_dir") else ""
    if p.kind == "compare":
        a, b = doc.get("a") or {}, doc.get("b") or {}
        if a.get("path") or b.get("path"):
            return f"Comparison {adapter_name(a.get('path'))} ↔ {adapter_name(b.get('path'))}"
        return ""
    if p.kind == "merge":
        inputs = [i for i in doc.get("inputs") or [] if isinstance(i, dict)]
        return f"Merge of {' + '.join(adapter_name(i.get('path')) for i in inputs[:4])}" + (" + …" if len(inputs) > 4
                                                                                          else "")
    if p.kind == "bench":
        task = doc.get("task") or {}
        what = f": {task.get('model')} on {task.get('dataset')}" if task.get("model") and task.get("dataset") else ""
        return f"Bench {place}{what}" if place else f"Bench{what}"
    return ""
