"""TFRecord framing of TensorBoard event files, checked record by record (``gradience.telemetry.tensorboard``
decodes what passes).

Why here and not TensorBoard's ``PyRecordReader``: TensorBoard's loader (``event_file_loader`` over the
``tensorflow_stub`` record reader) ends silently at a truncated record or a CRC mismatch, trusts a record's
declared length (a corrupt 8-byte length asks for exabytes) and computes CRC32C in pure Python. So each
record's framing is validated here (TFRecord: u64 length, masked CRC32C of the length, data, masked CRC32C of
the data; the mask is TensorBoard's ``masked_crc32c``) and problems become issues with the byte offset.
CRC32C comes from ``google_crc32c`` when installed (C, part of the extra), else TensorBoard's pure-Python
``crc32c``. Memory: one read buffer plus the largest record, capped at ``MAX_RECORD_BYTES``. The scan resumes
at a byte offset (``monitor --follow``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue

MAX_RECORD_BYTES = 64 * 1024 * 1024  # far above a scalar event (~50 bytes) or an image summary
_CHUNK = 1 << 20
_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")


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
    """Each intact record's payload of a finished file (a truncation at its end is an issue)."""
    scanner = RecordScanner(path, issues, max_record_bytes)
    for batch in scanner.scan(final=True):
        yield from batch
    scanner.finish()


class RecordScanner:
    """The framing check of one event file, resumable at a byte offset (``monitor --follow``).

    ``scan`` yields the payloads of the intact records from ``offset`` on, a list per read buffer (a Python
    call per buffer rather than per record). A bad data CRC skips that record (the framing is still known); a
    bad length CRC or an oversized declared length ends the file (``done``); each is an issue with the byte
    offset (TensorBoard's own loader would stop without a word). A record cut by the end of the file is a
    truncation issue when ``final``, else it is the writer mid-write: ``offset`` stays at its start and the
    next ``scan`` reads it again once it is complete.
    """

    def __init__(self, path: Path, issues: list[Issue], max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.path = path
        self.issues = issues
        self.max_record_bytes = max_record_bytes
        self.offset = 0       # file offset just past the last record handled
        self.done = False     # a framing error ended this file
        self.bad_data = 0

    def scan(self, final: bool = True) -> Iterator[list[bytes]]:
        if self.done:
            return
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed in finally; generator
        except OSError as exc:
            from gradience.io.textfile import os_problem

            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
        try:
            f.seek(self.offset)
            yield from self._scan(f, final)
        except OSError as exc:
            from gradience.io.textfile import os_problem

            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
        finally:
            f.close()

    def _scan(self, f: Any, final: bool) -> Iterator[list[bytes]]:
        crc = _crc32c()
        unpack_header, unpack_u32 = _HEADER.unpack_from, _U32.unpack_from
        path = self.path
        buf = b""
        pos = 0
        offset = self.offset  # file offset of buf[0]
        eof = False
        while True:
            # the hot loop: every whole record in the buffer (the common case)
            out: list[bytes] = []
            size = len(buf)
            while size - pos >= 12:
                length, length_crc = unpack_header(buf, pos)
                end = pos + 16 + length
                if end > size:
                    break
                data = buf[pos + 12:end - 4]
                x = crc(data)
                if (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF == unpack_u32(buf, end - 4)[0]:
                    # the data CRC matching also vouches for the length (a wrong length would frame
                    # different bytes): the length CRC is only checked when it does not
                    out.append(data)
                    pos = end
                    continue
                if not _length_ok(crc, buf, pos, length_crc):
                    self._fatal(_length_crc_issue(path, offset + pos), offset + pos)
                    yield out
                    return
                self.bad_data += 1
                if self.bad_data <= 10:
                    self.issues.append(_issue("crc_error", offset + pos, f"{path.name}: record data CRC mismatch "
                                              f"at byte {offset + pos}; record skipped"))
                pos = end
            self.offset = offset + pos
            if out:
                yield out
            avail = size - pos
            if avail >= 12:  # a record longer than the buffer: its length is checked before it decides the read
                length, length_crc = unpack_header(buf, pos)
                if not _length_ok(crc, buf, pos, length_crc):
                    self._fatal(_length_crc_issue(path, offset + pos), offset + pos)
                    return
                if length > self.max_record_bytes:
                    self._fatal(_issue("record_too_large", offset + pos, f"{path.name}: record at byte "
                                       f"{offset + pos} declares {length} bytes (limit {self.max_record_bytes}); "
                                       "the rest of the file is not read"), offset + pos)
                    return
                need = 16 + length
            else:
                need = 12
            if eof:
                if avail and final:
                    where = "header" if avail < 12 else "data"
                    self._fatal(_issue("truncated_record", offset + pos, f"{path.name}: truncated record {where} "
                                       f"at byte {offset + pos} (the file ends {avail} bytes into it)"), offset + pos)
                return  # not final: the writer is mid-record; the next scan reads it from self.offset
            more = f.read(max(_CHUNK, need - avail))
            eof = not more
            buf, pos, offset = buf[pos:] + more, 0, offset + pos

    def _fatal(self, issue: Issue, at: int) -> None:
        self.issues.append(issue)
        self.offset = at
        self.done = True

    def finish(self) -> None:
        """The count of data CRC mismatches past the ten reported one by one."""
        if self.bad_data > 10:
            self.issues.append(Issue("crc_error", f"{self.path.name}: {self.bad_data - 10} more records with a "
                                     "data CRC mismatch"))
            self.bad_data = 10


def _length_ok(crc: Callable[[bytes], int], buf: bytes, pos: int, length_crc: int) -> bool:
    x = crc(buf[pos:pos + 8])
    return bool((((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF == length_crc)


def _length_crc_issue(path: Path, offset: int) -> Issue:
    return _issue("crc_error", offset, f"{path.name}: record length CRC mismatch at byte {offset}; the rest of the "
                  "file is not read")


def _issue(code: str, offset: int, message: str) -> Issue:
    """Records lost: a warning (``schema.DATA_LOSS_CODES``), the records before and after are kept."""
    return Issue(code, message, severity="warning", extra={"offset": offset})
