"""A validating, memory-mapped safetensors reader that needs neither torch nor the safetensors package.

Why our own: we must (1) read bf16 without torch, (2) map tensors lazily so a 70B adapter or a sharded 7B
base never sits in RAM at once, and (3) reject malformed files with a message naming the file and the
problem *before* any allocation driven by a header value. The header is validated completely at open time
(length, JSON, dtypes, shapes, offsets that tile the data section exactly as safetensors requires); tensor data is only
touched when ``read`` is called.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import InputError
from gradience.io.textfile import os_problem, parse_json, regular_file_stat
from gradience.textfmt import safe_text

# The format itself caps headers at 100 MB; anything larger is not a safetensors file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# numpy's own limits on arrays: no real tensor comes near either.
MAX_NDIM = 32
MAX_DIM = 2**53

_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1), "BOOL": ("?", 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets are absolute file offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def bf16_to_f32(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bits (as uint16) -> float32: bf16 is the top half of an IEEE float32.

    ``out`` (float32, raw's shape): write there instead of allocating; reusing one buffer across large
    tensors avoids the page faults of fresh allocations, which cost more than the conversion itself.
    """
    if out is None:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def _name(text: str) -> str:
    """A header-derived string as it may appear in a one-line error (escaped, at most 200 characters)."""
    return "'" + safe_text(text, max_len=200) + "'"


