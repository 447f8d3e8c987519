"""What ``gradience report PATH`` reads, and the pipeline from PATH to the HTML string (titles: ``titles.py``).

PATH is one of (SPEC §14):

- a run directory: its telemetry (``run.jsonl``, a single ``*.jsonl``) and/or ``trainer_state.json`` (also
  the latest ``checkpoint-N/``), plus the adapter in it or below it (the latest checkpoint's when every
  candidate is a ``checkpoint-N``); a ``base/`` directory beside them (``gradience demo`` saves its toy base
  there) is the base model for UDR when ``--base-model`` is not given;
- a ``run.jsonl`` / ``trainer_state.json`` file;
- an adapter directory (``adapter_config.json`` + weights), audited with UDR when a base is given or the
  adapter's ``base_model_name_or_path`` resolves locally;
- an audit JSON (``gradience.audit/v1`` or the ``--all`` multi-adapter form) or a compare JSON
  (``gradience.compare/v1``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError, InputError
from gradience.report.curves import RunCurves
from gradience.report.titles import adapter_name, default_title, subject_of
from gradience.report.validate import check_document
from gradience.report.views import DOCUMENT_VIEWS, ChartIds, View, adapter_view, run_view, trl_view

MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_JSON_ITEMS = 8_000_000   # JSON values; as compare's audit JSON bound (a 70B audit holds a few hundred thousand)
REPORT_FILENAME = "report.html"
BASE_DIRNAME = "base"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RUN_FILES = ("run.jsonl", "trainer_state.json")


@dataclass
class Report:
    """The rendered page and what it was made from."""

    html: str
    kind: str                       # "run" | "adapter" | "audit" | "compare" | "bench"
    source: Path
    default_out: Path
    views: list[View] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_id: str = ""              # the input as the page records it (see write_report)


@dataclass
class _Plan:
    kind: str
    source: Path
    run: Path | None = None            # what monitor reads
    adapter: Path | None = None
    base_model: str | None = None
    base_note: str | None = None
    document: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# What a JSON input may be, named in the "not a report input" lines (the document views, from their registry).
_JSON_INPUTS = "the --json output of gradience audit, " + ", ".join(DOCUMENT_VIEWS)


def _load_json(path: Path) -> Any:
    """A JSON input, bounded before decoding (size, value count, nesting, integer size: one InputError)."""
    from gradience.io.textfile import read_text_limited
    from gradience.jsonio import MAX_JSON_INT, loads_bounded

    # Text, not bytes: json.loads(bytes) guesses UTF-16/32 from the first bytes, so a non-UTF-8 file was
    # "not valid JSON (line 1 column 1)" instead of "not UTF-8 text".
    raw = read_text_limited(path, what="JSON input", max_bytes=MAX_JSON_BYTES)
    if not raw.strip():
        raise InputError("empty file", path)
    return loads_bounded(raw, path, "JSON input", max_abs_int=MAX_JSON_INT, max_items=MAX_JSON_ITEMS)


def _audit_document(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """An audit JSON checked for the shape the adapter view reads; the reference tool's (no ``schema``,
    ``layer_data.layer_rows``) converted to ours by compare's reader first."""
    from gradience.compare.sides import from_reference_audit

    if doc.get("schema") is None:
        doc = from_reference_audit(doc)
    if isinstance(doc.get("adapters"), dict):
        return check_document("audit.multi", doc, path)
    return check_document("audit", doc, path)


def _has_run_files(d: Path) -> bool:
    try:
        if any((d / name).is_file() for name in _RUN_FILES):
            return True
        if any(p.is_file() for p in d.glob("*.jsonl")):
            return True
        return any(_CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file() for p in d.iterdir())
    except OSError:
        return False


