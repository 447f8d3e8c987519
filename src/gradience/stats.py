"""One percentile convention for the whole product: linear interpolation (numpy's default).

Pure Python so that commands which do not need numpy (monitor, check) do not pay for importing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _finite(values: Iterable[float | int | None]) -> list[float]:
    """The finite values as floats, in order. Mapped in C (``map``) rather than tested value by value in
    Python: an MoE audit takes a dozen of these over 12,288 rows each."""
    xs = list(map(float, [v for v in values if v is not None]))
    if all(map(math.isfinite, xs)):
        return xs
    return [x for x in xs if math.isfinite(x)]


def percentile(values: Iterable[float | int | None], q: float) -> float | None:
    """q-th percentile (0..100) of the finite values, linear interpolation; None when there are none."""
    xs = sorted(_finite(values))
    if not xs:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def median(values: Iterable[float | int | None]) -> float | None:
    return percentile(values, 50.0)


def mean(values: Iterable[float | int | None]) -> float | None:
    xs = _finite(values)
    return sum(xs) / len(xs) if xs else None


def weighted_mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    pairs = [(float(v), float(w)) for v, w in zip(values, weights, strict=True) if v is not None and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total