class SafetensorsFile:
    """One safetensors file: validated header at construction, lazy memory-mapped tensor reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._size = 0
        # True: tensors are read with pread into fresh memory, never through the mapping, so a file truncated
        # while it is read gives a short read (a clean error) instead of SIGBUS (compress's writer uses this).
        self.copy_reads = False
        self._parse_header()

    # -- header ---------------------------------------------------------------------------------
    def _fail(self, problem: str) -> InputError:
        return InputError(f"not a valid safetensors file: {problem}", self.path)

    def _parse_header(self) -> None:
        st = regular_file_stat(self.path, "weights file", missing="cannot read: no such file")  # a FIFO would block open(), a device never ends
        size = st.st_size
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
        try:
            with os.fdopen(fd, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise self._fail(f"file is {size} bytes, too short for the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise self._fail(f"header length {n} exceeds the 100 MB limit of the format")
                if 8 + n > size:
                    raise self._fail(f"header length {n} runs past the end of the file ({size} bytes; truncated?)")
                raw = fh.read(n)
        except OSError as exc:
            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
        if len(raw) < n:
            raise self._fail(f"file shrank to {8 + len(raw)} bytes while its header was read (truncated?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"header is not valid JSON (not UTF-8 text at byte {exc.start})") from None
        try:
            header = parse_json(text, self.path, "header")
        except InputError as exc:
            raise self._fail(exc.problem) from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise self._fail("__metadata__ is not an object of strings")
            self.metadata = dict(meta)
        for name, entry in header.items():
            self.tensors[name] = self._validate_entry(name, entry, data_start, data_len)
        self._check_layout(data_start, data_len)
        self._size = size

    def _check_layout(self, data_start: int, data_len: int) -> None:
        """Like safetensors itself: tensors tile the data section exactly, in offset order, with no overlap
        (two tensors sharing bytes, or bytes no tensor owns, mean a forged or corrupt file)."""
        cursor = 0
        for info in sorted(self.tensors.values(), key=lambda t: (t.start, t.end)):
            begin = info.start - data_start
            if begin != cursor:
                what = "overlaps the previous tensor" if begin < cursor else "leaves a gap after the previous tensor"
                raise self._fail(f"tensor {_name(info.name)} at data offset {begin} {what} (expected offset "
                                 f"{cursor}: tensors must be contiguous and in order)")
            cursor = info.end - data_start
        if cursor != data_len:
            raise self._fail(f"the tensors cover {cursor} bytes but the data section holds {data_len} "
                             "(trailing bytes, or the header does not describe the file)")

    def _validate_entry(self, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
        label = _name(name)
        if not isinstance(entry, dict):
            raise self._fail(f"entry for tensor {label} is not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._fail(f"tensor {label} has unknown dtype {_name(repr(dtype))}")
        shape = entry.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
            raise self._fail(f"tensor {label} has an invalid shape {_name(repr(shape))}")
        offs = entry.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise self._fail(f"tensor {label} has invalid data_offsets {_name(repr(offs))}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise self._fail(f"tensor {label} has data_offsets out of order {_name(repr(offs))}")
        if end > data_len:
            raise self._fail(
                f"tensor {label} ends at byte {_name(str(end))} of the data section, but the file holds only "
                f"{data_len} data bytes (truncated?)"
            )
        itemsize = _DTYPES[dtype][1]
        if prod(shape) * itemsize != end - begin:
            raise self._fail(
                f"tensor {label} has shape {_name(repr(shape))} ({dtype}) but {end - begin} bytes of data"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    # -- data -----------------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except OSError as exc:
                raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InputError("weights file is no longer a regular file", self.path)
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                os.close(fd)
                raise InputError(f"cannot memory-map: {exc}", self.path) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if len(self._mm) < self._size:
                raise InputError("file shrank while being read (truncated?)", self.path)
        return self._mm

    def _check_size(self) -> None:
        """Touching a page of a mapped file that has since been truncated kills the process with SIGBUS:
        re-check the size before every tensor access and fail cleanly instead."""
        if self._fd is None:
            return
        try:
            now = os.fstat(self._fd).st_size
        except OSError as exc:
            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
        if now < self._size:
            raise InputError(f"file shrank from {self._size} to {now} bytes while being read (truncated?)",
                             self.path)

    def close(self) -> None:
        """Release the mapping (arrays returned by ``read_raw`` must no longer be used)."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # views still alive: the GC closes it later
                self._mm.close()
            self._mm = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def read_raw(self, name: str) -> np.ndarray:
        """Zero-copy view of the stored bytes in the stored dtype (bf16 as uint16)."""
        info = self.tensors[name]
        np_dtype = _DTYPES[info.dtype][0]
        if info.numel == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        if self.copy_reads:
            return self._pread(info, np_dtype)
        mm = self._map()
        self._check_size()
        arr = np.frombuffer(mm, dtype=np_dtype, count=info.numel, offset=info.start)
        return arr.reshape(info.shape)

    def _pread(self, info: TensorInfo, np_dtype: str) -> np.ndarray:
        """The tensor's bytes copied with pread: a truncated file is a short read, never a SIGBUS."""
        if self._fd is None:
            self._map()
        assert self._fd is not None
        out = np.empty(info.numel, dtype=np_dtype)
        view = memoryview(out.view(np.uint8).data)
        done, want = 0, info.end - info.start
        while done < want:
            try:
                n = os.preadv(self._fd, [view[done:]], info.start + done)
            except OSError as exc:
                raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None
            if n <= 0:
                raise InputError(f"file shrank while being read (tensor {_name(info.name)} ends at byte "
                                 f"{info.end}; truncated?)", self.path)
            done += n
        return out.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop this tensor's mapped pages from the process (they stay in the page cache; a later read
        faults them back in). Why: a pass over a whole file otherwise keeps every touched page resident, so
        peak RSS grows to the file size plus the interpreter (SPEC §11: peak <= 1.3x the file)."""
        info = self.tensors[name]
        mm = self._mm
        if mm is None or info.numel == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.start - info.start % mmap.PAGESIZE
        length = min(info.end, len(mm)) - start
        if length > 0:
            with contextlib.suppress(OSError, ValueError):  # advice only: never fail a read over it
                mm.madvise(mmap.MADV_DONTNEED, start, length)

    def read(self, name: str) -> np.ndarray:
        """A tensor as a numpy array: zero-copy for F32/F64/F16/ints, converted to float32 for BF16."""
        info = self.tensors[name]
        raw = self.read_raw(name)
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        return raw

    def read_f32(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """A floating tensor as float32 (zero-copy when stored as F32). ``out``: a float32 array of the
        tensor's shape to convert into (BF16/F16/F64) instead of allocating; unused for F32."""
        info = self.tensors[name]
        if info.dtype == "BF16":
            return bf16_to_f32(self.read_raw(name), out)
        arr = self.read(name)
        if arr.dtype == np.float32:
            return arr
        if out is None:
            return arr.astype(np.float32)
        np.copyto(out, arr, casting="same_kind" if arr.dtype.kind == "f" else "unsafe")
        return out
