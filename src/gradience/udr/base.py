"""Lazy access to the tensors of a resolved base checkpoint: headers first, data only for audited modules.

Every safetensors shard's header is read (and validated) up front; tensor data is memory-mapped and only the
audited tensors are touched. ``.bin`` checkpoints are read with ``torch.load(weights_only=True, mmap=True)``
when torch is installed (never a plain unpickle). Problems with one shard (missing, corrupt) are recorded per
file so the caller can turn them into issues for the modules that live there while the rest is still used.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import InputError, MissingDependencyError
from gradience.io.safetensors import FLOAT_DTYPES, SafetensorsFile, bf16_to_f32
from gradience.quant.bnb4 import Bnb4Tensor, find_bnb4_tensors, read_bnb4
from gradience.udr.experts import ExpertView, expert_views
from gradience.udr.resolve import ResolvedBase
from gradience.udr.spectral import RowBlocks


@dataclass(frozen=True)
class BaseTensorInfo:
    name: str
    file: str           # file name relative to the base root
    dtype: str          # safetensors dtype name (F32, BF16, ...), or the torch dtype for .bin bases
    shape: tuple[int, ...]
    offset: int         # position in its file (to read in file order)

    @property
    def is_float(self) -> bool:
        return (self.dtype in FLOAT_DTYPES or self.dtype in {"float32", "float16", "bfloat16", "float64"}
                or self.dtype in QUANT_4BIT_DTYPES)


# bitsandbytes 4-bit weights (QLoRA bases) are listed under these dtypes with their logical shape and read
# de-quantised in numpy (gradience.quant.bnb4), so every base measurement treats them as float tensors.
QUANT_4BIT_DTYPES = frozenset({"NF4", "FP4"})


def file_fingerprint(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): what the norms cache compares to notice a changed shard."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class BaseWeights:
    """Tensor directory of a base checkpoint. ``file_problems`` maps file name -> why it is unusable."""

    def __init__(self, resolved: ResolvedBase) -> None:
        self.resolved = resolved
        self.root = resolved.root
        self.file_problems: dict[str, str] = {}
        self._st_files: dict[str, SafetensorsFile] = {}
        self._bin_files: dict[str, dict[str, Any]] = {}
        self._bnb4: dict[str, Bnb4Tensor] = {}  # 4-bit weight name -> its quant state (see QUANT_4BIT_DTYPES)
        self._views: dict[str, ExpertView] = {}  # per-expert views (udr/experts.py), listed as tensors too
        self.tensors: dict[str, BaseTensorInfo] = {}
        self.bytes_read = 0
        self.tensors_read = 0
        self._lock = threading.Lock()  # read_f32 is called from worker threads
        self._buffers = threading.local()  # one reusable float32 conversion buffer per thread
        self._scan()

    # -- directory ------------------------------------------------------------------------------
    def _scan(self) -> None:
        wmap = self.resolved.weight_map
        for fname in self.resolved.files:
            path = self.root / fname
            if not path.is_file():
                self.file_problems[fname] = (
                    f"shard {fname} is listed in {self.resolved.index_path.name if self.resolved.index_path else 'the index'}"
                    f" but missing from {self.root}"
                )
                continue
            try:
                self._open_file(fname)
            except (InputError, MissingDependencyError) as exc:
                self.file_problems[fname] = str(exc)
        if wmap is not None:
            # Still list the tensors the index promises, so a module in a broken shard is reported as
            # "its shard is unusable" rather than "not in the base".
            for tname, tfile in wmap.items():
                if tfile in self.file_problems and tname not in self.tensors:
                    self.tensors[tname] = BaseTensorInfo(tname, tfile, "?", (), 0)
        # MoE experts, named as the adapter's expert pairs name them (X.experts.gate_up_proj[e])
        views = expert_views({n: (i.shape, i.is_float) for n, i in self.tensors.items()
                              if i.dtype not in QUANT_4BIT_DTYPES and i.file not in self.file_problems})
        for vname, view in views.items():
            if vname not in self.tensors:
                first = self.tensors[view.parts[0]]
                self.tensors[vname] = BaseTensorInfo(vname, first.file, first.dtype, view.shape, first.offset)
                self._views[vname] = view

    def _open_file(self, fname: str) -> None:
        path = self.root / fname
        wmap = self.resolved.weight_map
        if self.resolved.fmt == "safetensors":
            st = SafetensorsFile(path)
            self._st_files[fname] = st
            for tname, info in st.tensors.items():
                if wmap is not None and wmap.get(tname, fname) != fname:
                    continue  # the index says another shard holds the authoritative copy
                self.tensors[tname] = BaseTensorInfo(tname, fname, info.dtype, info.shape, info.start)
            for tname, q4 in find_bnb4_tensors(st).items():
                if tname in self.tensors:
                    self._bnb4[tname] = q4
                    start = self.tensors[tname].offset
                    self.tensors[tname] = BaseTensorInfo(tname, fname, q4.state.quant_type.upper(), q4.state.shape,
                                                         start)
        else:
            state = _torch_load(path)
            self._bin_files[fname] = state
            for pos, (tname, tensor) in enumerate(state.items()):
                if not hasattr(tensor, "shape"):
                    continue
                dtype = str(tensor.dtype).removeprefix("torch.")
                self.tensors[tname] = BaseTensorInfo(tname, fname, dtype, tuple(tensor.shape), pos)

    def fingerprint(self, fname: str) -> tuple[int, int] | None:
        try:
            return file_fingerprint(self.root / fname)
        except OSError:
            return None

    # -- data -----------------------------------------------------------------------------------
    def read_f32(self, name: str) -> np.ndarray:
        """The tensor as float32: a zero-copy view of the mapped file for F32; bf16/fp16 converted once, into
        this thread's reusable buffer, so the result is valid until the same thread reads the next tensor."""
        info = self.tensors[name]
        if info.file in self.file_problems:
            raise InputError(self.file_problems[info.file], self.root / info.file)
        if name in self._bnb4:
            return self._read_4bit(name)
        if name in self._views:
            return self._read_view(name)
        if self.resolved.fmt == "safetensors":
            st = self._st_files[info.file]
            out = None if info.dtype == "F32" else self._buffer(info.shape)
            with self._lock:
                arr = st.read_f32(name, out)
                self.bytes_read += st.tensors[name].nbytes
                self.tensors_read += 1
            return arr
        with self._lock:
            tensor = self._bin_files[info.file][name]
            arr = tensor.detach().to(dtype=_torch().float32).contiguous().numpy()
            self.bytes_read += int(tensor.numel() * tensor.element_size())
            self.tensors_read += 1
        return arr

    def row_blocks(self, name: str) -> RowBlocks:
        """The tensor as stored, flattened to (shape[0], -1), streamed in float32 row blocks: nothing is converted
        up front, so a tensor whose float32 copy would not fit in memory can still be measured."""
        info = self.tensors[name]
        if info.file in self.file_problems:
            raise InputError(self.file_problems[info.file], self.root / info.file)
        if name in self._bnb4 or name in self._views:
            arr = self._read_4bit(name) if name in self._bnb4 else self._read_view(name)
            return RowBlocks(arr.reshape(int(arr.shape[0]) if arr.ndim else 1, -1))
        if self.resolved.fmt == "safetensors":
            st = self._st_files[info.file]
            with self._lock:
                raw = st.read_raw(name)
                self.bytes_read += st.tensors[name].nbytes
                self.tensors_read += 1
            bf16 = info.dtype == "BF16"
        else:
            torch = _torch()
            with self._lock:
                tensor = self._bin_files[info.file][name].detach()
                self.bytes_read += int(tensor.numel() * tensor.element_size())
                self.tensors_read += 1
            bf16 = tensor.dtype == torch.bfloat16
            raw = (tensor.contiguous().view(torch.int16).numpy().view(np.uint16) if bf16
                   else tensor.contiguous().numpy())
        rows = int(raw.shape[0]) if raw.ndim else 1
        return RowBlocks(raw.reshape(rows, -1), bf16=bf16)

    def _read_4bit(self, name: str) -> np.ndarray:
        """A bitsandbytes 4-bit weight de-quantised to float32 (a fresh array: codes x block absmax, rounded to the
        dtype bitsandbytes would return)."""
        q4 = self._bnb4[name]
        st = self._st_files[self.tensors[name].file]
        with self._lock:
            arr = read_bnb4(st, q4)
            self.bytes_read += sum(st.tensors[k].nbytes for k in (name, *q4.keys.values()))
            self.tensors_read += 1
        return arr

    def _read_view(self, name: str) -> np.ndarray:
        """One expert of a MoE base as a float32 array of its own: a slice of a stacked 3-D tensor, or the
        per-expert 2-D weights concatenated along the output dimension (gate before up)."""
        view = self._views[name]
        if view.index is None:
            parts = [np.array(self.read_f32(p), dtype=np.float32, copy=True) for p in view.parts]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        parent = view.parts[0]
        info = self.tensors[parent]
        with self._lock:
            if self.resolved.fmt == "safetensors":
                raw = self._st_files[info.file].read_raw(parent)[view.index]
                arr = bf16_to_f32(raw) if info.dtype == "BF16" else np.array(raw, dtype=np.float32)
            else:
                tensor = self._bin_files[info.file][parent][view.index]
                arr = tensor.detach().to(dtype=_torch().float32).contiguous().numpy()
            self.bytes_read += arr.size * (2 if info.dtype in ("BF16", "F16", "bfloat16", "float16") else 4)
            self.tensors_read += 1
        return arr

    def release(self, name: str) -> None:
        """Drop a safetensors tensor's mapped pages from the process once it has been streamed (verify reads
        whole checkpoints; without this the resident set grows to the size of the files)."""
        info = self.tensors.get(name)
        if info is not None and info.file in self._st_files:
            self._st_files[info.file].release(name)

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        numel = int(np.prod(shape, dtype=np.int64))
        buf: np.ndarray | None = getattr(self._buffers, "data", None)
        if buf is None or buf.size < numel:
            buf = np.empty(numel, np.float32)
            self._buffers.data = buf
        return buf[:numel].reshape(shape)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "hf", "reading a pytorch_model.bin base checkpoint") from None
    return torch


def _torch_load(path: Path) -> dict[str, Any]:
    torch = _torch()
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses arbitrary objects; any failure means unusable file
        raise InputError(f"cannot load as a weights-only torch checkpoint ({type(exc).__name__}: {exc})",
                         path) from None
    if not isinstance(state, dict):
        raise InputError("torch checkpoint does not hold a state dict", path)
    return state
