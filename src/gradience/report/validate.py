"""The shape of a JSON document ``report`` shows, checked once where it is read (not at every access).

Each document kind (audit, compare, bench) declares the keys its view reads and what they must hold: an
object, a list of objects, a list. A key that is absent or null is fine (the page shows ``-``); one that holds
something else is one :class:`~gradience.errors.InputError` naming the key path, e.g. ``layers[3] is a str,
expected an object``. Numbers need no check here: the views read them through ``textfmt.finite`` (non-finite
and out-of-range values print as ``-``) and the loader refuses integers no count can reach.

Adding a document kind (a merge view): one ``Shape`` below and one line in :data:`SHAPES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gradience.errors import InputError

OBJ, LIST, OBJ_LIST, OBJ_MAP, STR = "object", "list", "list of objects", "object of objects", "string"
_PY = {OBJ: dict, LIST: list, OBJ_LIST: list, OBJ_MAP: dict, STR: str}
_ARTICLE = {OBJ: "an object", LIST: "a list", OBJ_LIST: "a list of objects", OBJ_MAP: "an object of objects",
            STR: "a string"}


@dataclass(frozen=True)
class Shape:
    """What the keys of one object must hold; ``items`` / ``values`` describe the elements of a list of
    objects / object of objects by key (a nested Shape)."""

    keys: dict[str, str] = field(default_factory=dict)
    nested: dict[str, Shape] = field(default_factory=dict)   # key -> shape of the object(s) it holds
    required: tuple[str, ...] = ()


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _what(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check(obj: dict[str, Any], shape: Shape, where: str, path: str | os.PathLike[str]) -> None:
    for key in shape.required:
        if key not in obj or obj[key] is None:
            raise InputError(f"{where or 'the document'} has no {key!r} (not the output of the command it names)",
                             path)
    for key, kind in shape.keys.items():
        value = obj.get(key)
        if value is None:
            continue
        at = f"{where}.{key}" if where else f"{key!r}"
        item_at = f"{where}.{key}" if where else key
        if not isinstance(value, _PY[kind]) or isinstance(value, bool):
            raise InputError(f"{at} is {_what(value)}, expected {_ARTICLE[kind]}", path)
        sub = shape.nested.get(key)
        if kind == OBJ_LIST:
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise InputError(f"{item_at}[{i}] is {_what(item)}, expected an object", path)
                if sub is not None:
                    _check(item, sub, f"{item_at}[{i}]", path)
        elif kind == OBJ_MAP:
            for name, item in value.items():
                if item is not None and not isinstance(item, dict):
                    raise InputError(f"{item_at}[{str(name)[:60]!r}] is {_what(item)}, expected an object", path)
                if sub is not None and item is not None:
                    _check(item, sub, f"{item_at}[{str(name)[:60]!r}]", path)
        elif kind == OBJ and sub is not None:
            _check(value, sub, item_at, path)


_ISSUES = OBJ_LIST
_ISSUE = Shape({"modules": LIST})

AUDIT = Shape(
    {"layers": OBJ_LIST, "issues": _ISSUES, "adapter": OBJ, "by_type": OBJ_MAP, "global_rank_suggestions": OBJ,
     "rank_suggestions": OBJ, "composition": OBJ},
    {"layers": Shape({"singular_values": LIST}, required=("name",)), "issues": _ISSUE,
     "global_rank_suggestions": Shape({"median": OBJ, "p90": OBJ}),
     "rank_suggestions": Shape({"rank_pattern": OBJ, "alpha_pattern": OBJ, "by_type": OBJ_MAP, "layers": OBJ_LIST},
                               {"layers": Shape(required=("name",))})})
AUDIT_MULTI = Shape({"adapters": OBJ_MAP}, {"adapters": AUDIT}, required=("adapters",))
_SIDE_ROW = Shape({"a": OBJ, "b": OBJ, "delta": OBJ}, required=("name",))
COMPARE = Shape({"a": OBJ, "b": OBJ, "summary": OBJ, "modules": OBJ_LIST, "issues": _ISSUES},
                {"modules": _SIDE_ROW, "issues": _ISSUE, "a": Shape({"targets": LIST}), "b": Shape({"targets": LIST}),
                 "summary": Shape({"unavailable": OBJ, "only_in_a": LIST, "only_in_b": LIST})})
_ARM = Shape({"aggregate": OBJ, "per_seed": OBJ_LIST}, {"per_seed": Shape({"ci95": LIST, "rank_pattern": OBJ})})
BENCH = Shape({"task": OBJ, "policy": OBJ, "probe": OBJ, "arms": OBJ_LIST, "seeds": LIST, "noise_floor": OBJ,
               "udr": OBJ},
              {"arms": _ARM, "udr": Shape({"probe": OBJ_MAP, "arms": OBJ}),
               "probe": Shape({"per_seed": OBJ_LIST})})

SERIES = Shape({"checkpoints": OBJ_LIST, "suggestion": OBJ, "notes": LIST},
                {"checkpoints": Shape({"eval": OBJ, "audit": OBJ}, required=("checkpoint",))},
                required=("checkpoints",))

_MERGE_ROW = Shape({"ranks_before": LIST, "interference": OBJ, "kept_fraction": LIST, "subspace": OBJ},
                   {"interference": Shape({"pairs": OBJ_LIST})}, required=("name",))
MERGE = Shape({"inputs": OBJ_LIST, "method_options": OBJ, "policy": OBJ, "output": OBJ, "config": OBJ,
               "summary": OBJ, "partial_modules": LIST, "modules": OBJ_LIST, "portability": OBJ_MAP,
               "issues": _ISSUES},
              {"modules": _MERGE_ROW, "issues": _ISSUE, "config": Shape({"rank_pattern": OBJ}),
               "policy": Shape({"allowed_ranks": LIST}),
               "summary": Shape({"ranks_after": LIST, "most_interfering": LIST})},
              required=("method", "modules"))

#: document kind -> its shape
SHAPES: dict[str, Shape] = {"audit": AUDIT, "audit.multi": AUDIT_MULTI, "compare": COMPARE, "bench": BENCH,
                            "series": SERIES, "merge": MERGE}


def check_document(kind: str, doc: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``doc`` when it has the shape of a ``kind`` document, else the InputError naming the first wrong key."""
    if not isinstance(doc, dict):
        raise InputError(f"the document is {_what(doc)}, expected a JSON object", path)
    _check(doc, SHAPES[kind], "", path)
    if kind == "bench":  # udr.arms: arm name -> seed -> block
        arms = (doc.get("udr") or {}).get("arms")
        for name, by_seed in (arms or {}).items():
            if by_seed is not None and not isinstance(by_seed, dict):
                raise InputError(f"udr.arms[{str(name)[:60]!r}] is {_what(by_seed)}, expected an object", path)
            for seed, block in (by_seed or {}).items():
                if block is not None and not isinstance(block, dict):
                    raise InputError(f"udr.arms[{str(name)[:60]!r}][{str(seed)[:20]!r}] is {_what(block)}, "
                                     "expected an object", path)
    return doc
