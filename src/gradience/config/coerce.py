"""Value coercion for config inputs: numbers written as strings (``"5e-5"``, YAML 1.1's unquoted ``5e-5``),
booleans written as words, target lists written as one string.

Every failure is an ``InputError`` that names the source file (when known) and the key, because a config
typo must be fixable from the one error line alone.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any

from gradience.errors import InputError

# Characters that make a target string a PEFT regular expression rather than a list of names.
_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")
_TRUE = frozenset({"true", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "no", "n", "off", "0"})
# Bounds on the size of structures copied into ``extras`` (YAML aliases can describe exponentially large
# or cyclic trees in a few bytes; copying them naively would hang or exhaust memory).
MAX_EXTRAS_NODES = 100_000
MAX_EXTRAS_DEPTH = 64
# Ranks and counts beyond 2**53 are no longer exact as floats and no real config has one; r = 1e308 would
# become a 309-digit int that overflows every ratio computed from it.
MAX_CONFIG_INT = 2**53
# YAML reads ``0x<5000 hex digits>`` as an int that ``str()`` refuses (Python's 4300-digit limit).
_MAX_INT_BITS = 64


def _digits(value: int) -> int:
    """Decimal digits of ``value`` without ``str()`` (which raises beyond 4300 digits)."""
    return int(abs(value).bit_length() * 0.30103) + 1


class Where:
    """Names the place a value came from, for error messages: file (or source label) and key."""

    def __init__(self, origin: str | None, label: str) -> None:
        self.origin = origin
        self.label = label

    def error(self, key: str, problem: str) -> InputError:
        if self.origin:
            return InputError(f"key '{key}': {problem}", self.origin)
        return InputError(f"{self.label}: key '{key}': {problem}")


def to_float(value: Any, key: str, where: Where) -> float | None:
    """A finite float (sign not checked: negative values are reported by the rules, not rejected here)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise where.error(key, f"expected a number, got a boolean ({value})")
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:  # a 400-digit integer
            raise where.error(key, f"number out of range ({_digits(int(value))} digits)") from None
    elif isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in {"none", "null"}:
            return None
        try:
            out = float(text)
        except ValueError:
            raise where.error(key, f"cannot read {value!r} as a number") from None
    else:
        raise where.error(key, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(out):
        raise where.error(key, f"expected a finite number, got {value!r}")
    return out


def to_rank(value: Any, key: str, where: Where) -> int | float | None:
    """An integer when the value is integral; a non-integral number is kept (the ``fix_rank`` rule reports
    it) so that ``r: 8.5`` yields advice rather than a crash."""
    number = to_float(value, key, where)
    if number is None:
        return None
    if abs(number) > MAX_CONFIG_INT:
        raise where.error(key, f"rank {number:g} is out of range (larger than 2**53)")
    return int(number) if number.is_integer() else number


def to_int(value: Any, key: str, where: Where) -> int | None:
    number = to_float(value, key, where)
    if number is None:
        return None
    if not number.is_integer():
        raise where.error(key, f"expected a whole number, got {value!r}")
    if abs(number) > MAX_CONFIG_INT:
        raise where.error(key, f"{number:g} is out of range (larger than 2**53)")
    return int(number)


def to_bool(value: Any, key: str, where: Where) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if text in {"", "none", "null"}:
            return None
    raise where.error(key, f"cannot read {value!r} as true/false")


def to_str(value: Any, key: str, where: Where) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise where.error(key, f"expected a string, got an integer of {_digits(value)} digits")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value).strip()
        return text or None
    raise where.error(key, f"expected a string, got {type(value).__name__}")


def looks_like_regex(text: str) -> bool:
    """PEFT treats a string ``target_modules`` as a regular expression; these characters give one away."""
    return bool(_REGEX_CHARS.search(text))


def split_targets(text: str) -> list[str]:
    """``"q_proj, v_proj"`` / ``"q_proj v_proj"`` -> names; a PEFT regex (``.*(q|v)_proj$``) stays whole."""
    text = text.strip()
    if not text:
        return []
    if looks_like_regex(text):
        return [text]
    return [part for part in re.split(r"[,\s]+", text) if part]


def to_targets(value: Any, key: str, where: Where) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return split_targets(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        out: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise where.error(key, f"expected module names (strings), got {type(item).__name__} {item!r}")
            out.extend(split_targets(item))
        return out
    raise where.error(key, f"expected a list of module names or a comma-separated string, got {type(value).__name__}")


def to_betas(value: Any, key: str, where: Where) -> list[float] | None:
    if value is None:
        return None
    items: list[Any]
    if isinstance(value, str):
        items = [p for p in re.split(r"[,\s()\[\]]+", value) if p]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise where.error(key, f"expected two numbers (beta1, beta2), got {type(value).__name__}")
    if len(items) != 2:
        raise where.error(key, f"expected two numbers (beta1, beta2), got {len(items)}")
    betas: list[float] = []
    for item in items:
        number = to_float(item, key, where)
        if number is None:
            raise where.error(key, f"expected two numbers (beta1, beta2), got {value!r}")
        betas.append(number)
    return betas


def plain(value: Any, key: str, where: Where) -> Any:
    """A JSON-friendly copy of an unknown value kept in ``extras`` (enums -> values, sets -> sorted lists,
    anything exotic -> its string), refusing cyclic or oversized structures."""
    budget = [MAX_EXTRAS_NODES]

    def walk(v: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_EXTRAS_DEPTH:
            raise where.error(key, "value is too large or too deeply nested (cyclic YAML aliases?)")
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > _MAX_INT_BITS:
            raise where.error(key, f"an integer of {_digits(v)} digits (beyond what any setting holds)")
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, enum.Enum):
            return walk(v.value, depth + 1)
        if isinstance(v, dict):
            return {str(k): walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (set, frozenset)):
            return [walk(x, depth + 1) for x in sorted(v, key=str)]
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        return str(v)

    return walk(value, 0)
