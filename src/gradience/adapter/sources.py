"""Tensor sources: one interface over safetensors files (single or sharded), pickled PyTorch state dicts and
in-memory state dicts, so that pairing and orientation logic exists once.

A source answers ``metas()`` (names, shapes, dtypes: header information only) and reads one tensor as float32 on
demand with ``read_f32``; safetensors data stays memory-mapped until then, and in-memory torch tensors are only
converted to numpy when read.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from gradience.errors import InputError, MissingDependencyError
from gradience.io.safetensors import FLOAT_DTYPES, SafetensorsFile
from gradience.io.textfile import is_file, read_json_file, regular_file_stat
from gradience.textfmt import safe_text

# An index of a sharded adapter lists a few thousand keys at most.
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """What is known about a tensor without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    is_float: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorSource(Protocol):
    def metas(self) -> dict[str, TensorMeta]: ...

    def read_f32(self, key: str) -> np.ndarray: ...


class SafetensorsSource:
    """One or several (sharded) safetensors files; headers validated at construction, data mapped on read."""

    def __init__(self, files: Mapping[str, SafetensorsFile]) -> None:
        """``files`` maps each tensor key to the file that holds it."""
        self._files = dict(files)
        self._metas = {}
        for key, sf in self._files.items():
            info = sf.tensors[key]
            self._metas[key] = TensorMeta(key, info.shape, info.dtype, info.dtype in FLOAT_DTYPES)

    @classmethod
    def single(cls, path: str | os.PathLike[str]) -> SafetensorsSource:
        sf = SafetensorsFile(path)
        return cls(dict.fromkeys(sf.tensors, sf))

    @classmethod
    def sharded(cls, index_path: str | os.PathLike[str]) -> SafetensorsSource:
        """Shards named by the ``weight_map`` of a ``*.safetensors.index.json`` (HF sharding layout)."""
        index_path = Path(index_path)
        weight_map = _read_weight_map(index_path)
        shards: dict[str, SafetensorsFile] = {}
        files: dict[str, SafetensorsFile] = {}
        for key, shard_name in weight_map.items():
            sf = shards.get(shard_name)
            if sf is None:
                shard_path = index_path.parent / shard_name
                if not is_file(shard_path):
                    raise InputError(f"shard '{safe_text(shard_name, max_len=200)}' listed in the index is missing "
                                     "(or not a regular file)", index_path)
                sf = shards[shard_name] = SafetensorsFile(shard_path)
            if key not in sf.tensors:
                raise InputError(f"tensor '{safe_text(key, max_len=200)}' is mapped to shard '{shard_name}', which does not contain it",
                                 index_path)
            files[key] = sf
        return cls(files)

    def metas(self) -> dict[str, TensorMeta]:
        return self._metas

    def use_copies(self) -> None:
        """Read every tensor with pread into memory from now on (no mapping): a file that shrinks meanwhile
        gives a clean InputError instead of SIGBUS (see SafetensorsFile.copy_reads)."""
        for sf in self._files.values():
            sf.copy_reads = True

    def read_f32(self, key: str) -> np.ndarray:
        return self._files[key].read_f32(key)

    def read_float(self, key: str) -> np.ndarray:
        """One floating tensor as numbers without losing range: F64 as float64 (zero-copy), others as
        :meth:`read_f32` gives them. Finite F64 values beyond float32's range (~3.4e38) must not become inf
        before the math (which works in float64, scaled where a Gram would overflow) sees them."""
        sf = self._files[key]
        if sf.tensors[key].dtype == "F64":
            return np.asarray(sf.read(key), dtype=np.float64)
        return sf.read_f32(key)

    def read_raw(self, key: str) -> np.ndarray:
        """The stored bytes of one tensor (zero-copy view, its own dtype): what compress copies verbatim."""
        stored: np.ndarray = self._files[key].read_raw(key)
        return stored

    def read_for_gram(self, key: str) -> tuple[np.ndarray, bool]:
        """(array, is_bf16): BF16 as its zero-copy uint16 bits (the Gram pass converts them chunk by chunk),
        any other float dtype as :meth:`read_f32` gives it."""
        sf = self._files[key]
        if sf.tensors[key].dtype == "BF16":
            return sf.read_raw(key), True
        return self.read_float(key), False

    def release(self, key: str) -> None:
        """Drop the tensor's mapped pages from the process once the math is done with it."""
        self._files[key].release(key)