def _adapter_in_run_dir(d: Path) -> tuple[Path | None, str | None]:
    """(adapter directory, note) for a run directory: itself, the only one below, or the latest checkpoint."""
    from gradience.adapter.discovery import adapters_below, holds_adapter

    if holds_adapter(d):
        return d, None
    try:
        found = adapters_below(d)
    except InputError as exc:
        return None, f"adapter not searched: {exc.problem}"
    if not found:
        return None, None
    if len(found) == 1:
        return found[0], None
    checkpoints = [(int(m.group(1)), p) for p in found if (m := _CHECKPOINT.match(p.name))]
    if len(checkpoints) == len(found):
        _step, latest = max(checkpoints)
        return latest, f"adapter of the latest checkpoint ({latest.name}) of {len(found)}"
    names = ", ".join(p.relative_to(d).as_posix() for p in found[:8])
    return None, f"several adapters below the run directory ({names}); report one with gradience report DIR"


def _run_base(d: Path) -> Path | None:
    """``d/base`` when it holds a saved checkpoint: the one resolver audit and compare use too."""
    from gradience.udr.resolve import saved_base_in

    return saved_base_in(d)


def plan(path: str | os.PathLike[str], base_model: str | None = None) -> _Plan:
    """Decide what PATH is and what to read (InputError naming the path when it is none of the inputs)."""
    from gradience.adapter.discovery import holds_adapter
    from gradience.monitor.external import is_external_log

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError("no such file or directory", p) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", p) from None
    if stat.S_ISDIR(st.st_mode):
        if _has_run_files(p):
            adapter, note = _adapter_in_run_dir(p)
            out = _Plan("run", p, run=p, adapter=adapter, base_model=base_model)
            if note:
                out.notes.append(note)
            if base_model is None and adapter is not None:
                found = _run_base(p)
                if found is not None:
                    out.base_model = str(found)
                    out.base_note = "found in the run directory"
            return out
        if (p / "bench.json").is_file():
            return _Plan("bench", p, document=_bench_document(p / "bench.json"))
        if (p / "merge.json").is_file():  # a merge output: the merge view (its adapter: OUT/adapter_config.json)
            inner = plan(p / "merge.json")
            if inner.kind != "merge":
                raise InputError("not a gradience.merge JSON", p / "merge.json")
            return _Plan("merge", p, document=inner.document)
        if holds_adapter(p) or (p / "adapter_config.json").is_file():
            return _Plan("adapter", p, adapter=p, base_model=base_model)
        adapter, note = _adapter_in_run_dir(p)
        if adapter is not None:
            out = _Plan("adapter", p, adapter=adapter, base_model=base_model)
            if note:
                out.notes.append(note)
            return out
        if is_external_log(p):  # TensorBoard / W&B run directories (monitor's readers)
            return _Plan("run", p, run=p, base_model=base_model)
        raise InputError("nothing to report: no run.jsonl, *.jsonl, trainer_state.json or PEFT adapter in this "
                         "directory or below it", p)
    if is_external_log(p):  # TensorBoard, W&B, W&B export, LLaMA-Factory: by content, as monitor reads them
        return _Plan("run", p, run=p, base_model=base_model)
    name = p.name.lower()
    if name.endswith(".jsonl"):
        return _Plan("run", p, run=p, base_model=base_model)
    if name == "adapter_config.json":
        return _Plan("adapter", p, adapter=p.parent, base_model=base_model)
    if not name.endswith(".json"):
        raise InputError("not a report input: expected a run directory, run.jsonl, trainer_state.json, an adapter "
                         f"directory, or {_JSON_INPUTS}", p)
    doc = _load_json(p)
    if isinstance(doc, dict) and isinstance(doc.get("log_history"), list):
        return _Plan("run", p, run=p, base_model=base_model)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if isinstance(schema, str) and schema.startswith("gradience.audit"):
        return _Plan("audit", p, document=_audit_document(doc, p))
    for kind in DOCUMENT_VIEWS:  # gradience.compare/v1, gradience.bench/v1, ...: one view per document kind
        if isinstance(schema, str) and schema.startswith(f"gradience.{kind}/"):
            return _Plan(kind, p, document=check_document(kind, doc, p))
    if schema is None and isinstance(doc, dict) and _is_reference_audit(doc):
        return _Plan("audit", p, document=_audit_document(doc, p))
    what = f"schema {schema!r}" if isinstance(schema, str) else "no 'schema' key and no 'log_history'"
    raise InputError(f"not a report input ({what}): expected {_JSON_INPUTS}, or an HF trainer_state.json", p)


