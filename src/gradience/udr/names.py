"""Map an adapter's module name to the base checkpoint's weight tensor.

The adapter may have been trained on a task-head wrapper (``DistilBertForSequenceClassification`` names
``distilbert.transformer.layer.0.attention.q_lin``) while the base checkpoint was saved from the bare model
(``transformer.layer.0.attention.q_lin.weight``), or the other way round (``model.`` / ``transformer.`` /
``roberta.`` ... present on one side only). Rule: the exact ``name + ".weight"`` first; otherwise drop
leading components of the module name one at a time and look for base weights whose name is that suffix or
ends with ``"." + suffix``, on dotted boundaries (never cutting into the layer index: ``layers.7`` stays whole);
the first level with a match decides, and it must be unique. Only ``.weight`` tensors are candidates, so a bias can never stand in for a weight.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

WEIGHT_SUFFIX = ".weight"
# Never match on fewer trailing components than this (a bare leaf like "q_proj" exists in every layer).
MIN_SUFFIX_COMPONENTS = 2


@dataclass(frozen=True)
class NameMatch:
    tensor: str | None              # the base tensor name, None when missing or ambiguous
    how: str                        # "exact" | "suffix" | "missing" | "ambiguous"
    candidates: tuple[str, ...] = ()


class BaseNameIndex:
    """Index of a base checkpoint's ``.weight`` tensor names by their trailing components."""

    def __init__(self, tensor_names: Iterable[str]) -> None:
        self._weights = {n for n in tensor_names if n.endswith(WEIGHT_SUFFIX)}
        # key: the last MIN_SUFFIX_COMPONENTS components of the module path (".weight" removed)
        self._by_tail: dict[str, list[str]] = defaultdict(list)
        for name in self._weights:
            module = name[: -len(WEIGHT_SUFFIX)]
            self._by_tail[_tail(module)].append(name)

    def match(self, module_name: str) -> NameMatch:
        exact = module_name + WEIGHT_SUFFIX
        if exact in self._weights:
            return NameMatch(exact, "exact", (exact,))
        parts = module_name.split(".")
        if len(parts) >= MIN_SUFFIX_COMPONENTS:
            candidates: list[str] | set[str] = self._by_tail.get(_tail(module_name), [])
        else:
            candidates = self._weights
        # Level 0 is the full name (base has extra leading components); each further level drops one
        # leading component of the adapter's name (the adapter has a wrapper prefix the base lacks). Wrapper
        # prefixes precede the layer index, so "layers.7" is never cut: a missing layer 7 stays missing.
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        max_drop = numeric[0] - 1 if numeric else len(parts) - MIN_SUFFIX_COMPONENTS
        for drop in range(0, max(0, max_drop) + 1):
            suffix = ".".join(parts[drop:]) + WEIGHT_SUFFIX
            hits = sorted(c for c in candidates if c == suffix or c.endswith("." + suffix))
            if len(hits) == 1:
                return NameMatch(hits[0], "suffix", tuple(hits))
            if len(hits) > 1:
                return NameMatch(None, "ambiguous", tuple(hits))
        return NameMatch(None, "missing")


def _tail(module: str) -> str:
    return ".".join(module.split(".")[-MIN_SUFFIX_COMPONENTS:])
