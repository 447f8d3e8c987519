"""Does the base model look random-initialised? (issue 18 item 4: UDR against an untrained base is meaningless)

For a d_out x d_in matrix of i.i.d. entries of any scale, the largest singular value sits at the bulk edge
σ₁ ≈ σ·(√d_out + √d_in) while ‖W‖_F ≈ σ·√(d_out·d_in) (Bai & Yin 1988; Marchenko–Pastur). So the scale-free
edge ratio ρ = σ₁·√(d_out·d_in) / (‖W‖_F·(√d_out + √d_in)) is ≈ 1 at initialisation, whatever the
initializer's std; training concentrates energy in a few directions and lifts σ₁ far above the edge (ρ of 2 to
10 and more in pretrained transformers). When every base matrix UDR used has ρ below
``UDR_RANDOM_INIT_EDGE_RATIO``, the base is almost surely untrained and the UDR numbers say nothing about a
fine-tune. Uses only the σ₁ and ‖W‖_F that UDR computes anyway.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from gradience.issues import Issue
from gradience.policy.thresholds import UDR_RANDOM_INIT_EDGE_RATIO

CODE = "base_looks_random_init"


def edge_ratio(sigma_max: float, frob_norm: float, d_out: int, d_in: int) -> float | None:
    """ρ = σ₁·√(mn) / (‖W‖_F·(√m + √n)): ≈ 1 for an i.i.d. random matrix, well above 1 once trained."""
    if not (sigma_max > 0 and frob_norm > 0 and d_out > 0 and d_in > 0):
        return None
    ratio = sigma_max * math.sqrt(d_out * d_in) / (frob_norm * (math.sqrt(d_out) + math.sqrt(d_in)))
    return ratio if math.isfinite(ratio) else None


def random_init_issue(bases: Iterable[tuple[str, float, float, int, int]]) -> Issue | None:
    """One ``base_looks_random_init`` warning when every (name, σ₁, ‖W‖_F, d_out, d_in) is at the random edge."""
    ratios = {name: r for name, s, f, m, n in bases if (r := edge_ratio(s, f, m, n)) is not None}
    if not ratios or max(ratios.values()) >= UDR_RANDOM_INIT_EDGE_RATIO:
        return None
    worst = max(ratios.values())
    return Issue(CODE, f"every base weight UDR used looks random-initialised (σ₁ at the random-matrix edge of its "
                       f"Frobenius norm: edge ratio ≤ {worst:.2f}, trained weights are well above "
                       f"{UDR_RANDOM_INIT_EDGE_RATIO:g}); UDR against an untrained base does not describe a "
                       "fine-tune — pass the pretrained base", "warning", modules=sorted(ratios),
                 extra={"edge_ratio_max": worst, "threshold": UDR_RANDOM_INIT_EDGE_RATIO})
