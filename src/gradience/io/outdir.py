"""Output directories written whole: check OUT, build it in a staging directory beside it, swap it in atomically.

Used by ``compress`` and ``merge`` (any command that writes a directory such as a PEFT adapter):

1. :func:`check_output_dir` refuses OUT == an input, OUT inside an input or an input inside OUT, OUT the
   current directory (or one above it), a symbolic link, a file, and a non-empty OUT unless ``force`` is given
   *and* OUT holds one of our reports (``markers``): ``--force`` never replaces a directory we did not write.
2. :func:`stage` creates ``.OUT.tmp-XXXXXXXX`` beside OUT (name shortened so it fits NAME_MAX for 255-byte
   names), holds an ``flock`` on it while the output is written (so a later run can tell a live staging
   directory from a killed one), and with :func:`write_file` every file is fsynced.
3. :func:`finalize` swaps the staging directory in: ``renameat2(RENAME_EXCHANGE)`` on Linux (OUT is the old or
   the new directory at every instant), then the old one is removed; elsewhere (or on a file system that
   refuses the exchange) OUT is renamed to ``.OUT.old-*`` first, and :func:`recover` puts it back on the next
   run if a kill came in between. The parent directory is fsynced after the rename.
4. :func:`recover` (called by :func:`check_output_dir`) removes staging/old leftovers of killed runs and
   reports what it did, so nothing accumulates silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradience.errors import InputError

NAME_MAX = 255
_RANDOM_LEN = 8            # tempfile.mkdtemp's random part
_RENAME_EXCHANGE = 2       # linux/fs.h
_AT_FDCWD = -100
_MARKER_MAX_BYTES = 64 * 1024 * 1024


def _umask_mode(full: int) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return full & ~mask


def staging_prefix(final_name: str, tag: str) -> str:
    """``.NAME.TAG-`` for the staging/old directories of ``final_name``, shortened (with a hash of the full name)
    when ``final_name`` is so long that the prefix plus mkdtemp's random part would exceed NAME_MAX bytes."""
    prefix = f".{final_name}.{tag}-"
    if len(os.fsencode(prefix)) + _RANDOM_LEN <= NAME_MAX:
        return prefix
    digest = hashlib.sha256(os.fsencode(final_name)).hexdigest()[:12]
    short = os.fsencode(final_name)[:120].decode("utf-8", "ignore")
    return f".{short}~{digest}.{tag}-"


def make_staging_dir(final: Path, tag: str) -> Path:
    """A fresh directory next to ``final`` with the mode a plain ``mkdir`` gives (mkdtemp's is 0700)."""
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final.name, tag), dir=final.parent))
    os.chmod(staging, _umask_mode(0o777))
    return staging


def _resolve(p: str | os.PathLike[str], what: Path) -> Path:
    try:
        return Path(p).expanduser().resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a symlink loop
        raise InputError(f"cannot resolve the path ({'symbolic link loop' if isinstance(exc, RuntimeError) else exc})",
                         what) from None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot use --out: {exc.strerror or exc}", path) from None


def is_our_output(path: Path, markers: Sequence[str]) -> bool:
    """True when ``path`` holds one of ``markers`` (e.g. ``compress.json``) as a regular file whose JSON has a
    ``gradience.*`` schema: the sign that an earlier run of ours wrote this directory."""
    for name in markers:
        marker = path / name
        try:
            st = os.lstat(marker)
            if (st.st_mode & 0o170000) != 0o100000 or st.st_size > _MARKER_MAX_BYTES:
                continue
            with open(marker, "rb") as fh:
                doc = json.loads(fh.read())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("schema"), str) and doc["schema"].startswith("gradience."):
            return True
    return False


@dataclass
class OutputDir:
    """A checked OUT: where to write, plus what :func:`recover` did about leftovers of killed runs."""

    path: Path                    # as given (for messages)
    resolved: Path                # absolute, symlinks of the parents resolved
    replaces: bool = False        # OUT exists and will be swapped out
    notes: list[str] = field(default_factory=list)


def check_output_dir(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], force: bool,
                     markers: Sequence[str], flag: str = "--out", clean: bool = True) -> OutputDir:
    """Refuse an OUT that writing could destroy or that is not ours to replace (see the module docstring).

    ``inputs``: directories (or files, whose parent counts) the command reads; ``markers``: file names of our
    own reports that make a non-empty OUT replaceable with ``force``; ``clean``: run :func:`recover` first
    (False for dry runs, which write nothing).
    """
    out_path = Path(out)
    if not os.fspath(out_path).strip():
        raise InputError(f"{flag} is empty")
    for part in out_path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(f"{flag} has a path component longer than {NAME_MAX} bytes", _short(out_path))
    out_r = _resolve(out_path, out_path)
    in_dirs: set[Path] = set()
    for p in inputs:
        rp = _resolve(p, Path(p))
        in_dirs.add(rp if rp.is_dir() else rp.parent)
    for in_dir in in_dirs:
        if out_r == in_dir or in_dir in out_r.parents:
            raise InputError(f"{flag} is the input adapter directory or inside it ({in_dir}); choose another "
                             "directory", out_path)
        if out_r in in_dir.parents:
            raise InputError(f"the input adapter ({in_dir}) is inside {flag}; replacing {flag} would delete it",
                             out_path)
    cwd = _resolve(os.getcwd(), Path("."))
    if out_r == cwd or out_r in cwd.parents:
        raise InputError(f"{flag} is the current directory or contains it; choose a new directory", out_path)
    result = OutputDir(path=out_path, resolved=out_r)
    parent_st = _lstat(out_r.parent)
    if parent_st is not None and not os.path.isdir(out_r.parent):
        raise InputError(f"the parent of {flag} is not a directory", out_path)
    if parent_st is not None and clean:
        result.notes.extend(recover(out_r))
    st = _lstat(out_path)
    if st is None:
        return result
    if (st.st_mode & 0o170000) == 0o120000:
        raise InputError(f"{flag} is a symbolic link; pass the directory itself (a link is never replaced)",
                         out_path)
    if (st.st_mode & 0o170000) != 0o040000:
        raise InputError(f"{flag} exists and is not a directory", out_path)
    try:
        with os.scandir(out_path) as it:
            non_empty = any(True for _ in it)
    except OSError as exc:
        raise InputError(f"cannot read {flag}: {exc.strerror or exc}", out_path) from None
    if non_empty and not force:
        raise InputError(f"{flag} is not empty; pass --force to replace it", out_path)
    if non_empty and not is_our_output(out_path, markers):
        raise InputError(f"{flag} is not empty and is not an earlier output of ours (no {' / '.join(markers)}); "
                         "--force only replaces those: choose a new directory", out_path)
    result.replaces = True
    return result


