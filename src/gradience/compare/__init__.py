"""compare: two LoRA adapters side by side, down to their update subspaces (SPEC §13).

``compare(path_a, path_b, CompareOptions(...))`` returns the ``gradience.compare/v1`` document; numpy only
(never torch), like the audit it builds on.
"""

from gradience.compare.core import SCHEMA, SIDE_KEYS, SORT_KEYS, CompareOptions, compare, compare_sides
from gradience.compare.sides import Side, load_side, side_labels

__all__ = ["SCHEMA", "SIDE_KEYS", "SORT_KEYS", "CompareOptions", "Side", "compare", "compare_sides", "load_side",
           "side_labels"]