def _bench_document(path: Path) -> dict[str, Any]:
    doc = _load_json(path)
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("gradience.bench"):
        raise InputError("not a gradience.bench JSON", path)
    return check_document("bench", doc, path)


def _is_reference_audit(doc: dict[str, Any]) -> bool:
    """The reference tool's audit JSON (johntnanney/gradience ``audit --json``): no ``schema``, its rows under
    ``layer_data.layer_rows`` (or ``layers`` with ``total_lora_params`` in its bench ``audit.json``)."""
    data = doc.get("layer_data")
    return (isinstance(data, dict) and "layer_rows" in data) or "total_lora_params" in doc or \
        ("summary" in doc and isinstance(doc.get("layers"), list))


def _default_out(p: _Plan) -> Path:
    """``report.html`` in a directory input; ``X.html`` beside a file input ``X.json`` / ``X.jsonl`` (so the
    reports of two files in one directory never share a name); an adapter_config.json's directory."""
    src = p.source
    if src.is_dir():
        return src / REPORT_FILENAME
    if src.name.lower() == "adapter_config.json":
        return src.parent / REPORT_FILENAME
    return src.parent / (src.name.rsplit(".", 1)[0] + ".html")


def _run_curves(run_path: Path, run_id: str | None) -> RunCurves:
    """The curves of the same run ``monitor_run`` summarizes (the last one of the file unless ``run_id``)."""
    from gradience.monitor.external import source_events
    from gradience.monitor.sources import resolve_run_path, telemetry_events
    from gradience.telemetry.reader import TelemetryReader

    source = resolve_run_path(run_path)
    curves = RunCurves()
    if source.kind == "telemetry":
        reader = TelemetryReader(source.path)
        for is_new, rec in telemetry_events(source.path, reader, run_id):
            if is_new:
                curves = RunCurves()
            curves.feed(rec.event, rec.step, rec.data)
    else:  # trainer_state.json, TensorBoard, W&B, ...: the same readers as monitor_run
        for event, step, data in source_events(source, run_id):
            curves.feed(event, step, data)
    return curves


def _monitor_and_curves(run_path: Path, run_id: str | None) -> tuple[Any, RunCurves]:
    """``monitor_run``'s report and the curves in ONE streaming pass over a telemetry log (a 100k-step log
    is read once, not twice): the same reader, run selection and analyzer as ``monitor_run``, finished by
    ``monitor.core.build_report``. A trainer_state.json is small: monitor_run plus a second read."""
    from gradience.monitor import monitor_run
    from gradience.monitor.analysis import RunAnalyzer
    from gradience.monitor.core import build_report as build_monitor_report
    from gradience.monitor.sources import resolve_run_path, telemetry_events
    from gradience.telemetry.reader import TelemetryReader
    from gradience.telemetry.types import ConfigSnapshot

    source = resolve_run_path(run_path)
    if source.kind != "telemetry":
        return monitor_run(run_path, run_id=run_id), _run_curves(run_path, run_id)
    reader = TelemetryReader(source.path)
    analyzer: RunAnalyzer | None = None
    curves = RunCurves()
    feed_analyzer: Any = None
    feed_curves: Any = None
    for is_new, rec in telemetry_events(source.path, reader, run_id):
        if is_new:
            analyzer, curves = RunAnalyzer(rec.run_id), RunCurves()
            feed_analyzer, feed_curves = analyzer.feed, curves.feed  # bound once per run, not per record
        event, step, data = rec.event, rec.step, rec.data
        feed_analyzer(event, step, data, rec.ts)
        feed_curves(event, step, data)
    runs = list(reader.run_ids)
    if analyzer is None:
        if run_id is not None:
            shown = ", ".join(str(r) for r in runs[:20])
            raise InputError(f"no run with id {run_id!r} (runs in this file: {shown})", source.path)
        raise InputError("no telemetry records in this file", source.path)
    config = ConfigSnapshot.from_dict(analyzer.config) if analyzer.config is not None else None
    report = build_monitor_report(analyzer, source=source, runs=runs, issues=reader.issues, lines=reader.lines,
                                  config=config)
    return report, curves


