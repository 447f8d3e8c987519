"""The audit JSON text (``gradience audit --json``): pretty, stable key order, written by the C encoder.

Why a writer of its own: ``json.dumps(indent=2)`` runs the pure-Python encoder, and :func:`jsonio.to_jsonable`
walks every value first; on an MoE expert adapter (12,288 rows, a 12,288-entry ``composition.energy_share``) that
was most of the audit's own CPU time. Here the rows are written by one C-encoder call, one row per line (easier
to read and to grep), and every large flat container (a dict of scalars, a list of scalars) is written entry per
line exactly as ``json.dumps(indent=2)`` writes it; the rest goes through :func:`gradience.jsonio.dumps`. The
parsed document is the one :func:`gradience.jsonio.dumps` gives (tests compare them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from gradience import jsonio

try:  # the C string encoder json itself uses (ensure_ascii=False); the Python one writes the same text
    from json.encoder import encode_basestring as _encode_str
except ImportError:  # pragma: no cover - every CPython has it
    _encode_str = json.dumps

_ROW_KEYS = ("layers", "top_wasteful")
# Flat containers at least this long are written by the fast path (shorter ones cost nothing either way).
_FLAT_MIN = 16
# Between two rows that start with their "name" key, the C encoder writes exactly this; inside a JSON string a
# quote is always escaped, so it can only occur there between two dicts (the count is checked anyway).
_ROW_JOIN = '}, {"name": '


def dumps_json(doc: Mapping[str, Any]) -> str:
    """The audit JSON (a summary, or the multi-adapter document ``{"adapters": {name: summary}}``)."""
    blocks: list[tuple[str, Any]] = []
    tag = f"@@gradience-block-{id(blocks)}-"

    def token(kind: str, value: Any) -> str:
        blocks.append((kind, value))
        return f"{tag}{len(blocks) - 1}@@"

    def stash(summary: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: (token("rows", v) if k in _ROW_KEYS and isinstance(v, list) and v else _flat(v, token))
               for k, v in summary.items()}
        return out

    adapters = doc.get("adapters")
    if isinstance(adapters, Mapping):
        shallow: dict[str, Any] = dict(doc)
        shallow["adapters"] = {k: stash(v) if isinstance(v, Mapping) else v for k, v in adapters.items()}
    else:
        shallow = stash(doc)
    text = jsonio.dumps(shallow, pretty=True)
    if not blocks:
        return text
    parts: list[str] = []
    at = 0
    for m in re.finditer(re.escape(json.dumps(tag)[:-1]) + r'(\d+)@@"', text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        line = text[line_start:m.start()]
        indent = line[: len(line) - len(line.lstrip(" "))]
        kind, value = blocks[int(m.group(1))]
        parts.append(text[at:m.start()])
        parts.append(_rows_text(value, indent) if kind == "rows" else value.replace("\n", "\n" + indent))
        at = m.end()
    parts.append(text[at:])
    return "".join(parts)


def _flat(value: Any, token: Any) -> Any:
    """``value`` with every large flat container in it replaced by a token for its pre-written text."""
    if isinstance(value, dict):
        if len(value) >= _FLAT_MIN:
            text = _flat_dict_text(value)
            if text is not None:
                return token("text", text)
        return {k: _flat(v, token) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) >= _FLAT_MIN:
            text = _flat_list_text(value)
            if text is not None:
                return token("text", text)
        return [_flat(v, token) for v in value]
    return value


def _scalar(v: Any) -> str | None:
    """``v`` as ``json.dumps`` writes it after :func:`jsonio.to_jsonable` (non-finite float: null); None for a
    value that is not a plain scalar (the caller then leaves the container to the general path)."""
    t = type(v)
    if t is str:
        return _encode_str(v)
    if t is float:
        return float.__repr__(v) if math.isfinite(v) else "null"
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    return None


def _flat_dict_text(d: dict[Any, Any]) -> str | None:
    items = []
    for k, v in d.items():
        s = _scalar(v)
        if s is None or type(k) is not str:
            return None
        items.append(f"{_encode_str(k)}: {s}")
    return "{\n  " + ",\n  ".join(items) + "\n}"


def _flat_list_text(values: list[Any]) -> str | None:
    items = []
    for v in values:
        s = _scalar(v)
        if s is None:
            return None
        items.append(s)
    return "[\n  " + ",\n  ".join(items) + "\n]"


def _rows_text(rows: list[Any], indent: str) -> str:
    """``[`` / one row per line / ``]``, the rows at ``indent`` + 2 spaces."""
    sep = ",\n" + indent + "  "
    whole = _rows_one_call(rows)
    if whole is not None:
        body = whole[1:-1].replace(_ROW_JOIN, "}" + sep + '{"name": ')
    else:
        body = sep.join(_row_json(row) for row in rows)
    return "[\n" + indent + "  " + body + "\n" + indent + "]"


def _rows_one_call(rows: list[Any]) -> str | None:
    """All rows by one C-encoder call, or None where its row boundaries cannot be told apart for sure."""
    if not all(type(row) is dict and next(iter(row), None) == "name" for row in rows):
        return None
    try:
        text = json.dumps(rows, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # a numpy scalar or a non-finite number: per row, with the conversion
        return None
    return text if text.count(_ROW_JOIN) == len(rows) - 1 else None


def _row_json(row: Any) -> str:
    try:  # rows hold plain Python values: the C encoder takes them as they are
        return json.dumps(row, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # a numpy scalar or a non-finite number: the shared conversion
        return json.dumps(jsonio.to_jsonable(row), ensure_ascii=False, allow_nan=False)
