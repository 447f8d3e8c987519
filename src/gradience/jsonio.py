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


# Every JSON document Gradience reads is a few levels deep (audit/compare/bench JSON <= 6, HF configs and
# telemetry payloads <= ~10). Python's decoder recurses in C up to the interpreter's recursion limit (~1000), and
# whatever walks the result afterwards (redaction, to_jsonable, normalisation) recurses in Python: a document
# 600 deep decodes and then crashes its consumer. So depth is bounded at the read, once, for every reader.
MAX_JSON_DEPTH = 64
# Counts, shapes, ranks and steps fit in 64 bits; a larger integer in an analysis document is corrupt (and
# turns into OverflowError wherever it meets a float).
MAX_JSON_INT = 2**63


def json_problem(doc: Any, *, max_depth: int = MAX_JSON_DEPTH, max_abs_int: int | None = None) -> str | None:
    """What makes a decoded document unusable (nesting deeper than ``max_depth``, an integer beyond
    ``max_abs_int``), with where it is (``layers[3].r``); None when it is fine. Iterative: never recurses.

    One pass over the containers with no bookkeeping (a 47k-row audit JSON: ~0.1 s on top of decoding); the
    path is worked out only for a document that fails."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth = pop()
        tv = type(value)
        if tv is dict or tv is list or tv is tuple or isinstance(value, (dict, list, tuple)):
            if depth >= max_depth:
                return _locate(doc, max_depth, max_abs_int)
            for v in (value.values() if isinstance(value, dict) else value):
                t = type(v)
                if t is float or t is str:
                    continue
                if t is dict or t is list or t is tuple or isinstance(v, (dict, list, tuple)):
                    push((v, depth + 1))
                elif max_abs_int is not None and t is int and (v > max_abs_int or v < -max_abs_int):
                    return _locate(doc, max_depth, max_abs_int)
        elif max_abs_int is not None and tv is int and (value > max_abs_int or value < -max_abs_int):
            return _locate(doc, max_depth, max_abs_int)
    return None


def _locate(doc: Any, max_depth: int, max_abs_int: int | None) -> str:
    """The problem :func:`json_problem` found, with its place (the slow path: paths kept for every value)."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(doc, 0, ())]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth >= max_depth:
                return f"nested too deeply (more than {max_depth} levels, at {_json_path(where)})"
            pairs = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, depth + 1, (*where, k if isinstance(k, int) else str(k))) for k, v in pairs)
        elif max_abs_int is not None and type(value) is int and abs(value) > max_abs_int:
            digits = int(value.bit_length() * 0.30103) + 1  # str() of a 5000-digit int itself raises
            return f"integer of about {digits} digits at {_json_path(where)} (no count or size is that large)"
    return "unusable"


def _json_path(where: tuple[str | int, ...]) -> str:
    out = "".join(f"[{p}]" if isinstance(p, int) else f".{p[:40]}" for p in where[:12]).lstrip(".")
    return (out + ("…" if len(where) > 12 else "")) or "the top level"


def loads_bounded(text: str | bytes, path: str | os.PathLike[str] | None = None, what: str = "file", *,
                  max_depth: int = MAX_JSON_DEPTH, max_abs_int: int | None = None,
                  max_items: int | None = None) -> Any:
    """``json.loads`` for input Gradience did not write: every way a document can be unusable becomes one
    :class:`~gradience.errors.InputError` naming ``path`` — syntax, nesting beyond ``max_depth``, integers
    beyond Python's 4300-digit limit or beyond ``max_abs_int``, and (``max_items``) more containers and
    values than a real document of its kind holds, refused *before* decoding, whose objects take ~10x the
    text (a 300 MB file of tiny rows would need gigabytes)."""
    from gradience.errors import InputError

    if max_items is not None:
        if isinstance(text, bytes):
            count = text.count(b"{") + text.count(b"[") + text.count(b",")
        else:
            count = text.count("{") + text.count("[") + text.count(",")
        if count > max_items:
            raise InputError(f"{what} holds about {count} JSON values, more than the {max_items} such a file "
                             "can have; refused before decoding", path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})",
                         path) from None
    except RecursionError:
        raise InputError(f"{what} is not usable JSON: nested too deeply", path) from None
    except UnicodeDecodeError:
        raise InputError(f"{what} is not UTF-8 text", path) from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        text_exc = str(exc)
        reason = ("an integer of more than 4300 digits" if "integer string conversion" in text_exc
                  else text_exc.splitlines()[0][:200] if text_exc else type(exc).__name__)
        raise InputError(f"{what} is not usable JSON: {reason}", path) from None
    problem = json_problem(doc, max_depth=max_depth, max_abs_int=max_abs_int)
    if problem is not None:
        raise InputError(f"{what} is not usable JSON: {problem}", path)
    return doc


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
    is readable by the serving process and colleagues exactly as any other file the user creates. The one
    implementation is :func:`gradience.io.outdir.make_staging_dir` (its name fits NAME_MAX for 255-byte names).
    """
    from gradience.io.outdir import make_staging_dir as _make

    return _make(final, tag)


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