def _audit_summary(adapter_dir: Path, base_model: str | None, base_norms_cache: str | None,
                   udr: bool) -> dict[str, Any]:
    from gradience.adapter import load_adapter
    from gradience.audit import AuditOptions, run_audit

    options = AuditOptions(suggest_per_layer=True, udr=udr or base_model is not None, base_model=base_model,
                           base_norms_cache=base_norms_cache)
    result = run_audit(load_adapter(str(adapter_dir)), options)
    return result.to_summary(include_layers=True)


def build_report(path: str | os.PathLike[str], *, base_model: str | None = None, title: str | None = None,
                 base_norms_cache: str | None = None, udr: bool = True, run_id: str | None = None) -> Report:
    """Read PATH, compute what the page shows with the library APIs, and render the page."""
    from gradience.report.page import render_page
    from gradience.report.svg import require_report

    require_report("matplotlib")  # fail before any long computation when the extra is missing
    require_report("jinja2")
    p = plan(path, base_model)
    views: list[View] = []
    ids = ChartIds("c")
    subtitle = ""
    run_label: str | None = None
    if p.kind == "run":
        assert p.run is not None
        report, curves = _monitor_and_curves(p.run, run_id)
        views.append(run_view(report, curves, ids))
        trl = trl_view(report.extra.get("trl"), curves, ids)  # absent when the run logged no TRL metric
        if trl is not None:
            views.append(trl)
        run_label = str(report.run_id) if report.run_id else None
        subtitle = "training run" + (f" · adapter {adapter_name(p.adapter)}" if p.adapter is not None else "")
    summary: dict[str, Any] | None = None
    if p.adapter is not None:
        try:
            summary = _audit_summary(p.adapter, p.base_model, base_norms_cache, udr)
        except GradienceError as exc:
            if p.kind != "run" or (p.base_model is not None and p.base_note is None):
                raise  # an adapter report, or a base the user named: the error is the answer
            # The run's story stands on its own; the page says why its adapter is missing.
            p.notes.append(f"The adapter was not audited: {exc}")
    if summary is not None:
        source = f"{p.base_model} ({p.base_note})" if p.base_note else ""
        view = adapter_view(summary, ids, source="")
        if source:
            view.context["meta"].append(("Base used for UDR", source))
        views.append(view)
        subtitle = subtitle or "adapter"
    if p.kind == "audit":
        assert p.document is not None
        doc = p.document
        if isinstance(doc.get("adapters"), dict):  # gradience.audit.multi/v1 (audit --all)
            for i, (name, summary) in enumerate(sorted(doc["adapters"].items())):
                if isinstance(summary, dict):
                    views.append(adapter_view(summary, ids, key=f"adapter-{i + 1}", label=f"Adapter {name}",
                                              source=str(p.source)))
        else:
            views.append(adapter_view(doc, ids, source=str(p.source)))
        subtitle = "audit"
    if p.kind in DOCUMENT_VIEWS:
        assert p.document is not None
        view = DOCUMENT_VIEWS[p.kind](p.document, ids)
        views.append(view)
        subtitle = view.title
    if not views:
        raise InputError("nothing to report", p.source)
    page_title = title if title else default_title(p, subject_of(p, views, run_label))
    from gradience.report.write import input_id

    source_id = input_id(p.source)
    html = render_page(views, title=page_title, subtitle=subtitle, notes=p.notes, ids=ids, source=source_id)
    return Report(html=html, kind=p.kind, source=p.source, default_out=_default_out(p), views=views,
                  notes=p.notes, input_id=source_id)


def render_report(path: str | os.PathLike[str], **kwargs: Any) -> str:
    """The report of PATH as an HTML string (the Python API of SPEC §14)."""
    return build_report(path, **kwargs).html
