"""Bench statistics: Δ against the probe, paired-bootstrap intervals, verdicts, multi-seed aggregates.

Why paired: every arm is evaluated on the same items as the probe, so item difficulty cancels in the
per-item differences; resampling items (not arms) gives an interval on Δ that is far tighter than comparing
two independent accuracies. One tolerance decides every verdict (``Verdicts.tolerance``); the percentile
convention is the product's one (:mod:`gradience.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience import stats
from gradience.policy.thresholds import BENCH_BOOTSTRAP_SAMPLES, BENCH_BOOTSTRAP_SEED, BENCH_CI_LEVEL

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


def metric_value(per_item: Sequence[float] | np.ndarray, metric: str) -> float:
    """The task metric from per-item values: the mean (accuracy, loss, exact match) or exp(mean loss) (ppl)."""
    x = np.asarray(per_item, dtype=np.float64)
    if x.size == 0:
        return math.nan
    m = float(x.mean())
    return math.exp(m) if metric in ("ppl", "perplexity") else m


def paired_bootstrap_ci(probe: Sequence[float] | np.ndarray, arm: Sequence[float] | np.ndarray, metric: str,
                        *, samples: int = BENCH_BOOTSTRAP_SAMPLES, seed: int = BENCH_BOOTSTRAP_SEED,
                        level: float = BENCH_CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of Δ = metric(arm) − metric(probe) over item resamples (the same indices for both).

    Deterministic for a given seed. Raises ValueError when the two runs were not evaluated on the same items.
    """
    p = np.asarray(probe, dtype=np.float64)
    a = np.asarray(arm, dtype=np.float64)
    if p.shape != a.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"paired results need the same non-empty items (probe {p.shape}, arm {a.shape})")
    rng = np.random.default_rng(seed)
    n = p.size
    deltas = np.empty(samples)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB whatever the eval set size
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        mp, ma = p[idx].mean(axis=1), a[idx].mean(axis=1)
        if metric in ("ppl", "perplexity"):
            mp, ma = np.exp(mp), np.exp(ma)
        deltas[start:stop] = ma - mp
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = stats.percentile(deltas.tolist(), tail), stats.percentile(deltas.tolist(), 100.0 - tail)
    assert lo is not None and hi is not None
    return lo, hi


@dataclass(frozen=True)
class Verdicts:
    """The one tolerance and pass-rate policy every verdict uses (SPEC §15)."""

    tolerance: float
    min_pass_rate: float
    higher_is_better: bool = True

    def passes(self, delta: float) -> bool:
        """PASS when the arm is no worse than the probe by more than the tolerance."""
        if not math.isfinite(delta):
            return False
        # A relative guard so that Δ = −tolerance exactly (0.825 − 0.845) passes despite binary rounding.
        return (delta if self.higher_is_better else -delta) >= -self.tolerance * (1.0 + 1e-9) - 1e-12

    def verdict(self, delta: float) -> str:
        return PASS if self.passes(delta) else FAIL

    def worst(self, deltas: Sequence[float]) -> float:
        """The least favourable Δ (the smallest for a higher-is-better metric, the largest for a loss)."""
        return min(deltas) if self.higher_is_better else max(deltas)

    def aggregate(self, deltas: Sequence[float]) -> dict[str, Any]:
        """mean ± sd of Δ, the worst Δ, the pass rate and the policy verdict over seeds."""
        finite = [float(d) for d in deltas if d is not None and math.isfinite(d)]
        n = len(deltas)
        if not finite or len(finite) < n:
            return {"n_seeds": n, "mean_delta": stats.mean(finite), "sd_delta": None,
                    "worst_delta": None, "pass_rate": sum(self.passes(d) for d in finite) / n if n else None,
                    "verdict": FAIL}
        mean = sum(finite) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in finite) / (n - 1)) if n > 1 else None
        worst = self.worst(finite)
        pass_rate = sum(self.passes(d) for d in finite) / n
        ok = pass_rate >= self.min_pass_rate - 1e-12 and self.passes(worst)
        return {"n_seeds": n, "mean_delta": mean, "sd_delta": sd, "worst_delta": worst,
                "pass_rate": pass_rate, "verdict": PASS if ok else FAIL}


def noise_floor(probe_metrics: Sequence[float], tolerance: float | None = None) -> dict[str, Any]:
    """How much the probe itself moves across seeds: an arm's Δ smaller than this is not a signal.

    With ``tolerance``, ``exceeds_tolerance`` says whether that spread is larger than the tolerance the
    verdicts test against (then a seed's PASS/FAIL is mostly which seed it was: a warning on the verdict)."""
    xs = [float(x) for x in probe_metrics if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return {"n_seeds": len(xs), "sd": None, "range": None, "exceeds_tolerance": None,
                "note": "one seed: no seed spread measured (run several seeds to know the noise floor)"}
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    exceeds = None if tolerance is None else bool(sd > tolerance)
    return {"n_seeds": len(xs), "sd": sd, "range": max(xs) - min(xs), "exceeds_tolerance": exceeds, "note": None}
