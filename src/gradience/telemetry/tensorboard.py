"""TensorBoard event files -> run events (the ``[tensorboard]`` extra; no TensorFlow).

Events are decoded by TensorBoard's own protobuf classes (``tensorboard.compat.proto.event_pb2.Event``);
scalar tensors by its ``tensor_util.make_ndarray``. Why the record framing is checked here: TensorBoard's
loader (``event_file_loader`` over the ``tensorflow_stub`` record reader) ends silently at a truncated record
or a CRC mismatch, and trusts a record's declared length (a corrupt 8-byte length asks for exabytes). So each
record's framing is validated here first (TFRecord: u64 length, masked CRC32C of the length, data, masked
CRC32C of the data; the mask is TensorBoard's ``masked_crc32c``), problems become issues with the byte
offset, and only then is the record handed to TensorBoard's decoder. CRC32C comes from ``google_crc32c`` when
installed (C, part of the extra), else TensorBoard's pure-Python ``crc32c``. Memory: one read buffer plus the
largest record, capped at ``MAX_RECORD_BYTES``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradience.errors import InputError, MissingDependencyError
from gradience.issues import Issue
from gradience.telemetry.logmap import Event, EventBuilder

MAX_RECORD_BYTES = 64 * 1024 * 1024  # far above a scalar event (~50 bytes) or an image summary
MAX_EVENT_FILES = 10_000
MAX_DIR_ENTRIES = 100_000
_CHUNK = 1 << 20
_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")
EVENT_FILE_MARK = "tfevents"


def _import_tensorboard() -> Any:
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        raise MissingDependencyError("tensorboard", "tensorboard", "reading TensorBoard event files") from None
    return event_pb2


def _crc32c() -> Callable[[bytes], int]:
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c


def _masker(crc: Callable[[bytes], int]) -> Callable[[bytes], int]:
    def masked(data: bytes) -> int:
        x = crc(data) & 0xFFFFFFFF
        return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF
    return masked


def looks_like_event_file(head: bytes) -> bool:
    """A TFRecord starts with a u64 length whose masked CRC32C follows: 12 bytes that match by chance with
    probability 2^-32. ``head`` is the file's first bytes."""
    if len(head) < 12:
        return False
    _length, crc = _HEADER.unpack_from(head)
    return _masker(_crc32c())(head[:8]) == crc


