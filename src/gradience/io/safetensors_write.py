"""A streaming safetensors writer that needs neither torch nor the safetensors package.

Why our own: the safetensors numpy API cannot write BF16, and building every tensor in memory before writing
would double the peak memory of ``compress`` on a 7B adapter. The header (names, dtypes, shapes, offsets) is
known before any data is produced, so it is written first and each tensor's bytes are produced and written one
at a time. The format: 8-byte little-endian header length, a JSON header (``__metadata__`` holds string pairs),
padded with spaces to an 8-byte boundary, then the raw little-endian tensor bytes back to back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np

from gradience.errors import InputError

ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16) with round-to-nearest-even; NaN stays a quiet NaN.

    bf16 is the top half of an IEEE float32: add 0x7FFF plus the lowest kept bit (ties go to even), then shift.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    out = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def encode_float(arr: np.ndarray, dtype: str) -> np.ndarray:
    """``arr`` as the contiguous little-endian array that holds safetensors ``dtype`` bytes (BF16 as uint16).

    Raises ``ValueError`` when finite values overflow the target dtype (a float16 adapter with values > 65504
    would load as inf).
    """
    if dtype == "BF16":
        with np.errstate(over="ignore"):
            out = f32_to_bf16_bits(np.asarray(arr, dtype=np.float32))
        bad = ((out & np.uint16(0x7F80)) == np.uint16(0x7F80)) & np.isfinite(arr)
    elif dtype in _FLOAT_NP:
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=_FLOAT_NP[dtype])
        bad = ~np.isfinite(out) & np.isfinite(arr)
    else:
        raise ValueError(f"not a floating safetensors dtype: {dtype!r}")
    if bad.any():
        raise ValueError(f"values exceed the range of {dtype}")
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: ``produce()`` returns an array whose raw bytes are the stored data (called once)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[self.dtype] * prod(self.shape)


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to an 8-byte boundary."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in ITEMSIZE:
            raise ValueError(f"unknown safetensors dtype {spec.dtype!r} for {spec.name}")
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: str | os.PathLike[str], specs: Sequence[TensorSpec],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``specs`` to ``path`` (not atomically: callers write into a temporary location); returns the bytes.

    Each tensor is produced, checked against its declared size and written before the next one is produced,
    so the peak memory is one tensor. A producer that returns the wrong number of bytes is a bug: ``ValueError``.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    head = header_bytes(specs, metadata)
    total = len(head)
    try:
        with open(path, "wb") as fh:
            fh.write(head)
            for spec in specs:
                data = np.ascontiguousarray(spec.produce())
                if data.nbytes != spec.nbytes:
                    raise ValueError(f"tensor {spec.name}: produced {data.nbytes} bytes, declared {spec.nbytes}")
                if data.size:
                    fh.write(data.reshape(-1).view(np.uint8).data)
                total += data.nbytes
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", path) from None
    return total
