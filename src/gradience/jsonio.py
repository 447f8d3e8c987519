"""JSON conventions shared by every output, and atomic file writes.

Two non-finite policies exist on purpose: analysis outputs (audit/monitor/check JSON) write ``null`` for a
value that is not a finite number, telemetry writes the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``
so the event survives strict JSON parsers and is read back as a float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

NonFinite = Literal["null", "string"]
_NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float(x: float, nonfinite: NonFinite) -> float | str | None:
    if math.isfinite(x):
        return x
    if nonfinite == "null":
        return None
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def to_jsonable(obj: Any, nonfinite: NonFinite = "null") -> Any:
    """Convert dataclasses, numpy scalars/arrays, tuples and paths into plain JSON values."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return _float(obj, nonfinite)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, nonfinite) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict(), nonfinite)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), nonfinite)
    if type(obj).__module__ == "numpy":  # numpy scalar or array without importing numpy here
        return to_jsonable(obj.tolist(), nonfinite)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def dumps(obj: Any, *, pretty: bool = True, nonfinite: NonFinite = "null") -> str:
    """Strict JSON text (never bare NaN). Key order is the insertion order of the producing code."""
    data = to_jsonable(obj, nonfinite)
    if pretty:
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode_nonfinite(value: Any) -> Any:
    """Map telemetry's ``"NaN"``/``"Infinity"``/``"-Infinity"`` strings back to floats (others unchanged)."""
    if isinstance(value, str) and value in _NONFINITE_STRINGS:
        return _NONFINITE_STRINGS[value]
    return value


def _umask_mode(full: int) -> int:
    """``full`` less the process umask: the mode ``open``/``mkdir`` would have given (mkstemp gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return full & ~mask


def make_staging_dir(final: Path, tag: str) -> Path:
    """A fresh directory next to ``final`` to build an output in, then rename into place.

    ``mkdtemp`` makes it 0700; it gets the mode a plain ``mkdir`` would have, so a written adapter or report
    is readable by the serving process and colleagues exactly as any other file the user creates.
    """
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    os.chmod(staging, _umask_mode(0o777))
    return staging


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    import tempfile  # only writers need it (a printed JSON document does not)

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _umask_mode(0o666))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
