"""Number formatting shared by every text renderer (audit, monitor, check), pure Python and import-light.

One convention everywhere: a value that is unknown, null or not finite prints as ``-`` (never ``nan%``).
"""

from __future__ import annotations

import math
from typing import Any

RULE = "=" * 72


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (bools excluded), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def num(x: Any, fmt: str = ".2f") -> str:
    return "-" if finite(x) is None else format(x, fmt)


def pct(x: Any) -> str:
    """0.184 -> '18.4%'."""
    v = finite(x)
    return "-" if v is None else f"{v * 100:.1f}%"


def times(x: Any) -> str:
    """1.0912 -> '1.09x' (ratios such as the train/test gap)."""
    v = finite(x)
    return "-" if v is None else f"{v:.2f}x"


def rank_value(x: Any) -> str:
    """Percentiles of integer ranks: '2.5', '6' (no trailing .0)."""
    v = finite(x)
    if v is None:
        return "-"
    return str(int(v)) if v.is_integer() else f"{v:.1f}"


def human_count(n: Any) -> str:
    """294912 -> '294.9K' (parameter counts)."""
    v = finite(n)
    if v is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.1f}{unit}"
    return f"{int(v)}"