def _short(path: Path) -> str:
    text = os.fspath(path)
    return text if len(text) <= 120 else text[:60] + "…" + text[-40:]


# -- staging and leftovers ---------------------------------------------------------------------------------
def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on directory ``path``, or None when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _leftovers(out_r: Path, tag: str) -> list[Path]:
    prefix = staging_prefix(out_r.name, tag)
    try:
        with os.scandir(out_r.parent) as it:
            names = [e.name for e in it if e.name.startswith(prefix) and len(e.name) == len(prefix) + _RANDOM_LEN]
    except OSError:
        return []
    return [out_r.parent / n for n in sorted(names)]


def recover(out_r: Path) -> list[str]:
    """Clean up after killed runs that wrote ``out_r``; returns one note per action.

    A ``.OUT.old-*`` directory with no OUT is a kill between the two renames of the fallback swap: it is
    renamed back to OUT. Staging (``.OUT.tmp-*``) and other ``.OUT.old-*`` directories not locked by a live
    process are removed. Symbolic links and files with those names are left alone (never followed).
    """
    notes: list[str] = []
    olds = [p for p in _leftovers(out_r, "old") if _is_plain_dir(p)]
    if olds and _lstat(out_r) is None:
        newest = max(olds, key=lambda p: os.lstat(p).st_mtime_ns)
        fd = _try_lock(newest)
        if fd is not None:
            try:
                os.rename(newest, out_r)
                notes.append(f"restored {out_r.name} from {newest.name} (an earlier run was killed while "
                             "replacing it)")
                olds.remove(newest)
            except OSError:
                pass
            finally:
                os.close(fd)
    for stale in [*_leftovers(out_r, "tmp"), *olds]:
        if not _is_plain_dir(stale):
            continue
        fd = _try_lock(stale)
        if fd is None:
            continue  # a live run is writing it
        try:
            shutil.rmtree(stale)
            notes.append(f"removed {stale.name}, left by an earlier run that was killed")
        except OSError as exc:
            notes.append(f"could not remove {stale.name} (left by a killed run): {exc.strerror or exc}")
        finally:
            os.close(fd)
    return notes


def _is_plain_dir(path: Path) -> bool:
    try:
        return (os.lstat(path).st_mode & 0o170000) == 0o040000
    except OSError:
        return False


class Staging:
    """The staging directory of one output, locked while it exists (see :func:`stage`)."""

    def __init__(self, out: OutputDir) -> None:
        self.out = out
        try:
            out.resolved.parent.mkdir(parents=True, exist_ok=True)
            self.path = make_staging_dir(out.resolved, "tmp")
        except OSError as exc:
            raise InputError(f"cannot create the output directory: {exc.strerror or exc}", out.path) from None
        self._fd = _try_lock(self.path)
        self.done = False

    def write_file(self, name: str, data: bytes) -> Path:
        return write_file(self.path / name, data)

    def finalize(self) -> None:
        finalize(self.path, self.out.resolved)
        self.done = True

    def close(self) -> None:
        """Release the lock; remove the staging directory unless it became OUT."""
        if not self.done:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def stage(out: OutputDir) -> Iterator[Staging]:
    """``with stage(out) as st: write into st.path ...; st.finalize()`` -- on any error nothing is left behind
    and an existing OUT is untouched. OSErrors become one ``InputError`` naming OUT."""
    st = Staging(out)
    try:
        yield st
    except OSError as exc:
        raise InputError(f"cannot write the output (nothing was written): {exc.strerror or exc}",
                         out.path) from None
    finally:
        st.close()


def write_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file with the mode a plain ``open`` gives, fsynced."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_renameat2: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_renameat2_looked = False


def _exchange_fn() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _renameat2, _renameat2_looked
    if not _renameat2_looked:
        _renameat2_looked = True
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
    return _renameat2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot, OSError for other failures."""
    fn = _exchange_fn()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def finalize(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` in place as ``out``; an existing ``out`` is replaced atomically
    (exchange) or, where that is impossible, kept as ``.out.old-*`` until the new one is in place."""
    fsync_dir(tmp)
    if _lstat(out) is None:
        os.rename(tmp, out)
    elif exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)   # tmp now names the previous output
    else:
        old = make_staging_dir(out, "old")
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
