"""Where the update energy sits (SPEC §3.2 ``composition``): per module and per transformer block.

Energy of a layer = delta_frob_norm² = ‖s·B·A‖_F². Shares are of the total over layers with a finite value.
``by_block`` sums the shares per layer index (the one extractor of :mod:`gradience.modules`); modules with no
index (embeddings, heads, a model without numbered blocks) form one group, keyed ``"none"`` (``block``: null in
the top list). Concentration: top-5 share and the Herfindahl–Hirschman index HHI = Σ share² (1 = everything
in one place; 1/HHI = the effective number of layers or blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

TOP_BLOCKS = 5
NO_BLOCK = "none"


class _Row(Protocol):
    name: str
    layer: int | None
    delta_frob_norm: float | None


def composition(layers: Sequence[_Row]) -> dict[str, Any]:
    """The ``composition`` block of the audit summary."""
    energies = [(la.name, la.layer, la.delta_frob_norm * la.delta_frob_norm) for la in layers
                if la.delta_frob_norm is not None]
    total = sum(e for _, _, e in energies)
    if total <= 0.0 or not math.isfinite(total):
        return {"total_energy": total if energies else None, "top5_share": None, "top10pct_share": None,
                "hhi": None, "effective_n_layers": None, "energy_share": {}, "by_block": _empty_blocks()}
    shares = {name: e / total for name, _, e in energies}
    ordered = sorted(shares.values(), reverse=True)
    n_top10 = max(1, math.ceil(0.1 * len(ordered)))
    hhi = sum(x * x for x in ordered)
    return {
        "total_energy": total,
        "top5_share": sum(ordered[:5]),
        "top10pct_share": sum(ordered[:n_top10]),
        "hhi": hhi,
        "effective_n_layers": 1.0 / hhi,
        "energy_share": shares,
        "by_block": _by_block([(block, e / total) for _, block, e in energies]),
    }


def _empty_blocks() -> dict[str, Any]:
    return {"n_blocks": 0, "energy_share": {}, "top5": [], "top5_share": None, "hhi": None,
            "effective_n_blocks": None}


def _by_block(shares: Sequence[tuple[int | None, float]]) -> dict[str, Any]:
    sums: dict[int | None, float] = {}
    for block, share in shares:
        sums[block] = sums.get(block, 0.0) + share
    keys: list[int | None] = [*sorted(b for b in sums if b is not None), *([None] if None in sums else [])]
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1], -1 if kv[0] is None else kv[0]))
    hhi = sum(v * v for v in sums.values())
    top = ranked[:TOP_BLOCKS]
    return {
        "n_blocks": len(sums),
        "energy_share": {(NO_BLOCK if b is None else str(b)): sums[b] for b in keys},
        "top5": [{"block": b, "share": v} for b, v in top],
        "top5_share": sum(v for _, v in top),
        "hhi": hhi,
        "effective_n_blocks": 1.0 / hhi if hhi > 0 else None,
    }