def records(path: Path, issues: list[Issue], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[bytes]:
    """Each intact record's payload. A bad data CRC skips that record (the framing is still known); a bad
    length CRC, an oversized declared length or a truncation ends the file; each is an issue with the byte
    offset (TensorBoard's own loader would stop without a word)."""
    crc = _crc32c()
    unpack_header, unpack_u32 = _HEADER.unpack_from, _U32.unpack_from
    bad_data = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally; generator
    except OSError as exc:
        from gradience.io.textfile import os_problem

        raise InputError(f"cannot read: {os_problem(exc)}", path) from None
    try:
        buf = b""
        pos = 0
        offset = 0  # file offset of buf[0]
        eof = False
        while True:
            avail = len(buf) - pos
            if avail >= 12:
                length, length_crc = unpack_header(buf, pos)
                end = pos + 16 + length
                if end <= len(buf):  # the whole record is buffered (the common case)
                    data = buf[pos + 12:end - 4]
                    x = crc(data)
                    if (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF == unpack_u32(buf, end - 4)[0]:
                        # the data CRC matching also vouches for the length (a wrong length would frame
                        # different bytes): the length CRC is only checked when it does not
                        yield data
                        pos = end
                        continue
                    if not _length_ok(crc, buf, pos, length_crc):
                        issues.append(_length_crc_issue(path, offset + pos))
                        break
                    bad_data += 1
                    if bad_data <= 10:
                        issues.append(_issue("crc_error", offset + pos, f"{path.name}: record data CRC mismatch "
                                             f"at byte {offset + pos}; record skipped"))
                    pos = end
                    continue
                # not buffered: the length is checked before it decides how much to read
                if not _length_ok(crc, buf, pos, length_crc):
                    issues.append(_length_crc_issue(path, offset + pos))
                    break
                if length > max_record_bytes:
                    issues.append(_issue("record_too_large", offset + pos, f"{path.name}: record at byte "
                                         f"{offset + pos} declares {length} bytes (limit {max_record_bytes}); the "
                                         "rest of the file is not read"))
                    break
                need = 16 + length
            else:
                need = 12
            if eof:
                if avail:
                    where = "header" if avail < 12 else "data"
                    issues.append(_issue("truncated_record", offset + pos, f"{path.name}: truncated record {where} "
                                         f"at byte {offset + pos} (the file ends {avail} bytes into it)"))
                break
            more = f.read(max(_CHUNK, need - avail))
            eof = not more
            buf, pos, offset = buf[pos:] + more, 0, offset + pos
    except OSError as exc:
        from gradience.io.textfile import os_problem

        raise InputError(f"cannot read: {os_problem(exc)}", path) from None
    finally:
        f.close()
    if bad_data > 10:
        issues.append(Issue("crc_error", f"{path.name}: {bad_data - 10} more records with a data CRC mismatch"))


def _length_ok(crc: Callable[[bytes], int], buf: bytes, pos: int, length_crc: int) -> bool:
    x = crc(buf[pos:pos + 8])
    return bool((((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF == length_crc)


def _length_crc_issue(path: Path, offset: int) -> Issue:
    return _issue("crc_error", offset, f"{path.name}: record length CRC mismatch at byte {offset}; the rest of the "
                  "file is not read")


def _issue(code: str, offset: int, message: str) -> Issue:
    return Issue(code, message, severity="error", extra={"offset": offset})


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


def _scalar(value: Any, tensor_util: Any) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        try:
            arr = tensor_util.make_ndarray(value.tensor)
        except Exception:
            return None
        if arr.size == 1 and arr.dtype.kind in "fiu":
            return float(arr.reshape(()))
    return None


def _text(value: Any, tensor_util: Any) -> str | None:
    if value.WhichOneof("value") != "tensor" or value.metadata.plugin_data.plugin_name != "text":
        return None
    try:
        arr = tensor_util.make_ndarray(value.tensor)
        item = arr.reshape(-1)[0] if arr.size else b""
    except Exception:
        return None
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


class TensorBoardLog:
    """One run's event files, read in one streaming pass (``events()``); ``issues``, ``summary``,
    ``training_args`` and ``records`` are complete once the iterator is exhausted."""

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
        self.runs: list[str | None] = list(runs)
        if run_id is not None:
            if run_id not in runs:
                shown = ", ".join(self.runs[:20])  # type: ignore[arg-type]
                raise InputError(f"no run with id {run_id!r} (runs here: {shown})", path)
            self.run_id: str | None = run_id
        else:
            self.run_id = self.runs[-1]
        self.files = runs[self.run_id or "."]
        self.issues: list[Issue] = []
        self.records = 0
        self.summary: dict[str, Any] = {}
        self.training_args: dict[str, Any] | None = None
        self.transformers = False

    def events(self) -> Iterator[Event]:
        event_pb2 = _import_tensorboard()
        from google.protobuf.message import DecodeError
        from tensorboard.util import tensor_util

        builder = EventBuilder()
        decode, add = event_pb2.Event.FromString, builder.add
        undecodable = 0
        n = 0
        for path in self.files:
            for data in records(path, self.issues):
                n += 1
                try:
                    ev = decode(data)
                except DecodeError:
                    undecodable += 1
                    continue
                step = ev.step
                for value in ev.summary.value:
                    if value.WhichOneof("value") == "simple_value":
                        number: Any = value.simple_value
                    else:
                        text = _text(value, tensor_util)
                        if text is not None:
                            self._text(value.tag, text)
                            continue
                        number = _scalar(value, tensor_util)
                    closed = add(value.tag, step, number)
                    if closed:
                        yield from closed
        yield from builder.flush()
        self.records = n
        self.summary = builder.summary
        self.issues.extend(builder.issues())
        if undecodable:
            self.issues.append(Issue("bad_log_entry", f"{undecodable} record(s) are not TensorBoard events"))

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
