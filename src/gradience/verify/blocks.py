"""Row blocks of a checkpoint tensor read with ``pread`` into reused buffers: what verify streams.

Why not the memory map of :class:`gradience.io.safetensors.SafetensorsFile`: verify reads every byte of two whole
checkpoints, and mapped pages stay resident until released, so the peak memory would be whole tensors (a 32000 ×
4096 embedding is 250 MB per checkpoint). Copying each row block into one reused buffer keeps the peak at a few
blocks whatever the tensor size, costs the same as the page faults it replaces, and a file truncated while it is
read is a short read (a clean error), never a SIGBUS. Headers, shards and dtypes still come from the validated
directory of :class:`gradience.udr.base.BaseWeights`; a pickled ``.bin`` checkpoint falls back to its reader.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import InputError
from gradience.io.safetensors import bf16_to_f32
from gradience.io.textfile import os_problem
from gradience.udr.base import BaseWeights
from gradience.udr.spectral import CHUNK_BYTES, RowBlocks

_STORED = {"BF16": ("<u2", 2), "F16": ("<f2", 2), "F32": ("<f4", 4), "F64": ("<f8", 8)}
COMPARE_CHUNK = 1024 * 1024   # two chunk buffers stay in cache while compared (measured: 8 MiB chunks ~20% slower)
_COUNT_LOCK = threading.Lock()  # verify reads tensors from several threads


def _count(weights: BaseWeights, nbytes: int, tensors: int = 0) -> None:
    with _COUNT_LOCK:
        weights.bytes_read += nbytes
        weights.tensors_read += tensors


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise InputError(f"cannot read: {os_problem(exc)}", path) from None
        if n <= 0:
            raise InputError(f"file shrank while being read (expected data at byte {offset + done}; truncated?)",
                             path)
        done += n


class TensorBlocks:
    """One tensor of a checkpoint, flattened to (rows, cols) with rows = shape[0], as float32 row blocks."""

    def __init__(self, weights: BaseWeights, name: str, *, flat: bool = False) -> None:
        """``flat``: blocks of elements in storage order, as (numel, 1): for element-wise comparisons, so that a
        tensor with one enormous row never needs a row-sized buffer."""
        self.weights = weights
        self.name = name
        info = weights.tensors[name]
        self.info = info
        numel = int(np.prod(info.shape, dtype=np.int64))
        rows = numel if flat else (int(info.shape[0]) if info.shape else 1)
        self.shape = (rows, numel // rows if rows else 0)
        self.pread = weights.resolved.fmt == "safetensors" and info.dtype in _STORED
        self.rows_per_block = max(1, CHUNK_BYTES // (4 * max(1, self.shape[1])))

    @property
    def path(self) -> Path:
        return self.weights.root / self.info.file

    @property
    def dtype(self) -> str:
        """The stored dtype name (NF4/FP4 for a bitsandbytes 4-bit weight, read de-quantised)."""
        return self.info.dtype

    def blocks(self, rows_per_block: int, out: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, float32 block); the block is valid until the next one is produced.

        ``out``: a contiguous float32 buffer of at least ``rows_per_block × cols`` elements the blocks are written
        into (a float32 tensor is read straight into it), so that a caller may overwrite a block in place and
        keep every buffer of its loop small enough to stay in cache."""
        if not self.pread:
            source = self.weights.row_blocks(self.name)
            if self.shape[1] != source.shape[1]:  # flat: a de-quantised 4-bit weight or a .bin tensor as (numel, 1)
                source = RowBlocks(source.raw.reshape(self.shape), bf16=source.bf16)
            for a, b, block in source.blocks(rows_per_block):
                if out is None:
                    yield a, b, block
                else:
                    target = out[: block.size].reshape(block.shape)
                    np.copyto(target, block)
                    yield a, b, target
            return
        np_dtype, itemsize = _STORED[self.info.dtype]
        rows, cols = self.shape
        step = max(1, min(rows_per_block, rows))
        if out is not None and (out.dtype != np.float32 or out.size < step * cols or not out.flags.c_contiguous):
            raise ValueError("out: a contiguous float32 buffer of rows_per_block x cols elements")
        if out is None:
            out = np.empty(step * cols, np.float32)
        out = out.reshape(-1)
        raw = out[: step * cols] if self.info.dtype == "F32" else np.empty(step * cols, np_dtype)
        fd = self._open()
        try:
            for a in range(0, rows, step):
                b = min(rows, a + step)
                n = (b - a) * cols
                _pread_exact(fd, raw[:n].view(np.uint8).data, self.info.offset + a * cols * itemsize,
                             self.path)
                block = out[:n].reshape(b - a, cols)
                if self.info.dtype == "BF16":
                    bf16_to_f32(raw[:n].reshape(b - a, cols), block)
                elif self.info.dtype != "F32":
                    np.copyto(block, raw[:n].reshape(b - a, cols), casting="unsafe")
                yield a, b, block
        finally:
            os.close(fd)
        _count(self.weights, rows * cols * itemsize, 1)

    def raw_chunks(self, chunk_bytes: int = COMPARE_CHUNK) -> Iterator[memoryview]:
        """The stored bytes in chunks of one reused buffer (for bitwise comparisons)."""
        nbytes = self.shape[0] * self.shape[1] * _STORED[self.info.dtype][1]
        buf = np.empty(min(chunk_bytes, max(nbytes, 1)), np.uint8)
        fd = self._open()
        try:
            for start in range(0, nbytes, len(buf)):
                view = buf[: min(len(buf), nbytes - start)].data
                _pread_exact(fd, view, self.info.offset + start, self.path)
                yield view
        finally:
            os.close(fd)
        _count(self.weights, nbytes)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"cannot read: {os_problem(exc)}", self.path) from None


