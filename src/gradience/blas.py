"""One BLAS thread for the tiny r×r LAPACK calls of audit/compress, also when the library is called in-process.

Why: an eigh/SVD of a 16×16 matrix is several times slower with a multi-threaded OpenBLAS (thread start-up and
spinning dominate), and much worse on a busy machine (issue 17: compress in-process 7-21 s wall against 0.6 s
from the CLI, which sets ``OPENBLAS_NUM_THREADS=1`` before numpy loads, see ``cli/main.py``). In-process the
environment is too late, so :func:`limited_blas_threads` calls the loaded BLAS library's own thread setter
through ctypes (the mechanism threadpoolctl uses; threadpoolctl itself is not a dependency) and restores the
previous count on exit. Where no known BLAS is found it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

# (setter, getter) symbol pairs, most specific first: numpy's wheels bundle scipy-openblas (64-bit ints,
# suffixed names), older wheels and distributions a plain OpenBLAS; MKL's runtime has its own pair.
_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
)
_LIB_MARKERS = ("openblas", "mkl_rt", "libblas")
_lock = threading.Lock()
_depth = 0
_saved: int | None = None


@dataclass(frozen=True)
class _Blas:
    path: str
    set_threads: ctypes._CFuncPtr  # type: ignore[name-defined]
    get_threads: ctypes._CFuncPtr  # type: ignore[name-defined]


_found: list[_Blas | None] = []


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process that look like a BLAS (Linux /proc/self/maps)."""
    paths: dict[str, None] = {}
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            path = line.rsplit(" ", 1)[-1].strip()
            name = os.path.basename(path).lower()
            if path.startswith("/") and ".so" in name and any(m in name for m in _LIB_MARKERS):
                paths[path] = None
    return list(paths)


def _find() -> _Blas | None:
    if _found:
        return _found[0]
    import numpy  # noqa: F401  (loads numpy's BLAS so that it is mapped)

    blas: _Blas | None = None
    for path in _loaded_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter = getattr(lib, set_name, None)
            getter = getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                blas = _Blas(path, setter, getter)
                break
        if blas is not None:
            break
    _found.append(blas)
    return blas


def blas_threads() -> int | None:
    """The loaded BLAS's current thread count (None when no known BLAS is loaded)."""
    blas = _find()
    return None if blas is None else int(blas.get_threads())


@contextlib.contextmanager
def limited_blas_threads(n: int = 1) -> Iterator[None]:
    """Run the block with the BLAS limited to ``n`` threads; re-entrant, restores the previous count."""
    global _depth, _saved
    blas = _find()
    if blas is None:
        yield
        return
    with _lock:
        if _depth == 0:
            current = int(blas.get_threads())
            _saved = current if current != n else None
            if _saved is not None:
                blas.set_threads(n)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                blas.set_threads(_saved)
                _saved = None
