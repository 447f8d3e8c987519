"""Weights & Biases run directories -> run events (the ``[wandb]`` extra; no network, no login).

W&B writes every run (online or ``offline-run-*``) to a local transaction log ``run-<id>.wandb``. It has no
public reader, so this module reads it with W&B's own code, not a re-derived format: the framing (LevelDB
log blocks, CRC32 per fragment) by ``wandb.sdk.internal.datastore.DataStore`` (its ``open_for_scan`` /
``scan_data``), and each record by ``wandb.proto.wandb_internal_pb2.Record``. The only change to DataStore
is opening the file read-only (its ``open_for_scan`` asks for write access) and a cap on one record's size.
A corrupt fragment (DataStore's assertions) is reported with its offset and reading resumes at the next
32 KiB block, the log format's own recovery point. wandb 0.30 moved this code out of Python: the extra
pins a release that has it. ``monitor --follow`` resumes the scan at the end of the last whole record read;
a fragment cut by the end of the file is the writer mid-write, read again at the next poll.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradience.errors import InputError, MissingDependencyError
from gradience.issues import Issue
from gradience.telemetry.logmap import Event, EventBuilder

MAX_RECORD_BYTES = 64 * 1024 * 1024
MAX_CORRUPT_REPORTED = 10
_RUN_FILE = re.compile(r"^run-[A-Za-z0-9_-]+\.wandb$")
_PURPOSE = "reading a W&B run directory"
_FILE_HEADER = 7  # ":W&B" + magic + version (DataStore's _read_header)
_TRAILER_MAX = 6  # a block's last bytes, too few for a fragment header (7), are zero padding


def _import_wandb() -> tuple[Any, Any]:
    try:
        from wandb.proto import wandb_internal_pb2
        from wandb.sdk.internal import datastore
    except ImportError:
        raise MissingDependencyError("wandb<0.30", "wandb", _PURPOSE) from None
    return datastore, wandb_internal_pb2


def find_run_file(path: Path) -> Path:
    """``run-*.wandb`` in a run directory (``offline-run-*`` / ``run-*``), or the file itself."""
    if not path.is_dir():
        return path
    try:
        found = sorted(p for p in path.iterdir() if _RUN_FILE.match(p.name) and p.is_file())
    except OSError as exc:
        from gradience.io.textfile import os_problem

        raise InputError(f"cannot list directory: {os_problem(exc)}", path) from None
    if not found:
        raise InputError("no run-*.wandb file in this W&B run directory", path)
    if len(found) > 1:
        raise InputError(f"several run-*.wandb files ({', '.join(p.name for p in found[:5])}); pass one", path)
    return found[0]


_RUN_DIR = re.compile(r"^(offline-)?run-\d{8}_\d{6}-([A-Za-z0-9]+)$")


def run_dirs(d: Path) -> list[Path]:
    """The run directories of ``wandb/`` (``d`` itself or ``d/wandb``), oldest first (names start with the
    date); at most the newest 1000."""
    for base in (d, d / "wandb"):
        try:
            subs = sorted((x for x in base.iterdir() if _RUN_DIR.match(x.name)),
                          key=lambda x: x.name.split("run-", 1)[1])
        except OSError:
            continue
        runs = [x for x in subs[-1000:] if is_run_dir(x)]
        if runs:
            return runs
    return []


def is_run_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(_RUN_FILE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def _store_class(datastore: Any) -> Any:
    class ReadOnlyStore(datastore.DataStore):
        """DataStore opened read-only, with one record's fragments capped at MAX_RECORD_BYTES."""

        def open_for_scan(self, fname: str) -> None:
            self._fname = fname
            self._fp = open(fname, "rb")  # noqa: SIM115 - closed by close()
            self._index = 0
            self._size_bytes = os.fstat(self._fp.fileno()).st_size
            self._opened_for_scan = True
            self._pending = 0
            self._read_header()

        def scan_record(self) -> Any:
            record = super().scan_record()
            if record is not None:
                dtype, data = record
                self._pending = len(data) if dtype in (datastore.LEVELDBLOG_FULL, datastore.LEVELDBLOG_FIRST) \
                    else self._pending + len(data)
                if self._pending > MAX_RECORD_BYTES:
                    raise AssertionError(f"record larger than {MAX_RECORD_BYTES} bytes")
            return record

    return ReadOnlyStore


