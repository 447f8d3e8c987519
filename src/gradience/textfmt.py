"""Number formatting shared by every text renderer (audit, monitor, check), pure Python and import-light.

One convention everywhere: a value that is unknown, null or not finite prints as ``-`` (never ``nan%``).
"""

from __future__ import annotations

import math
import re
from typing import Any

RULE = "=" * 72


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (bools excluded), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        return float(x) if math.isfinite(x) else None
    except OverflowError:  # an integer beyond float range (a 400-digit value from a hostile JSON)
        return None


def num(x: Any, fmt: str = ".2f") -> str:
    return "-" if finite(x) is None else format(x, fmt)


def pct(x: Any) -> str:
    """0.184 -> '18.4%'."""
    v = finite(x)
    return "-" if v is None else f"{v * 100:.1f}%"


def times(x: Any) -> str:
    """1.0912 -> '1.09x' (ratios such as the train/test gap)."""
    v = finite(x)
    return "-" if v is None else f"{v:.2f}x"


def rank_value(x: Any) -> str:
    """Percentiles of integer ranks: '2.5', '6' (no trailing .0)."""
    v = finite(x)
    if v is None:
        return "-"
    return str(int(v)) if v.is_integer() else f"{v:.1f}"


def human_count(n: Any) -> str:
    """294912 -> '294.9K' (parameter counts)."""
    v = finite(n)
    if v is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.1f}{unit}"
    return f"{int(v)}"


# Characters that must never reach a terminal raw from an input file (tensor names, alert messages, paths):
# C0/C1 controls (ESC starts CSI/OSC sequences that clear the screen or set the title), DEL, lone UTF-16
# surrogates (unencodable: printing them raises UnicodeEncodeError), bidi overrides and line separators
# (they reorder or split what the reader sees).
_UNSAFE = "\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069"
_UNSAFE_KEEP_LINES = re.compile(f"[{_UNSAFE}]")
_UNSAFE_ONE_LINE = re.compile(f"[{_UNSAFE}\\t\\n]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    if code == 0x0A:
        return "\\n"
    if code == 0x09:
        return "\\t"
    if code == 0x0D:
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: Any, *, keep_newlines: bool = False, max_len: int | None = None) -> str:
    """``text`` made safe to print: control characters, lone surrogates and bidi controls shown escaped
    (``\\x1b``, ``\\ud800``), newlines and tabs too unless ``keep_newlines`` (whole rendered reports keep their
    line structure; one-line messages must stay one line). ``max_len`` shortens very long input-derived
    strings (a 1 MB tensor name) to that many characters plus a note of the full length."""
    s = text if isinstance(text, str) else str(text)
    if max_len is not None and len(s) > max_len:
        s = f"{s[:max_len]}…({len(s)} chars)"
    if s.isascii() and s.isprintable():
        return s
    return (_UNSAFE_KEEP_LINES if keep_newlines else _UNSAFE_ONE_LINE).sub(_escape_char, s)
