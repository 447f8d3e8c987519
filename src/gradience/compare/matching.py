"""Pair the modules of two adapters by base-model name, tolerant of task-head prefixes (SPEC §13, §4).

An adapter trained on ``DistilBertForSequenceClassification`` names ``distilbert.transformer.layer.0...``, one
trained on the bare model ``transformer.layer.0...``. The UDR name mapper already solves exactly this for
adapter-vs-checkpoint names (exact first, then a unique dotted-suffix match that never cuts into the layer
index); we reuse it with B's module names standing in for checkpoint tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gradience.udr.names import WEIGHT_SUFFIX, BaseNameIndex


@dataclass
class Matching:
    pairs: list[tuple[str, str]] = field(default_factory=list)   # (name in A, name in B), A's order
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)        # A name -> B name where they differ
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # A name -> candidate B names


def match_modules(names_a: Sequence[str], names_b: Sequence[str]) -> Matching:
    """Match every A module to at most one B module; a B module claimed twice matches neither claimant."""
    index = BaseNameIndex(name + WEIGHT_SUFFIX for name in names_b)
    out = Matching()
    claims: dict[str, list[str]] = {}
    for name in names_a:
        hit = index.match(name)
        if hit.tensor is None:
            if hit.how == "ambiguous":
                out.ambiguous[name] = [c[: -len(WEIGHT_SUFFIX)] for c in hit.candidates]
            out.only_in_a.append(name)
            continue
        claims.setdefault(hit.tensor[: -len(WEIGHT_SUFFIX)], []).append(name)
    claimed: dict[str, str] = {}
    for b_name, a_names in claims.items():
        if len(a_names) == 1:
            claimed[a_names[0]] = b_name
        else:
            for a_name in a_names:
                out.ambiguous[a_name] = [b_name]
                out.only_in_a.append(a_name)
    for name in names_a:
        partner = claimed.get(name)
        if partner is not None:
            out.pairs.append((name, partner))
            if partner != name:
                out.renamed[name] = partner
    matched_b = set(claimed.values())
    out.only_in_b = [name for name in names_b if name not in matched_b]
    order = {name: i for i, name in enumerate(names_a)}
    out.only_in_a.sort(key=lambda n: order[n])
    return out