def _value(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except (ValueError, RecursionError):
        return None


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if len(item.nested_key) else str(item.key)


class WandbLog:
    """One W&B run, read in one streaming pass (``events()``); ``issues``, ``config``, ``summary`` and
    ``records`` are complete once the iterator is exhausted."""

    source = "wandb"

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        _import_wandb()
        self.path = path
        self.all_runs: list[str | None] = []
        if path.is_dir() and not is_run_dir(path):
            dirs = run_dirs(path)
            ids = {_RUN_DIR.match(x.name).group(2): x for x in dirs}  # type: ignore[union-attr]
            self.all_runs = list(ids)
            if run_id is not None and run_id not in ids:
                raise InputError(f"no run with id {run_id!r} (runs here: {', '.join(str(r) for r in self.all_runs[-20:])})", path)
            path = ids[run_id] if run_id is not None else dirs[-1]
        self.file = find_run_file(path)
        self.issues: list[Issue] = []
        self.records = 0
        self.config: dict[str, Any] = {}
        self.run_id: str | None = None
        self.requested_run_id = run_id
        self.transformers = False
        self.ended = False  # the run's exit record was read (wandb's run.finish())
        self._builder = EventBuilder()
        self.summary: dict[str, Any] = self._builder.summary
        self._offset = 0  # just past the last whole record read (0: not opened yet)
        self._resumed_at = -1
        self._corrupt = 0
        self._done = False
        self._finished = False

    @property
    def runs(self) -> list[str | None]:
        return self.all_runs or [self.run_id]

    def events(self) -> Iterator[Event]:
        yield from self._read(final=True)
        yield from self.finish()

    def poll(self) -> list[Event]:
        """``monitor --follow``: the events of the records appended since the last poll. A record whose
        fragments reach the end of the file is the writer mid-write: it is read at a later poll."""
        return list(self._read(final=False))

    def finish(self) -> list[Event]:
        """The end of the log: the rest read as a finished file, the open row, the issues of the whole read."""
        if self._finished:
            return []
        out = list(self._read(final=True))
        out.extend(self._builder.flush())
        self._finished = True
        self.issues.extend(self._end_issues())
        if self.requested_run_id is not None and self.requested_run_id != self.run_id:
            raise InputError(f"no run with id {self.requested_run_id!r} (this directory holds run "
                             f"{self.run_id!r})", self.path)
        return out

    def current_issues(self) -> list[Issue]:
        return self.issues + self._end_issues()

    def _end_issues(self) -> list[Issue]:
        out = self._builder.issues()
        if self._corrupt > MAX_CORRUPT_REPORTED:
            out.append(Issue("corrupt_record", f"{self._corrupt - MAX_CORRUPT_REPORTED} more corrupt records",
                             severity="warning"))
        return out

    def _size(self) -> int:
        try:
            return self.file.stat().st_size
        except OSError:
            return 0

    def pending(self) -> bool:
        """Bytes past the last whole record read (more than a block trailer's zero padding)."""
        return not self._done and self._size() > max(self._offset, _FILE_HEADER) + _TRAILER_MAX

    def shrunk(self) -> bool:
        return self._size() < self._offset

    def _read(self, final: bool) -> Iterator[Event]:
        if self._done:
            return
        datastore, pb = _import_wandb()
        from google.protobuf.message import DecodeError

        store = _store_class(datastore)()
        try:
            store.open_for_scan(os.fspath(self.file))
        except OSError as exc:
            from gradience.io.textfile import os_problem

            raise InputError(f"cannot read: {os_problem(exc)}", self.file) from None
        except Exception:
            store.close()
            if not final and self._size() < _FILE_HEADER:
                return  # the writer has not written the header yet
            raise InputError("not a W&B transaction log (bad :W&B header)", self.file) from None
        builder = self._builder
        block = datastore.LEVELDBLOG_BLOCK_LEN
        try:
            if self._offset:
                store.seek(self._offset)
            while True:
                start = store._index
                try:
                    if self._resumed_at == start:
                        _skip_continuations(store, datastore)
                        start = store._index
                    data = store.scan_data()
                except (AssertionError, struct_error()) as exc:
                    if not final and store._fp.tell() >= store._size_bytes:
                        return  # a fragment cut by the end of the file: the writer is mid-record
                    self._corrupt += 1
                    if self._corrupt <= MAX_CORRUPT_REPORTED:
                        self.issues.append(Issue("corrupt_record", f"{self.file.name}: corrupt record at byte "
                                                 f"{start} ({exc}); resuming at the next block",
                                                 severity="warning", extra={"offset": start}))
                    # the block after the failing fragment's (the record may have begun in an earlier one)
                    resume = (max(store._index - 1, start) // block + 1) * block
                    if resume >= store._size_bytes:
                        self._offset = resume
                        self._done = True
                        break
                    store.seek(resume)
                    self._offset = self._resumed_at = resume
                    continue
                if data is None:
                    # the end; DataStore also ends here, silently, at a FIRST fragment whose LAST is not
                    # written (yet): at the end of a finished file that is a truncation
                    if final and self._size() > max(self._offset, _FILE_HEADER) + _TRAILER_MAX:
                        at = max(self._offset, _FILE_HEADER)
                        self.issues.append(Issue("truncated_record", f"{self.file.name}: the record at byte {at} "
                                                 "is cut by the end of the file", severity="warning",
                                                 extra={"offset": at}))
                    self._done = final
                    break
                self._offset = store._index
                record = pb.Record()
                try:
                    record.ParseFromString(data)
                except DecodeError:
                    self._corrupt += 1
                    if self._corrupt <= MAX_CORRUPT_REPORTED:
                        self.issues.append(Issue("corrupt_record", f"{self.file.name}: the record at byte {start} "
                                                 "is not a W&B record; skipped", severity="warning",
                                                 extra={"offset": start}))
                    continue
                self.records += 1
                kind = record.WhichOneof("record_type")
                if kind == "history":
                    yield from self._history(record.history, builder)
                elif kind == "run":
                    self.run_id = record.run.run_id or self.run_id
                    self._config(record.run.config)
                elif kind == "config":
                    self._config(record.config)
                elif kind == "exit":
                    self.ended = True
        finally:
            store.close()

    def _history(self, history: Any, builder: EventBuilder) -> Iterator[Event]:
        """One history row = one log call. The step is the Trainer's ``train/global_step`` when logged
        (WandbCallback defines it as the step metric), else W&B's ``_step``."""
        row = {_key(item): item.value_json for item in history.item}
        raw_step = row.get("train/global_step", row.get("_step"))
        step_value = _value(raw_step) if raw_step is not None else None
        step = step_value if type(step_value) is int else history.step.num or None
        if "train/global_step" in row:
            self.transformers = True
        yield from builder.flush()
        for key, value_json in row.items():
            yield from builder.add(key, step, _value(value_json))

    def _config(self, config: Any) -> None:
        for item in config.update:
            key = _key(item)
            if key == "_wandb" or len(self.config) >= 10_000:
                continue
            value = _value(item.value_json)
            # W&B config files wrap values as {"value": v, "desc": ...}; records hold the value itself.
            self.config[key] = value["value"] if isinstance(value, dict) and set(value) <= {"value", "desc"} \
                and "value" in value else value


def _skip_continuations(store: Any, datastore: Any) -> None:
    """At a block start after corruption: pass the fragments (MIDDLE/LAST, read and CRC-checked by
    DataStore's ``scan_record``) that end the record the corruption cut, up to the next FULL/FIRST one."""
    block, header = datastore.LEVELDBLOG_BLOCK_LEN, datastore.LEVELDBLOG_HEADER_LEN
    while True:
        if block - store._index % block < header:  # a block trailer: zero padding
            store.seek((store._index // block + 1) * block)
        at = store._index
        record = store.scan_record()
        if record is None:
            return
        if record[0] in (datastore.LEVELDBLOG_FULL, datastore.LEVELDBLOG_FIRST):
            store.seek(at)
            return


def struct_error() -> type[Exception]:
    import struct

    return struct.error
