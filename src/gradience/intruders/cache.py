"""On-disk cache of base partial spectra (top left singular vectors of W), so that a second intruder audit against
the same base does no base-side Krylov work.

One ``.npz`` per base tensor in a directory (default ``<user cache>/gradience/base_spectra/``, beside the UDR
norms cache of :mod:`gradience.udr.cache`), named by the blake2b hash of the tensor's stored bytes, dtype, shape
and orientation: a changed tensor is a different key, never a stale hit. Each file is written atomically
(:func:`gradience.jsonio.atomic_write_bytes`), holds at most ``INTRUDER_CACHE_MAX_VECTORS`` float32 vectors, and
the directory is kept under ``INTRUDER_CACHE_MAX_BYTES`` (oldest files dropped first). A file that does not load
as the expected arrays is reported (info) and recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradience.intruders.detect import BaseSpectrum
from gradience.io.textfile import os_problem
from gradience.issues import Issue
from gradience.jsonio import atomic_write_bytes
from gradience.policy.thresholds import INTRUDER_CACHE_MAX_BYTES, INTRUDER_CACHE_MAX_VECTORS
from gradience.udr.cache import default_cache_path

SPECTRA_DIRNAME = "base_spectra"
_SUFFIX = ".npz"
_OWN_NAME = re.compile(r"[0-9a-f]{40}\.npz")  # tensor_hash() + suffix: the only files _trim may delete
_FORMAT = 1


def default_spectra_dir() -> Path:
    return default_cache_path().parent / SPECTRA_DIRNAME


def tensor_hash(raw: np.ndarray, dtype: str, shape: tuple[int, ...], transposed: bool) -> str:
    """blake2b of the stored bytes plus what makes the same bytes a different matrix."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{_FORMAT}|{dtype}|{list(shape)}|{int(transposed)}|".encode())
    h.update(np.ascontiguousarray(raw).reshape(-1).view(np.uint8).data)  # the mapped bytes, no copy
    return h.hexdigest()


@dataclass
class SpectraCache:
    """The cache directory; ``hits``/``misses``/``issues`` say what happened during one audit."""

    root: Path
    max_bytes: int = INTRUDER_CACHE_MAX_BYTES
    hits: int = 0
    misses: int = 0
    written: int = 0
    issues: list[Issue] = field(default_factory=list)

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None) -> SpectraCache:
        return cls(Path(path).expanduser() if path else default_spectra_dir())

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    def get(self, key: str, m: int, min_vectors: int) -> BaseSpectrum | None:
        """The cached spectrum when it has at least ``min_vectors`` vectors (or is complete)."""
        path = self._path(key)
        try:
            if not path.is_file():
                return None
            with np.load(path, allow_pickle=False) as data:
                u = np.asarray(data["u"], dtype=np.float64)
                sigma = np.asarray(data["sigma"], dtype=np.float64)
                complete = bool(data["complete"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            self.issues.append(Issue("intruder_cache_corrupt", f"{path}: unusable cached base spectrum "
                                     f"({type(exc).__name__}); recomputed", "info"))
            return None
        if u.ndim != 2 or u.shape[0] != m or sigma.shape != (u.shape[1],) or not np.isfinite(u).all():
            self.issues.append(Issue("intruder_cache_corrupt", f"{path}: cached base spectrum has the wrong "
                                     "shape; recomputed", "info"))
            return None
        if u.shape[1] < min_vectors and not complete:
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept longest when the directory is trimmed
        return BaseSpectrum(u, sigma, complete)

    def put(self, key: str, spectrum: BaseSpectrum) -> None:
        """Store the top ``INTRUDER_CACHE_MAX_VECTORS`` vectors (a complete spectrum stays complete only when it
        fits), then trim the directory to its size bound."""
        p = min(spectrum.u.shape[1], INTRUDER_CACHE_MAX_VECTORS)
        complete = spectrum.complete and p == spectrum.u.shape[1]
        buf = io.BytesIO()
        np.savez(buf, u=spectrum.u[:, :p].astype(np.float32), sigma=spectrum.sigma[:p].astype(np.float64),
                 complete=np.asarray(complete))
        data = buf.getvalue()
        if len(data) > self.max_bytes:
            return
        try:
            atomic_write_bytes(self._path(key), data)
            self.written += 1
            self._trim()
        except OSError as exc:
            if not any(i.code == "intruder_cache_unwritable" for i in self.issues):  # once, not once per layer
                self.issues.append(Issue("intruder_cache_unwritable", f"{self.root}: cannot write the base spectra "
                                         f"cache ({os_problem(exc)}); base spectra will be recomputed", "warning"))

    def _trim(self) -> None:
        files = []
        for entry in os.scandir(self.root):
            # only files this cache wrote: a user's own .npz in a directory given as --intruder-cache stays
            if _OWN_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                files.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _t, size, _p in files)
        for _t, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                continue
