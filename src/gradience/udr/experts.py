"""Per-expert views of a MoE base checkpoint, named like the expert pairs (``...experts.gate_up_proj[3]``).

The adapter names expert e of a stacked parameter ``X.experts.gate_up_proj[e]`` (gradience.adapter.experts).
Bases hold the experts in one of two layouts:

- hub format, one 2-D weight per expert: ``X.experts.<e>.gate_proj.weight`` / ``up_proj`` / ``down_proj`` (Qwen-MoE,
  OLMoE, DeepSeek; ``w1``/``w3``/``w2`` in Mixtral's naming). transformers 5 fuses them at load time
  (``conversion_mapping.py``: ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``), so expert e's
  ``gate_up_proj`` is ``[gate_proj; up_proj]`` stacked along the output dimension, gate first;
- fused 3-D parameters ``X.experts.gate_up_proj`` of shape (E, ·, ·) (GPT-OSS, and bases saved fused): expert e
  is the slice [e] ((in, out) for ``is_transposed`` models: UDR's norms are transpose-invariant).

Each view is listed as ``<name>[e].weight`` so that UDR's one name index (udr/names.py) matches it exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradience.policy.thresholds import MAX_EXPERTS

_PER_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<e>\d+)\.(?P<leaf>[A-Za-z0-9_]+)\.weight$")
# hub leaf -> the fused parameter it belongs to, and its position in the concatenation
_FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "w1": ("gate_up_proj", 0),
          "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}


@dataclass(frozen=True)
class ExpertView:
    """Expert ``index`` of a stacked 3-D tensor (``parts`` = (tensor,)), or 2-D per-expert weights concatenated
    along the output dimension (``index`` None)."""

    parts: tuple[str, ...]
    index: int | None
    shape: tuple[int, int]


def expert_views(shapes: dict[str, tuple[tuple[int, ...], bool]]) -> dict[str, ExpertView]:
    """Views keyed ``<X.experts.param>[e].weight`` from tensor name -> (shape, is float)."""
    views: dict[str, ExpertView] = {}
    pieces: dict[tuple[str, str, int], dict[int, str]] = {}
    for name, (shape, is_float) in shapes.items():
        if not is_float:
            continue
        m = _PER_EXPERT.match(name)
        if m is not None and len(shape) == 2 and m["leaf"] in _FUSED:
            fused, pos = _FUSED[m["leaf"]]
            pieces.setdefault((m["head"], fused, int(m["e"])), {})[pos] = name
        elif len(shape) == 3 and ".experts." in name and not name.endswith(".weight") and shape[0] <= MAX_EXPERTS:
            for e in range(shape[0]):
                views[f"{name}[{e}].weight"] = ExpertView((name,), e, (shape[1], shape[2]))
    for (head, fused, e), parts in pieces.items():
        order = [parts[p] for p in sorted(parts)]
        if fused == "gate_up_proj" and len(order) != 2:
            continue  # gate without up (or the reverse): no fused view
        dims = [shapes[p][0] for p in order]
        if any(d[1] != dims[0][1] for d in dims):
            continue
        views[f"{head}.{fused}[{e}].weight"] = ExpertView(tuple(order), None,
                                                          (sum(d[0] for d in dims), dims[0][1]))
    return views