def _read_weight_map(index_path: Path) -> dict[str, str]:
    doc = read_json_file(index_path, what="index", max_bytes=MAX_INDEX_BYTES)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError("index has no 'weight_map' object mapping tensor names to shard files", index_path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"weight_map entry for '{safe_text(key, max_len=200)}' is not a file name", index_path)
        pure = PurePosixPath(shard)
        if pure.is_absolute() or ".." in pure.parts or "\\" in shard or not shard:
            raise InputError(f"weight_map entry for '{safe_text(key, max_len=200)}' points outside the index's "
                             f"directory: {safe_text(repr(shard), max_len=200)}", index_path)
    return weight_map


def _is_torch_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "is_floating_point") and hasattr(value, "shape")


class MappingSource:
    """An in-memory state dict of numpy arrays or torch tensors (converted to numpy only when read)."""

    def __init__(self, tensors: Mapping[str, Any], origin: str | None = None) -> None:
        self._tensors: dict[str, Any] = {}
        self._metas: dict[str, TensorMeta] = {}
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise InputError(f"state dict key {key!r} is not a string", origin)
            if _is_torch_tensor(value):
                meta = TensorMeta(key, tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch."),
                                  bool(value.is_floating_point()))
            elif isinstance(value, np.ndarray):
                meta = TensorMeta(key, tuple(int(d) for d in value.shape), str(value.dtype),
                                  bool(np.issubdtype(value.dtype, np.floating)))
            else:
                raise InputError(f"state dict entry '{key}' is a {type(value).__name__}, not a tensor", origin)
            self._tensors[key] = value
            self._metas[key] = meta

    def metas(self) -> dict[str, TensorMeta]:
        return self._metas

    def read_f32(self, key: str) -> np.ndarray:
        value = self._tensors[key]
        if _is_torch_tensor(value):
            return np.asarray(value.detach().float().cpu().numpy(), dtype=np.float32)
        return np.asarray(value, dtype=np.float32)

    def read_float(self, key: str) -> np.ndarray:
        """Like :meth:`read_f32`, but float64 tensors stay float64 (see SafetensorsSource.read_float)."""
        value = self._tensors[key]
        if self._metas[key].dtype == "float64":
            if _is_torch_tensor(value):
                return np.asarray(value.detach().cpu().numpy(), dtype=np.float64)
            return np.asarray(value, dtype=np.float64)
        return self.read_f32(key)


def _pickle_reason(exc: Exception) -> str:
    """The informative line of torch's weights_only refusal (it names the blocked global), else the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    telling = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return ((telling or lines or [type(exc).__name__])[0])[:300]


def torch_pickle_source(path: str | os.PathLike[str]) -> MappingSource:
    """A pickled PyTorch state dict (``adapter_model.bin`` / ``.pt``), loaded with ``weights_only=True`` only.

    ``weights_only`` makes torch refuse any pickle that would build arbitrary objects (code execution), which
    surfaces here as an ``InputError``. The whole file is loaded by torch (memory-mapped when the file uses the
    zip format), because a pickle cannot be read tensor by tensor.
    """
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "hf", f"reading the pickled adapter weights {os.fspath(path)}") from None
    regular_file_stat(path, "weights file")  # torch.load on a FIFO would block forever
    state: Any = None
    last_error: Exception | None = None
    for use_mmap in (True, False):
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=use_mmap)
            last_error = None
            break
        except pickle.UnpicklingError as exc:
            raise InputError("refusing to load: the pickle holds objects other than tensors and plain containers "
                             f"(loaded with weights_only=True; nothing was executed): {_pickle_reason(exc)}",
                             path) from None
        except FileNotFoundError:
            raise InputError("weights file not found", path) from None
        except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... for corrupt files
            last_error = exc
    if last_error is not None:
        text = str(last_error).strip().splitlines()
        raise InputError(f"not a readable PyTorch weights file ({type(last_error).__name__}: "
                         f"{(text[0] if text else '')[:300]})", path)
    if not isinstance(state, Mapping):
        raise InputError(f"PyTorch file holds a {type(state).__name__}, not a state dict of tensors", path)
    return MappingSource(state, origin=os.fspath(path))
