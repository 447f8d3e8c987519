"""LLaMA-Factory's ``trainer_log.jsonl`` and W&B history exports -> run events.

``trainer_log.jsonl`` is written by LLaMA-Factory's ``LogCallback.on_log``
(``src/llamafactory/train/callbacks.py``): one JSON object per log call with ``current_steps``,
``total_steps``, ``loss``, ``lr``, ``epoch``, ``eval_loss``, ``percentage``, ``elapsed_time`` … (keys whose
value is None are left out). A W&B history export is ``run.history()`` (a JSON array or JSON lines) or the
UI's "Export CSV": one row per log call with ``_step`` (or ``Step``) and the Trainer's ``train/…`` /
``eval/…`` columns; the UI prefixes columns with ``<run name> - `` and adds ``__MIN``/``__MAX`` companions,
which are dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.telemetry.logmap import Event, EventBuilder

MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_EXPORT_BYTES = 512 * 1024 * 1024  # a JSON export is one document: parsed whole
MAX_BAD_REPORTED = 10


def _open(path: Path) -> Any:
    try:
        return open(path, "rb")
    except OSError as exc:
        from gradience.io.textfile import os_problem

        raise InputError(f"cannot read: {os_problem(exc)}", path) from None


def _int_step(value: Any) -> int | None:
    if type(value) is int and abs(value) < 2**63:
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, str):
        try:
            return _int_step(float(value))
        except ValueError:
            return None
    return None


class _RowLog:
    """Rows (one log call each) -> events through the shared mapper; subclasses yield rows."""

    source = "?"

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        if run_id is not None:
            raise InputError(f"--run-id applies to telemetry logs and TensorBoard/W&B directories; a {self.source} "
                             "file holds one run", path)
        self.path = path
        self.issues: list[Issue] = []
        self.records = 0
        self.summary: dict[str, Any] = {}
        self.runs: list[str | None] = []  # no run ids in the file (--run-id is refused above)
        self.run_id: str | None = None
        self.transformers = True  # both are the Trainer's log() dicts: its max_grad_norm default applies
        self._bad = 0
        self._builder = EventBuilder()
        self.summary = self._builder.summary
        self._finished = False

    def rows(self) -> Iterator[tuple[int | None, dict[str, Any]]]:
        raise NotImplementedError

    def _bad_row(self, where: str, problem: str) -> None:
        self._bad += 1
        if self._bad <= MAX_BAD_REPORTED:
            self.issues.append(Issue("bad_log_entry", f"{where}: {problem}; skipped"))

    def _object_line(self, number: int, line: str | bytes) -> dict[str, Any] | None:
        """One JSON-lines row as a dict; None for a blank line, or (with an issue) one that is not an object."""
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            self._bad_row(f"line {number}", "not valid JSON")
            return None
        if not isinstance(obj, dict):
            self._bad_row(f"line {number}", "not a JSON object")
            return None
        return obj

    def events(self) -> Iterator[Event]:
        yield from self._events(self.rows())
        yield from self.finish()

    def _events(self, rows: Iterator[tuple[int | None, dict[str, Any]]]) -> Iterator[Event]:
        builder = self._builder
        for step, row in rows:
            self.records += 1
            for key, value in row.items():
                yield from builder.add(key, step, value)
            yield from builder.flush()  # a row is one whole log call

    def _rest(self) -> Iterator[tuple[int | None, dict[str, Any]]]:
        """Rows not read yet when the log ends (a followed file's last line)."""
        return iter(())

    def finish(self) -> list[Event]:
        """The end of the log: what is left, and the issues of the whole read."""
        if self._finished:
            return []
        out = list(self._events(self._rest()))
        out.extend(self._builder.flush())
        self._finished = True
        self.issues.extend(self._end_issues())
        return out

    def current_issues(self) -> list[Issue]:
        return self.issues + self._end_issues()

    def _end_issues(self) -> list[Issue]:
        out = self._builder.issues()
        if self._bad > MAX_BAD_REPORTED:
            out.append(Issue("bad_log_entry", f"{self._bad - MAX_BAD_REPORTED} more bad lines"))
        return out


class LlamaFactoryLog(_RowLog):
    """``trainer_log.jsonl``. Read from a byte offset, so ``monitor --follow`` reads only what was appended
    (``poll``); a last line without its newline is the writer mid-line: it waits for the next poll, and only
    ``finish`` reads it as it is."""

    source = "llamafactory"

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        super().__init__(path, run_id)
        from gradience.telemetry.sniff import output_dir_name

        self.run_id = output_dir_name(path)  # named by its output directory, as a trainer_state.json
        self.offset = 0
        self.lines = 0
        self.ended = False  # the Trainer's end-of-training log call was written

    def rows(self, final: bool = True) -> Iterator[tuple[int | None, dict[str, Any]]]:
        with _open(self.path) as f:
            f.seek(self.offset)
            while True:
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line or (not final and not line.endswith(b"\n") and len(line) <= MAX_LINE_BYTES):
                    return  # the end, or a line still being written
                self.lines += 1
                number = self.lines
                if len(line) > MAX_LINE_BYTES:
                    self._bad_row(f"line {number}", f"longer than {MAX_LINE_BYTES} bytes")
                    while line and not line.endswith(b"\n"):
                        line = f.readline(1 << 20)
                    self.offset = f.tell()
                    continue
                self.offset = f.tell()
                obj = self._object_line(number, line)
                if obj is not None:
                    step = _int_step(obj.get("current_steps"))
                    self.ended = self.ended or _is_end_row(obj, step)
                    yield step, obj

    def shrunk(self) -> bool:
        """The file is now shorter than what was read of it (rewritten): the follow starts over."""
        try:
            return self.path.stat().st_size < self.offset
        except OSError:
            return False

    def pending(self) -> bool:
        """Bytes past the last whole line read (a line being written)."""
        try:
            return self.path.stat().st_size > self.offset
        except OSError:
            return False

    def poll(self) -> list[Event]:
        """The events of the whole lines appended since the last poll."""
        return list(self._events(self.rows(final=False)))

    def _rest(self) -> Iterator[tuple[int | None, dict[str, Any]]]:
        return self.rows(final=True)


def _is_end_row(obj: dict[str, Any], step: int | None) -> bool:
    """The line of the Trainer's end-of-training summary: LogCallback keeps none of its keys but the step
    counters, so it is the line at ``total_steps`` without a loss, an eval loss or a learning rate."""
    total = _int_step(obj.get("total_steps"))
    return (step is not None and total is not None and 0 < total <= step
            and not any(k in obj for k in ("loss", "eval_loss", "predict_loss", "lr", "learning_rate")))


def _strip_export_column(name: str) -> str | None:
    """``<run> - train/loss`` -> ``train/loss``; ``…__MIN`` / ``…__MAX`` -> None."""
    if name.endswith(("__MIN", "__MAX")):
        return None
    if " - " in name:
        name = name.rsplit(" - ", 1)[1]
    return name


class WandbExportLog(_RowLog):
    source = "wandb_export"

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        super().__init__(path, run_id)
        self.transformers = False  # set when a row has the Trainer's train/global_step

    def rows(self) -> Iterator[tuple[int | None, dict[str, Any]]]:
        with _open(self.path) as f:
            head = f.read(MAX_EXPORT_BYTES + 1)
        if len(head) > MAX_EXPORT_BYTES:
            raise InputError(f"W&B export larger than {MAX_EXPORT_BYTES} bytes", self.path)
        text = head.decode("utf-8", "replace")
        if text.lstrip().startswith("["):
            yield from self._json_rows(text)
        elif text.lstrip().startswith("{"):
            yield from self._json_lines(text)
        else:
            yield from self._csv_rows(text)

    def _json_rows(self, text: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"not a W&B history export: invalid JSON ({exc})", self.path) from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                self._bad_row(f"row {i}", "not an object")
                continue
            self.transformers = self.transformers or "train/global_step" in row
            yield _row_step(row), row

    def _json_lines(self, text: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
        for number, line in enumerate(text.splitlines(), 1):
            row = self._object_line(number, line)
            if row is None:
                continue
            self.transformers = self.transformers or "train/global_step" in row
            yield _row_step(row), row

    def _csv_rows(self, text: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
        try:
            yield from self._csv_rows_unchecked(text)
        except csv.Error as exc:  # e.g. a field over csv's size limit: the file is not an export we can read
            raise InputError(f"not a W&B history export: CSV error ({exc})", self.path) from None

    def _csv_rows_unchecked(self, text: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None) or []
        names = [_strip_export_column(h) for h in header]
        for _number, cells in enumerate(reader, 2):
            row: dict[str, Any] = {}
            for name, cell in zip(names, cells, strict=False):
                if name is None or cell == "":
                    continue
                try:
                    row[name] = float(cell)
                except ValueError:
                    row[name] = cell
            if row:
                self.transformers = self.transformers or "train/global_step" in row
                yield _row_step(row), row


def _row_step(row: dict[str, Any]) -> int | None:
    """The Trainer's ``train/global_step`` (WandbCallback's step metric), else W&B's ``_step``."""
    for key in ("train/global_step", "_step", "Step", "step"):
        if key in row:
            return _int_step(row[key])
    return None


def looks_like_llamafactory(obj: Any) -> bool:
    return isinstance(obj, dict) and "current_steps" in obj and "total_steps" in obj


def looks_like_wandb_export_header(header: list[str]) -> bool:
    names = {_strip_export_column(h) for h in header}
    return bool(names & {"_step", "Step", "train/global_step"}) and any(
        n is not None and (n.startswith(("train/", "eval/")) or n in ("loss", "eval_loss")) for n in names)
