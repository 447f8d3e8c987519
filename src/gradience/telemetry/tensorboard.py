"""TensorBoard event files -> run events (the ``[tensorboard]`` extra; no TensorFlow).

Each record's framing is checked first (``gradience.telemetry.tfrecord``: TensorBoard's own loader stops
silently at a truncated record or a CRC error); events are then decoded by TensorBoard's own protobuf classes
(``tensorboard.compat.proto.event_pb2.Event``, a read buffer's records at once: ``_batch_class``), scalar
tensors by its ``tensor_util.make_ndarray``, text (the Trainer's ``args``) from the tensor's ``string_val``.
``monitor --follow`` reads the growing files with ``TensorBoardLog.poll``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradience.errors import InputError, MissingDependencyError
from gradience.issues import Issue
from gradience.telemetry.logmap import Event, EventBuilder
from gradience.telemetry.tfrecord import RecordScanner

MAX_EVENT_FILES = 10_000
MAX_DIR_ENTRIES = 100_000
EVENT_FILE_MARK = "tfevents"


def _import_tensorboard() -> Any:
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        raise MissingDependencyError("tensorboard", "tensorboard", "reading TensorBoard event files") from None
    return event_pb2


def find_runs(root: Path) -> dict[str, list[Path]]:
    """Event files under ``root`` grouped by directory (a run: the Trainer's ``runs/<date>_<host>/``); the
    run id is the directory relative to ``root`` (``.`` for root itself). Bounded walk."""
    runs: dict[str, list[Path]] = {}
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        seen += len(dirnames) + len(filenames)
        if seen > MAX_DIR_ENTRIES:
            raise InputError(f"more than {MAX_DIR_ENTRIES} entries under this directory; pass the run's "
                             "directory", root)
        files = sorted(f for f in filenames if EVENT_FILE_MARK in f)
        if files:
            rel = os.path.relpath(dirpath, root)
            runs[rel] = [Path(dirpath) / f for f in files]
            if sum(len(v) for v in runs.values()) > MAX_EVENT_FILES:
                raise InputError(f"more than {MAX_EVENT_FILES} event files; pass one run's directory", root)
    return runs


def _run_names(path: Path, runs: dict[str, list[Path]]) -> dict[str, str]:
    """Run ids as shown (``runs`` keys are relative directories): the run in the directory given itself (``.``,
    or the directory of a single event file) is named by that directory, resolved (``monitor .`` inside
    ``runs/Dec06_12-00-00_host`` says ``Dec06_12-00-00_host``, as ``monitor runs`` does); ``.`` stays accepted
    by ``--run-id``."""
    names = {rel: rel for rel in runs}
    if "." in runs:
        try:
            here = (path if path.is_dir() else path.parent).resolve().name
        except (OSError, RuntimeError):
            here = ""
        if here and here not in runs:
            names["."] = here
    return names


def _scalar(value: Any) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        try:
            arr = _tensor_util().make_ndarray(value.tensor)
        except Exception:
            return None
        if arr.size == 1 and arr.dtype.kind in "fiu":
            return float(arr.reshape(()))
    return None


def _tensor_util() -> Any:
    """TensorBoard's ``tensor_util``, imported only for a tensor value: its import pulls in the tensorflow
    stub's file layer (~0.3 s), which a log of ``add_scalar`` values never needs."""
    from tensorboard.util import tensor_util

    return tensor_util


_DT_STRING = 7  # tensorboard.compat.proto.types_pb2.DT_STRING


_BATCH: dict[str, Any] = {}
_BATCH_PREFIXES = 4096


def _batch_class(event_pb2: Any) -> Any:
    """A message ``EventBatch { repeated tensorboard.Event events = 1; }`` added to the pool of TensorBoard's
    own ``event.proto``. Why: a buffer's records parsed as one EventBatch are decoded by protobuf with
    TensorBoard's Event descriptor exactly as ``Event.FromString`` decodes each (the elements of a repeated
    message field are length-delimited Events), but in one call and one arena: ~2x faster on a log of
    scalars. The wrapper's framing (field tag, varint length) is written with protobuf's own encoder. None if
    the pool will not take it: then each record is decoded alone."""
    if "cls" not in _BATCH:
        try:
            from google.protobuf import descriptor_pb2, message_factory
            from google.protobuf.internal import encoder

            pool = event_pb2.DESCRIPTOR.pool
            name = "gradience_tb.EventBatch"
            try:
                desc = pool.FindMessageTypeByName(name)
            except KeyError:
                field = descriptor_pb2.FieldDescriptorProto
                fdp = descriptor_pb2.FileDescriptorProto(name="gradience_tb/event_batch.proto", package="gradience_tb",
                                                         dependency=[event_pb2.DESCRIPTOR.name], syntax="proto3")
                fdp.message_type.add(name="EventBatch").field.add(
                    name="events", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
                    type_name=".tensorboard.Event")
                pool.Add(fdp)
                desc = pool.FindMessageTypeByName(name)
            tag = encoder.TagBytes(1, 2)  # field 1, wire type 2 (length-delimited)
            _BATCH["cls"] = message_factory.GetMessageClass(desc)
            _BATCH["prefix"] = [tag + encoder._VarintBytes(n) for n in range(_BATCH_PREFIXES)]
            _BATCH["tag"], _BATCH["varint"] = tag, encoder._VarintBytes
        except Exception:  # an older/newer protobuf without these: the per-record path
            _BATCH["cls"] = None
    return _BATCH["cls"]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _text(value: Any) -> str | None:
    if value.WhichOneof("value") != "tensor" or value.metadata.plugin_data.plugin_name != "text":
        return None
    tensor = value.tensor
    if tensor.dtype == _DT_STRING:  # the text plugin's strings are in string_val (what make_ndarray reads)
        item: Any = tensor.string_val[0] if len(tensor.string_val) else b""
    else:
        try:
            arr = _tensor_util().make_ndarray(tensor)
            item = arr.reshape(-1)[0] if arr.size else b""
        except Exception:
            return None
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


class TensorBoardLog:
    """One run's event files, read in one streaming pass (``events()``); ``issues``, ``summary``,
    ``training_args`` and ``records`` are complete once the iterator is exhausted. ``monitor --follow`` reads
    the growing files with ``poll()`` (what was appended since; an event file that appears in the run's
    directory joins) and ``finish()`` at the end."""

    source = "tensorboard"

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        _import_tensorboard()
        self.path = path
        if path.is_dir():
            runs = find_runs(path)
            if not runs:
                raise InputError("no TensorBoard event files (*tfevents*) under this directory", path)
        else:
            runs = {".": [path]}
        names = _run_names(path, runs)
        self.runs: list[str | None] = [names[rel] for rel in runs]
        if run_id is not None:
            rel = next((r for r in runs if run_id in (r, names[r])), None)
            if rel is None:
                shown = ", ".join(self.runs[:20])  # type: ignore[arg-type]
                raise InputError(f"no run with id {run_id!r} (runs here: {shown})", path)
        else:
            rel = list(runs)[-1]
        self.run_id: str | None = names[rel]
        self.files = runs[rel]
        # the run's directory, re-listed while following (the Trainer may start a new events file)
        self.run_dir: Path | None = (path / rel) if path.is_dir() else None
        self.issues: list[Issue] = []
        self.records = 0
        self.training_args: dict[str, Any] | None = None
        self.transformers = False
        self._builder = EventBuilder()
        self.summary: dict[str, Any] = self._builder.summary
        self._scanners: dict[Path, RecordScanner] = {}
        self._undecodable = 0
        self._finished = False
        self._read_whole = False  # every file was read to its end as a finished file

    def events(self) -> Iterator[Event]:
        """The whole run, read once (``monitor``)."""
        yield from self._read(final=True)
        self._read_whole = True
        yield from self.finish()

    def poll(self) -> list[Event]:
        """The events of the records appended since the last poll (a record still being written waits for
        the next one); the step being logged stays open until a later step or ``finish`` closes it."""
        if self.run_dir is not None:
            self._relist()
        return list(self._read(final=False))

    def finish(self) -> list[Event]:
        """The end of the log: the rest of each file (a cut record now is a truncation), the open step, and
        the issues of the whole read."""
        if self._finished:
            return []
        out = [] if self._read_whole else list(self._read(final=True))
        out.extend(self._builder.flush())
        self._finished = True
        for scanner in self._scanners.values():
            scanner.finish()
        self.issues.extend(self._end_issues())
        return out

    @property
    def ended(self) -> bool:
        """The Trainer logged its end-of-training summary (``train/train_runtime`` ...): the run is over."""
        return "train_runtime" in self.summary

    def shrunk(self) -> bool:
        """A file read is now shorter than what was read of it (rewritten): the follow starts over."""
        return any(_size(path) < scanner.offset for path, scanner in self._scanners.items())

    def pending(self) -> bool:
        """Bytes past the last whole record read (a record being written)."""
        return any(_size(path) > scanner.offset for path, scanner in self._scanners.items() if not scanner.done)

    def current_issues(self) -> list[Issue]:
        """The issues so far (``--follow`` redraws before the end)."""
        return self.issues + self._end_issues()

    def _end_issues(self) -> list[Issue]:
        out = self._builder.issues()
        if self._undecodable:
            out.append(Issue("bad_log_entry", f"{self._undecodable} record(s) are not TensorBoard events"))
        return out

    def _relist(self) -> None:
        assert self.run_dir is not None
        try:
            names = sorted(n for n in os.listdir(self.run_dir) if EVENT_FILE_MARK in n)[:MAX_EVENT_FILES]
        except OSError:
            return  # the directory went away: keep what was read
        known = set(self.files)
        self.files.extend(p for p in (self.run_dir / n for n in names) if p not in known and p.is_file())

    def _read(self, final: bool) -> Iterator[Event]:
        event_pb2 = _import_tensorboard()
        from google.protobuf.message import DecodeError

        builder = self._builder
        decode, add = event_pb2.Event.FromString, builder.add
        batch_cls = _batch_class(event_pb2)
        fast = builder.train_fields  # tag -> train_step field, for the Trainer's float scalars
        n = 0
        for path in self.files:
            scanner = self._scanners.get(path)
            if scanner is None:
                scanner = self._scanners[path] = RecordScanner(path, self.issues)
            for batch in scanner.scan(final):
                n += len(batch)
                for ev in self._decode(batch, batch_cls, decode, DecodeError):
                    step = ev.step
                    for value in ev.summary.value:
                        # A simple_value (SummaryWriter.add_scalar) read as nonzero is set (its oneof
                        # reads 0.0 otherwise): the common case skips WhichOneof and the generic path.
                        number: Any = value.simple_value
                        if number:
                            name = fast.get(value.tag)
                            if name is not None and builder._open and builder._step == step:
                                builder._train[name] = number  # what add() does for a cached train tag
                                continue
                        elif value.WhichOneof("value") != "simple_value":
                            text = _text(value)
                            if text is not None:
                                self._text(value.tag, text)
                                continue
                            number = _scalar(value)
                        closed = add(value.tag, step, number)
                        if closed:
                            yield from closed
        self.records += n

    def _decode(self, batch: list[bytes], batch_cls: Any, decode: Any, decode_error: Any) -> Any:
        """The Events of a buffer's records: parsed as one EventBatch; if that fails (a record that is not an
        Event), one by one, counting those that are not."""
        if batch_cls is not None:
            prefix, limit, tag, varint = _BATCH["prefix"], _BATCH_PREFIXES, _BATCH["tag"], _BATCH["varint"]
            parts: list[bytes] = []
            append = parts.append
            for data in batch:
                length = len(data)
                append(prefix[length] if length < limit else tag + varint(length))
                append(data)
            try:
                return batch_cls.FromString(b"".join(parts)).events
            except decode_error:
                pass
        out = []
        for data in batch:
            try:
                out.append(decode(data))
            except decode_error:
                self._undecodable += 1
        return out

    def _text(self, tag: str, text: str) -> None:
        """The Trainer's ``add_text("args", args.to_json_string())`` is the run's TrainingArguments."""
        if tag.split("/")[0] != "args" or len(text) > 4 * 1024 * 1024:
            return
        import json

        from gradience.jsonio import json_problem

        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return
        if isinstance(data, dict) and json_problem(data) is None:
            self.training_args = data
            self.transformers = True
