"""Typed, bounded reading of bench config values (one place for every key's type and range check).

Why bounded: a config is input. A 5000-digit integer, a superscript digit or a list of a million names
must become one clear error naming the dotted key, never a ValueError from ``int()`` or a long loop.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from gradience.errors import InputError

MAX_SEEDS = 64
MAX_ARMS = 64
MAX_RANK = 4096
_MAX_DIGITS = 40  # an integer key never needs more; longer digit strings are refused before int()


def closest(key: str, known: tuple[str, ...] | list[str]) -> str:
    """`` (did you mean 'x'?)`` for a misspelt key, else the list of known keys."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (known keys: {', '.join(known)})"


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message, shortened; never ``str()`` of a giant int (Python refuses > 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value) if isinstance(value, str) else str(value)
    except ValueError:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "…"


def to_int(value: Any) -> int:
    """An integer from an int, an integral float or a plain ASCII digit string; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        digits = s[1:] if s[:1] in "+-" else s
        if not digits or len(digits) > _MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
            raise ValueError  # '²'.isdigit() is True, int('²') is not; 5000 digits exceed int()'s limit
        return int(s)
    raise ValueError


class Reader:
    """Typed access to one config section, every error naming the file and the dotted key."""

    def __init__(self, path: str, section: str, data: Mapping[str, Any]) -> None:
        self.path, self.section, self.data = path, section, data

    def err(self, key: str, problem: str) -> InputError:
        where = f"{self.section}.{key}" if self.section else key
        return InputError(f"{where}: {problem}", path=self.path)

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def _scalar(self, key: str, what: str) -> int | float | str | None:
        """The raw value of a numeric key: None when absent, an error for lists, maps and booleans."""
        v = self.data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
            raise self.err(key, f"expected {what}, got {type(v).__name__}")
        return v

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        v = self._scalar(key, "an integer")
        if v is None:
            return None
        try:
            iv = to_int(v)
        except (ValueError, OverflowError):
            raise self.err(key, f"expected an integer, got {show(v)}") from None
        if not lo <= iv <= hi:
            raise self.err(key, f"must be between {lo} and {hi}, got {show(iv)}")
        return iv

    def number(self, key: str, lo: float, hi: float) -> float | None:
        v = self._scalar(key, "a number")
        if v is None:
            return None
        try:
            if isinstance(v, str) and len(v) > 64:
                raise ValueError
            fv = float(v)  # YAML 1.1 reads 5e-5 as a string: coerce it
        except (ValueError, OverflowError):
            raise self.err(key, f"expected a number, got {show(v)}") from None
        if not (lo <= fv <= hi):  # also rejects NaN
            raise self.err(key, f"must be between {lo:g} and {hi:g}, got {fv!r}")
        return fv

    def text(self, key: str) -> str | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip() or len(v) > 4096:
            raise self.err(key, "expected a non-empty string")
        return v.strip()

    def flag(self, key: str) -> bool | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self.err(key, f"expected true or false, got {show(v)}")
        return v

    def names(self, key: str) -> tuple[str, ...] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            v = [t for t in v.replace(",", " ").split() if t]
        if not isinstance(v, list) or not v or len(v) > 256 or not all(isinstance(t, str) and t for t in v):
            raise self.err(key, "expected a non-empty list of names")
        return tuple(v)

    def integers(self, key: str, lo: int, hi: int, max_len: int) -> tuple[int, ...] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            v = [t for t in v[:100_000].replace(",", " ").split(maxsplit=max_len) if t]
        elif isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or len(v) > max_len:
            raise self.err(key, f"expected a non-empty list of at most {max_len} integers")
        out = []
        for item in v:
            try:
                iv = to_int(item)
            except (TypeError, ValueError, OverflowError):
                raise self.err(key, f"expected integers, got {show(item)}") from None
            if not lo <= iv <= hi:
                raise self.err(key, f"values must be between {lo} and {hi}, got {show(iv)}")
            out.append(iv)
        return tuple(out)


def parse_arms(spec: Any, path: str = "--arms", known: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Arm names: the built-in ones (``known``) and ``uniform:K``; a string is comma/space separated."""
    items = [t for t in spec[:100_000].replace(",", " ").split(maxsplit=MAX_ARMS) if t] \
        if isinstance(spec, str) else spec
    if not isinstance(items, list | tuple) or not items or len(items) > MAX_ARMS:
        raise InputError(f"arms: expected a non-empty list of at most {MAX_ARMS} arm names", path=path)
    out: list[str] = []
    for arm in items:
        if not isinstance(arm, str):
            raise InputError(f"arms: expected names, got {show(arm)}", path=path)
        if arm.startswith("uniform:"):
            try:
                k = to_int(arm.partition(":")[2])
            except ValueError:
                k = 0
            if not 1 <= k <= MAX_RANK:
                raise InputError(f"arms: {show(arm)}: uniform:K needs a rank K between 1 and {MAX_RANK}",
                                 path=path)
            arm = f"uniform:{k}"
        elif arm not in known:
            raise InputError(f"arms: unknown arm {show(arm)}{closest(arm, [*known, 'uniform:K'])}", path=path)
        if arm not in out:
            out.append(arm)
    return tuple(out)


def parse_seeds(spec: Any, path: str = "--seeds") -> tuple[int, ...]:
    r = Reader(path, "", {"seeds": spec})
    seeds = r.integers("seeds", 0, 2**32 - 1, MAX_SEEDS)
    assert seeds is not None
    return tuple(dict.fromkeys(seeds))
