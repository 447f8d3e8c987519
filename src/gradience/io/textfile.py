"""Reading small text inputs (JSON/YAML configs, indexes, caches, refs) safely: one copy of the checks.

Every small file Gradience reads (adapter_config.json, training configs, shard indexes, trainer_state.json,
the base-norms cache, a HF cache ``refs/<branch>``) goes through here, because the same hostile inputs hit
all of them: a directory or a FIFO passed as a file (``open`` blocks forever on a FIFO), ``/dev/zero`` (reads
until memory runs out), a multi-GB file, bytes that are not UTF-8, JSON nested 100k deep (RecursionError) or
integers beyond Python's 4300-digit conversion limit (ValueError). Each becomes one ``InputError`` naming the
file and the problem.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from gradience.errors import InputError

# Configs, indexes and caches are KBs to a few MB; a larger file is not one of them.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


def os_problem(exc: OSError) -> str:
    """A short description of an OS error: the OS's own words (``Permission denied``, ``File name too long``),
    never the repr with its errno tuple and repeated path."""
    known = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ENAMETOOLONG: "file name too long", errno.ENOENT: "no such file or directory",
             errno.ENOTDIR: "a component of the path is not a directory", errno.ELOOP: "too many symbolic links",
             errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
             errno.EISDIR: "is a directory"}
    return exc.strerror or known.get(exc.errno or 0) or type(exc).__name__


def regular_file_stat(path: str | os.PathLike[str], what: str = "file", *,
                      missing: str | None = None) -> os.stat_result:
    """``stat`` of ``path``, which must be an existing regular file (never a directory, FIFO or device).
    ``missing``: the message for a path that does not exist (default ``"<what> not found"``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(missing or f"{what} not found", path) from None
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte in the path
        problem = os_problem(exc) if isinstance(exc, OSError) else "invalid path"
        raise InputError(f"cannot read {what}: {problem}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} is a directory, not a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} is not a regular file (a FIFO, socket or device cannot be read as one)", path)
    return st


def read_bytes_limited(path: str | os.PathLike[str], *, what: str = "file",
                       max_bytes: int = DEFAULT_MAX_BYTES, missing: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (never blocks on a FIFO, never reads unbounded)."""
    st = regular_file_stat(path, what, missing=missing)
    if st.st_size > max_bytes:
        raise InputError(f"{what} is {st.st_size} bytes, more than the {max_bytes} bytes such a file can be", path)
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open() must still not block.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"cannot read {what}: {os_problem(exc)}", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{what} is not a regular file", path)
        chunks: list[bytes] = []
        total = 0
        while True:
            # os.read allocates what it is asked for: ask for what the stat promised (+1 to see growth)
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total, max(st.st_size - total, 0) + 1))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise InputError(f"{what} is more than the {max_bytes} bytes such a file can be", path)
    except OSError as exc:
        raise InputError(f"cannot read {what}: {os_problem(exc)}", path) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text_limited(path: str | os.PathLike[str], *, what: str = "file", max_bytes: int = DEFAULT_MAX_BYTES,
                      allow_bom: bool = True, missing: str | None = None) -> str:
    """The UTF-8 text of a small regular file (a leading BOM is dropped when ``allow_bom``)."""
    raw = read_bytes_limited(path, what=what, max_bytes=max_bytes, missing=missing)
    try:
        return raw.decode("utf-8-sig" if allow_bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text (byte {exc.start})", path) from None


def parse_json(text: str | bytes, path: str | os.PathLike[str] | None, what: str = "file") -> Any:
    """``json.loads`` whose every failure (syntax, nesting depth, giant integers) is an InputError; nesting is
    bounded below what the decoder tolerates, so no consumer recursing over the result can overflow
    (the one loader: :func:`gradience.jsonio.loads_bounded`)."""
    from gradience.jsonio import loads_bounded

    return loads_bounded(text, path, what)


def read_json_file(path: str | os.PathLike[str], *, what: str = "file", max_bytes: int = DEFAULT_MAX_BYTES,
                   missing: str | None = None) -> Any:
    """Read and decode a small JSON file; every failure is one InputError naming the file."""
    return parse_json(read_text_limited(path, what=what, max_bytes=max_bytes, missing=missing), path, what)


def probe(path: str | os.PathLike[str]) -> os.stat_result | None:
    """``stat`` that answers None for a path that does not exist and raises InputError for one that cannot
    be looked at (name too long, permission denied, NUL byte), where ``Path.exists()`` would raise OSError."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"cannot access: {os_problem(exc)}", path) from None
    except ValueError:
        raise InputError("invalid path (embedded NUL byte)", os.fspath(path).replace("\0", "\\0")) from None


def is_dir(path: str | os.PathLike[str]) -> bool:
    st = probe(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def is_file(path: str | os.PathLike[str]) -> bool:
    """True for an existing regular file (what every reader here needs)."""
    st = probe(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def exists(path: str | os.PathLike[str]) -> bool:
    return probe(path) is not None


__all__ = ["DEFAULT_MAX_BYTES", "exists", "is_dir", "is_file", "os_problem", "parse_json", "probe",
           "read_bytes_limited", "read_json_file", "read_text_limited", "regular_file_stat"]
