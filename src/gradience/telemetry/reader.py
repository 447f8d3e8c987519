"""Streaming, tolerant reader for telemetry v1 JSON Lines (SPEC §5).

One pass over the file, constant memory in the number of lines: lines are read in binary with a length cap
(an over-long line is skipped chunk by chunk, never held whole), each parsed record is yielded and forgotten.
Problems become :class:`gradience.issues.Issue` objects carrying the 1-based line number; at most
``max_issues_per_code`` are kept per kind of problem and the rest are counted in one summary issue, so a
million bad lines cannot exhaust memory either. ``strict=True`` turns the first problem into an
:class:`InputError` naming the file and the line.

Files written by the original tool read the same way: bare ``NaN``/``Infinity`` tokens are accepted (Python's
json accepts them), and the ``"NaN"``/``"Infinity"``/``"-Infinity"`` strings of v1 come back as floats.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue, Severity
from gradience.jsonio import MAX_JSON_DEPTH, MAX_JSON_INT, decode_nonfinite, json_problem
from gradience.telemetry.schema import KNOWN_EVENTS, SCHEMA
from gradience.telemetry.types import config_problems

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
_SKIP_CHUNK = 1 << 20
_READ_BUFFER = 1 << 20
# Top-level fields that hold text, never numbers: the NaN-string decoding leaves them alone.
_TEXT_FIELDS = frozenset({"schema", "run_id", "event", "split", "kind", "code", "message", "severity",
                          "status", "reason"})


_DECODER = json.JSONDecoder()


def _json_error(text: str) -> str:
    """A readable reason for a line the scanner rejected (only computed for bad lines)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError):
        return "not valid JSON"
    return "not valid JSON"


@dataclass(slots=True)
class TelemetryRecord:
    """One parsed record. ``data`` is the whole JSON object (envelope included, non-finite decoded)."""

    line: int
    event: str
    run_id: str | None
    step: int | None
    ts: float | None
    data: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def _decode_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_tree(v) for v in value]
    return decode_nonfinite(value)


def _decode_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if k in _TEXT_FIELDS else _decode_tree(v)) for k, v in record.items()}


def _coerce_step(value: Any) -> tuple[int | None, bool]:
    """(step, ok): ints pass, integral floats become ints, null is None; anything else is not a step."""
    if value is None:
        return None, True
    if isinstance(value, bool):
        return None, False
    if isinstance(value, int):
        return (value, True) if abs(value) <= MAX_JSON_INT else (None, False)  # a 400-digit step is corrupt
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_JSON_INT:
        return int(value), True
    return None, False


def _timestamp(ts: Any) -> float | None:
    """A record's ``ts`` as a float; None for a missing, non-numeric or out-of-range one (an integer beyond
    float range would raise OverflowError in every consumer)."""
    if type(ts) is float:
        return ts
    if isinstance(ts, int) and not isinstance(ts, bool) and abs(ts) <= MAX_JSON_INT:
        return float(ts)
    return None


# Payload fields the consumers read as numbers, per event (SPEC §5 table); their values must be real numbers
# (NaN and infinities included: a NaN loss is a finding) that fit a float.
_NUMERIC_FIELDS: dict[str, tuple[str, ...]] = {
    "train_step": ("loss", "lr", "grad_norm", "epoch", "tokens", "samples", "wall_time_s"),
}
_EVAL_NUMERIC = ("loss", "ppl", "perplexity", "accuracy", "n")
_TEXT_PAYLOAD: dict[str, tuple[str, ...]] = {
    "eval": ("split",), "metrics": ("kind",), "alert": ("severity", "code", "message"),
    "run_end": ("status", "reason"),
}
_OBJECT_PAYLOAD: dict[str, tuple[str, ...]] = {
    "metrics": ("metrics",), "alert": ("context",), "run_start": ("config", "meta"), "eval": ("metrics",),
}