def bitwise_equal(a: TensorBlocks, b: TensorBlocks) -> bool:
    """Same stored bytes (both tensors' dtypes and shapes are equal; read chunk by chunk)."""
    if not (a.pread and b.pread):
        ra, rb = a.weights.row_blocks(a.name).raw, b.weights.row_blocks(b.name).raw
        return bool(np.array_equal(ra.reshape(-1).view(np.uint8), rb.reshape(-1).view(np.uint8)))
    for ca, cb in zip(a.raw_chunks(), b.raw_chunks(), strict=True):
        xa, xb = np.frombuffer(ca, np.uint8), np.frombuffer(cb, np.uint8)
        if len(xa) % 8 == 0:
            xa, xb = xa.view(np.uint64), xb.view(np.uint64)
        if not np.array_equal(xa, xb):
            return False
    return True


class ArrayBlocks:
    """A float32 weight already in memory (deq(Q(W₁₆)), the QLoRA candidate base) with :class:`TensorBlocks`'
    block interface, so that one accumulation loop serves checkpoint tensors and computed bases alike."""

    def __init__(self, values: np.ndarray, dtype: str) -> None:
        rows = int(values.shape[0]) if values.ndim else 1
        self.values = np.ascontiguousarray(values, np.float32).reshape(rows, -1)
        self.shape = (rows, int(self.values.shape[1]))
        self.dtype = dtype
        self.rows_per_block = max(1, CHUNK_BYTES // (4 * max(1, self.shape[1])))

    def blocks(self, rows_per_block: int, out: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, float32 block), copied into ``out`` when given (the caller overwrites it in place)."""
        rows, cols = self.shape
        step = max(1, min(rows_per_block, rows))
        for a in range(0, rows, step):
            b = min(rows, a + step)
            src = self.values[a:b]
            if out is None:
                yield a, b, src.copy()
                continue
            target = out[: src.size].reshape(b - a, cols)
            np.copyto(target, src)
            yield a, b, target


def close_within(ref: Any, other: Any, u: float) -> bool:
    """‖other − ref‖_F ≤ u·‖ref‖_F, streamed block by block (ref/other: TensorBlocks or ArrayBlocks of one shape):
    "equal within the dtype's rounding" for weights a merge must leave alone."""
    rows = min(ref.rows_per_block, other.rows_per_block)
    diff2 = ref2 = 0.0
    for (_, _, w_ref), (_, _, w_other) in zip(ref.blocks(rows), other.blocks(rows), strict=True):
        d = w_other - w_ref
        diff2 += float(np.vdot(d, d))
        ref2 += float(np.vdot(w_ref, w_ref))
    return math.sqrt(diff2) <= u * math.sqrt(ref2)
