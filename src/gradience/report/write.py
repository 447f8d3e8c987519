"""Writing the page: where it goes by default, and never over a file that is not a report of the same input.

A page records its input in ``<meta name="gradience-report-input">`` (the absolute path); an existing file at
OUT is replaced only when it is such a page of the same input (or of the directory whose file it reads), or
with ``force`` (issue 17 item 3: ``report X.json`` must not silently replace another input's report.html).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.report.build import REPORT_FILENAME, build_report
from gradience.textfmt import safe_text


def input_id(path: str | os.PathLike[str]) -> str:
    """How a page records its input: the absolute path (symlinks resolved when possible)."""
    p = Path(path)
    try:
        return str(p.resolve())
    except (OSError, RuntimeError):
        return str(p.absolute())


INPUT_META = "gradience-report-input"
_GENERATOR = b'<meta name="generator" content="gradience'
_INPUT_META_RE = re.compile(r'<meta name="gradience-report-input" content="([^"]*)">')
_HEAD_BYTES = 4096


def _recorded_input(target: Path) -> tuple[bool, str | None]:
    """(is a report we wrote, the input it records) of an existing file; InputError when it cannot be read."""
    import html

    try:
        with open(target, "rb") as fh:  # a regular file (checked by the caller): no FIFO can block here
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read the existing file to check it: {exc.strerror or exc}", target) from None
    if _GENERATOR not in head:
        return False, None
    m = _INPUT_META_RE.search(head.decode("utf-8", "replace"))
    return True, html.unescape(m.group(1)) if m else None


# Files a directory's report is made from: ``report DIR`` and ``report DIR/<one of these>`` describe one thing.
_DIRECTORY_FILES = frozenset({"bench.json", "run.jsonl", "trainer_state.json", "adapter_config.json"})


def _same_subject(recorded: str, current: str) -> bool:
    """The same input, or a directory and the file its report reads (``gradience report OUT`` and the bench's
    own ``report OUT/bench.json`` describe the same bench)."""
    a, b = Path(recorded), Path(current)
    return a == b or (a.parent == b and a.name in _DIRECTORY_FILES) or (b.parent == a and b.name in _DIRECTORY_FILES)


def _check_overwrite(target: Path, source: str, force: bool) -> None:
    """Refuse to replace a file that is not a report of this input unless ``force`` (issue 17 item 3)."""
    try:
        st = target.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"cannot write the report: {exc.strerror or exc}", target) from None
    if force:
        return
    if not stat.S_ISREG(os.stat(target).st_mode if stat.S_ISLNK(st.st_mode) else st.st_mode):
        raise InputError("exists and is not a regular file; choose another -o", target)
    ours, recorded = _recorded_input(target)
    if not ours:
        raise InputError("exists and is not a gradience report; pass --force to replace it, or choose another -o",
                         target)
    if recorded is not None and not _same_subject(recorded, source):
        raise InputError(f"holds the report of another input ({safe_text(recorded, max_len=200)}); pass --force "
                         "to replace it, or choose another -o", target)


def write_report(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 force: bool = False, **kwargs: Any) -> Path:
    """Build the report of PATH and write it atomically to ``out`` (default: ``report.html`` in a directory,
    ``X.html`` beside an input file ``X.json`` / ``X.jsonl``). An existing file there is replaced only when
    it is a report of the same input (recorded in the page's ``gradience-report-input`` meta tag) or with
    ``force``: a report of another input, or anyone's other file, is never overwritten silently."""
    from gradience.jsonio import atomic_write_text

    report = build_report(path, **kwargs)
    target = Path(out) if out is not None else report.default_out
    try:
        if target.is_dir():
            target = target / REPORT_FILENAME
        _check_overwrite(target, report.input_id, force)
        atomic_write_text(target, report.html)
    except OSError as exc:
        raise InputError(f"cannot write the report: {exc.strerror or exc}", target) from None
    return target