def _bad_number(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return True
    return False


def _describe(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "an integer too large for a float"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _check_payload(event: str, obj: dict[str, Any]) -> tuple[list[str], bool]:
    """Problems with the payload's field types (each offending field is dropped from ``obj`` so consumers
    never see it) and whether the record is still usable. Consumers can then rely on these types instead of
    crashing on ``"optimizer": "adamw"``, a 400-digit loss or ``"metrics": "NaN"``."""
    problems: list[str] = []
    for key in _NUMERIC_FIELDS.get(event, ()):
        value = obj.get(key)
        # A float (what almost every train_step field is) is always fine: skip the call.
        if value is not None and type(value) is not float and _bad_number(value):
            problems.append(f"field '{key}' is {_describe(obj.pop(key))}, not a number")
    for key in _TEXT_PAYLOAD.get(event, ()):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"field '{key}' is {_describe(obj.pop(key))}, not a string")
    for key in _OBJECT_PAYLOAD.get(event, ()):
        value = obj.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append(f"field '{key}' is {_describe(obj.pop(key))}, not an object")
            if event in ("metrics", "eval") and key == "metrics":
                return problems, False
    if event == "eval" and isinstance(obj.get("metrics"), dict):
        metrics = obj["metrics"]
        bad = [key for key in _EVAL_NUMERIC if key in metrics and _bad_number(metrics[key])]
        for key in bad:
            problems.append(f"field 'metrics.{key}' is {_describe(metrics[key])}, not a number")
        if bad:
            obj["metrics"] = {k: v for k, v in metrics.items() if k not in bad}
    if event == "run_start" and isinstance(obj.get("config"), dict):
        problems.extend(f"config field {p}" for p in config_problems(obj["config"]))
    if event == "recommendation":
        recs = obj.get("recommendations")
        if recs is not None and not isinstance(recs, list):
            problems.append(f"field 'recommendations' is {_describe(obj.pop('recommendations'))}, not a list")
    return problems, True


class _IssueLog:
    """Keeps the first ``cap`` issues of each code and counts the rest (bounded memory)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept: list[Issue] = []
        self.counts: dict[str, int] = {}
        self.severity: dict[str, Severity] = {}

    def add(self, issue: Issue) -> None:
        n = self.counts.get(issue.code, 0) + 1
        self.counts[issue.code] = n
        self.severity.setdefault(issue.code, issue.severity)
        if n <= self.cap:
            self.kept.append(issue)

    def result(self) -> list[Issue]:
        out = list(self.kept)
        for code, n in self.counts.items():
            if n > self.cap:
                out.append(Issue(code, f"{n - self.cap} more line(s) with the same problem ({n} in all)",
                                 severity=self.severity[code], extra={"count": n, "omitted": n - self.cap}))
        return out


class TelemetryReader:
    """Iterate the records of one telemetry file; ``issues`` and counters describe the last pass.

    ``require_records`` (default True): a non-empty file from which no record could be read is an
    InputError at the end of the pass (binary garbage, a file of some other format).
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = False,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_issues_per_code: int = 20,
                 require_records: bool = True) -> None:
        self.path = Path(path)
        self.strict = strict
        self.max_line_bytes = int(max_line_bytes)
        self.max_issues_per_code = max_issues_per_code
        self.require_records = require_records
        self.lines = 0
        self.n_records = 0
        self.run_ids: list[str | None] = []
        self.offset = 0
        self._issues = _IssueLog(max_issues_per_code)

    @property
    def issues(self) -> list[Issue]:
        return self._issues.result()

    def _problem(self, code: str, message: str, line: int | None, severity: Severity = "warning",
                 **extra: Any) -> None:
        if self.strict:
            where = f"line {line}: " if line is not None else ""
            raise InputError(f"{where}{message} (strict schema)", self.path)
        self._issues.add(Issue(code, message, severity=severity, line=line, extra=extra))

    def _open(self) -> Any:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise InputError("no such file", self.path) from None
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None
        if stat.S_ISDIR(st.st_mode):
            raise InputError("is a directory, not a telemetry file", self.path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not a regular file", self.path)
        if st.st_size == 0:
            raise InputError("empty file: no telemetry records", self.path)
        # A log that a running job keeps appending to is read up to the size it had when the pass began:
        # the pass always ends (monitor on a log appended faster than it parses), a snapshot in time.
        self._size_at_start = st.st_size
        try:
            return open(self.path, "rb", buffering=_READ_BUFFER)
        except PermissionError:
            raise InputError("permission denied", self.path) from None
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None

    def __iter__(self) -> Iterator[TelemetryRecord]:
        return self.records()

    def records(self, start_offset: int = 0, start_line: int = 0,
                stop_at_partial: bool = False) -> Iterator[TelemetryRecord]:
        """One pass over the file (each call starts a new pass and resets issues and counters).

        Resumable (``monitor --follow``): start at byte ``start_offset`` (a line start) numbering lines from
        ``start_line + 1``; with ``stop_at_partial`` an unterminated last line is left unread for the next
        pass. ``self.offset`` is where the pass stopped (the byte after the last line consumed)."""
        self.offset = start_offset
        self.lines = 0
        self.n_records = 0
        self.run_ids = []
        self._issues = _IssueLog(self.max_issues_per_code)
        seen_runs: set[str | None] = set()
        unknown_events: set[str] = set()
        unknown_schemas: set[str] = set()
        cap = self.max_line_bytes
        scan_once = _DECODER.scan_once  # type: ignore[attr-defined]
        fh = self._open()
        try:
            if start_offset:
                fh.seek(start_offset)
            lineno = start_line
            remaining = self._size_at_start - start_offset
            while remaining > 0:
                raw = fh.readline(min(cap + 1, remaining))
                if not raw:
                    break
                terminated = raw.endswith(b"\n")
                if stop_at_partial and not terminated and len(raw) <= cap:
                    break  # still being written: the next pass reads it whole
                lineno += 1
                self.offset += len(raw)
                remaining -= len(raw)
                if not terminated and len(raw) > cap:
                    rest = self._skip_rest(fh, remaining)
                    remaining -= rest
                    skipped = len(raw) + rest
                    self.offset += skipped - len(raw)
                    self._problem("line_too_long", f"line longer than {cap} bytes ({skipped} bytes); skipped",
                                  lineno, bytes=skipped)
                    continue
                text_b = raw.strip()
                if not text_b:
                    self._problem("blank_line", "blank line", lineno, severity="info")
                    continue
                try:
                    text = text_b.decode("utf-8")
                except UnicodeDecodeError:
                    self._problem("not_utf8", "line is not valid UTF-8 text (binary data?)", lineno)
                    continue
                try:
                    # The scanner directly (what json.loads runs underneath) saves ~1 us per line.
                    obj, end = scan_once(text, 0)
                    if end != len(text):
                        raise ValueError("extra data")
                except (StopIteration, ValueError, RecursionError):
                    if not terminated:
                        self._problem("truncated_line", "last line is incomplete (writer interrupted?)", lineno)
                    else:
                        self._problem("bad_json", _json_error(text), lineno)
                    continue
                if type(obj) is not dict:
                    self._problem("not_an_object", f"JSON {type(obj).__name__}, not an object", lineno)
                    continue
                # Consumers walk payloads recursively: a line nested 600 deep decodes, then overflows them.
                if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
                    deep = json_problem(obj)
                    if deep is not None:
                        self._problem("bad_json", f"record {deep}; ignored", lineno)
                        continue
                event = obj.get("event")
                if not isinstance(event, str) or not event:
                    self._problem("missing_event", "record has no 'event' field", lineno)
                    continue
                schema = obj.get("schema")
                if schema != SCHEMA:
                    schema_key = schema if isinstance(schema, str) else repr(schema)
                    if schema_key not in unknown_schemas:
                        unknown_schemas.add(schema_key)
                        self._problem("unknown_schema", f"schema {schema!r} is not {SCHEMA!r}; read as v1",
                                      lineno, schema=schema_key)
                if event not in KNOWN_EVENTS and event not in unknown_events:
                    unknown_events.add(event)
                    self._problem("unknown_event", f"unknown event {event!r} (ignored by v1 readers)",
                                  lineno, severity="info", event=event)
                if b'"NaN"' in raw or b'Infinity"' in raw:
                    obj = _decode_record(obj)
                problems, usable = _check_payload(event, obj)
                for problem in problems:
                    self._problem("bad_field", f"{problem}{'' if usable else '; record ignored'}", lineno,
                                  event=event)
                if not usable:
                    continue
                step = obj.get("step")
                if type(step) is int and -MAX_JSON_INT <= step <= MAX_JSON_INT:  # the common case, no call
                    ok = True
                else:
                    step, ok = _coerce_step(step)
                if not ok:
                    self._problem("bad_step", f"step {obj.get('step')!r} is not an integer; treated as null",
                                  lineno)
                run_id = obj.get("run_id")
                if run_id is not None and not isinstance(run_id, str):
                    run_id = str(run_id)
                if run_id not in seen_runs:
                    seen_runs.add(run_id)
                    self.run_ids.append(run_id)
                ts = obj.get("ts")
                self.n_records += 1
                yield TelemetryRecord(lineno, event, run_id, step, ts if type(ts) is float else _timestamp(ts), obj)
            self.lines = lineno
        finally:
            fh.close()
        if self.n_records == 0 and self.require_records:
            first = self._issues.kept[0] if self._issues.kept else None
            detail = f"; line {first.line}: {first.message}" if first is not None else ""
            raise InputError(f"no telemetry records found ({self.lines} line(s){detail})", self.path)

    @staticmethod
    def _skip_rest(fh: Any, limit: int) -> int:
        skipped = 0
        while skipped < limit:
            chunk = fh.readline(min(_SKIP_CHUNK, limit - skipped))
            skipped += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
        return skipped


def read_events(path: str | os.PathLike[str], *, strict: bool = False,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[TelemetryRecord]:
    """Stream the records of a telemetry file (issues are dropped; use TelemetryReader to see them)."""
    return TelemetryReader(path, strict=strict, max_line_bytes=max_line_bytes).records()


def last_run_position(path: str | os.PathLike[str]) -> tuple[str | None, int | None]:
    """(run_id of the file's last record, last integer step of that run) – where an append continues."""
    last_step: dict[str | None, int] = {}
    last_run: str | None = None
    for rec in TelemetryReader(path):
        last_run = rec.run_id
        if rec.step is not None:
            last_step[rec.run_id] = rec.step
    return last_run, last_step.get(last_run)
