"""Bench verdicts as tests on the interval of Δ, not on its point estimate (issue 18 item 2).

Why: a point estimate inside the tolerance says nothing when its own 95% interval is several times wider than
the tolerance (a 200-item smoke run: Δ +0.000, CI [−0.055, +0.055], tol 0.02). The verdict is a
non-inferiority test on the interval (Piaggio et al. 2012, CONSORT extension for non-inferiority trials;
ICH E9 §3.3.2): PASS when the whole interval lies above −tol, FAIL when it lies wholly below −tol,
INCONCLUSIVE otherwise — with the number of eval items that would decide it at the observed variance.

Across seeds the interval comes from a two-stage (hierarchical) bootstrap — resample seeds, then items within
each drawn seed (Davison & Hinkley 1997, *Bootstrap Methods and their Application*, §3.8) — so both the
seed-to-seed spread of training and the item sampling of the eval set widen it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradience import stats
from gradience.bench.stats import FAIL, INCONCLUSIVE, PASS
from gradience.policy.thresholds import (
    BENCH_BOOTSTRAP_SAMPLES,
    BENCH_BOOTSTRAP_SEED,
    BENCH_CI_LEVEL,
    BENCH_ITEMS_NEEDED_MAX,
)

_GUARD = 1e-9  # the same relative guard as Verdicts.passes: Δ bound = −tol exactly passes despite rounding


def _oriented(lo: float, hi: float, higher_is_better: bool) -> tuple[float, float]:
    """The interval in "higher is better" orientation (a loss's Δ is negated)."""
    return (lo, hi) if higher_is_better else (-hi, -lo)


def interval_verdict(lo: float, hi: float, tolerance: float, higher_is_better: bool = True) -> str:
    """PASS when the interval's worse bound is within the tolerance (non-inferior), FAIL when even its better
    bound is beyond it (inferior), INCONCLUSIVE when the interval straddles −tolerance."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    a, b = _oriented(lo, hi, higher_is_better)
    bound = -tolerance * (1.0 + _GUARD) - 1e-12
    if a >= bound:
        return PASS
    if b < bound:
        return FAIL
    return INCONCLUSIVE


def items_needed(delta: float, lo: float, hi: float, n_items: int, tolerance: float,
                 higher_is_better: bool = True) -> int | None:
    """Eval items needed for the interval to clear −tolerance at the observed variance (INCONCLUSIVE only).

    n ≈ n_now · (w / m)², with w the distance from Δ to the interval bound that crosses −tolerance and
    m = |Δ − (−tolerance)| the margin: an interval's half-width shrinks as 1/√n (the standard error of a mean),
    so this is the n at which it just stops crossing, assuming Δ and the per-item variance stay as observed —
    the normal-approximation sample size at 50% power (Chow, Shao & Wang 2008, *Sample Size Calculations in
    Clinical Research*, §3.1; 80% power needs (1 + z₀.₈/z₀.₉₇₅)² ≈ 2× more). None when Δ sits on the
    tolerance (no n decides it) or the answer exceeds ``BENCH_ITEMS_NEEDED_MAX``.
    """
    if interval_verdict(lo, hi, tolerance, higher_is_better) != INCONCLUSIVE or n_items <= 0:
        return None
    d = delta if higher_is_better else -delta
    a, b = _oriented(lo, hi, higher_is_better)
    margin = d + tolerance
    if not math.isfinite(margin) or abs(margin) < 1e-12:
        return None
    width = d - a if margin > 0 else b - d  # the side of the interval that crosses −tolerance
    n = math.ceil(n_items * (width / abs(margin)) ** 2 * (1.0 - 1e-12))  # 160.00000000000003 is 160
    return n if n <= BENCH_ITEMS_NEEDED_MAX else None


def _metric_rows(values: np.ndarray, metric: str) -> np.ndarray:
    m = values.mean(axis=1)
    return np.exp(m) if metric in ("ppl", "perplexity") else m


def hierarchical_bootstrap_ci(pairs: Sequence[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
                              metric: str, *, samples: int = BENCH_BOOTSTRAP_SAMPLES,
                              seed: int = BENCH_BOOTSTRAP_SEED,
                              level: float = BENCH_CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean Δ over seeds from a two-stage bootstrap.

    ``pairs`` holds one (probe per-item, arm per-item) pair per seed. Each resample draws S seeds with
    replacement; for every drawn seed it draws that seed's items with replacement (the same indices for the
    probe and the arm: paired), takes Δ = metric(arm) − metric(probe), and averages the S values. Deterministic
    for a given ``seed``; memory bounded (~16 MB of indices at a time) whatever the seed and item counts.
    """
    data = [(np.asarray(p, dtype=np.float64), np.asarray(a, dtype=np.float64)) for p, a in pairs]
    if not data:
        raise ValueError("no seeds to resample")
    for p, a in data:
        if p.shape != a.shape or p.ndim != 1 or p.size == 0:
            raise ValueError(f"paired results need the same non-empty items (probe {p.shape}, arm {a.shape})")
    n_seeds = len(data)
    rng = np.random.default_rng(seed)
    totals = np.zeros(samples)
    seed_draws = rng.integers(0, n_seeds, size=(samples, n_seeds))
    for s, (p, a) in enumerate(data):
        rows, _cols = np.nonzero(seed_draws == s)  # every (resample, slot) that drew seed s
        n = p.size
        chunk = max(1, 2_000_000 // n)
        for start in range(0, rows.size, chunk):
            part = rows[start:start + chunk]
            idx = rng.integers(0, n, size=(part.size, n))
            np.add.at(totals, part, _metric_rows(a[idx], metric) - _metric_rows(p[idx], metric))
    deltas = (totals / n_seeds).tolist()
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = stats.percentile(deltas, tail), stats.percentile(deltas, 100.0 - tail)
    assert lo is not None and hi is not None
    return lo, hi


def seed_decision(delta: float, ci: tuple[float, float], n_items: int, tolerance: float,
                  higher_is_better: bool) -> dict[str, Any]:
    """The keys one seed of one arm adds to bench.json: the interval verdict and, when undecided, the items needed."""
    lo, hi = ci
    verdict = interval_verdict(lo, hi, tolerance, higher_is_better)
    out: dict[str, Any] = {"verdict": verdict}
    if verdict == INCONCLUSIVE:
        out["n_eval_items_needed"] = items_needed(delta, lo, hi, n_items, tolerance, higher_is_better)
    return out


def across_seeds(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], metric: str, tolerance: float,
                 higher_is_better: bool, samples: int = BENCH_BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """The aggregate keys: the hierarchical interval and its three-way verdict."""
    lo, hi = hierarchical_bootstrap_ci(pairs, metric, samples=samples)
    return {"ci95": [lo, hi], "verdict": interval_verdict(lo, hi, tolerance, higher_is_better),
            "ci_method": "hierarchical bootstrap (seeds, then items within each seed)" if len(pairs) > 1
            else "paired bootstrap over items (one seed)"}


HEADLINE_RULE = ("interval (non-inferiority): PASS when the lower bound of the 95% paired interval of Δ is ≥ "
                 "−tolerance, FAIL when its upper bound is < −tolerance, INCONCLUSIVE otherwise (for a loss the "
                 "interval is mirrored); per seed the interval resamples items, across seeds a hierarchical "
                 "bootstrap resamples seeds and then items")
POINT_RULE = ("point estimate (the reference tool's): an arm PASSes a seed when Δ ≥ −tolerance (Δ ≤ +tolerance "
              "for a loss); across seeds when its pass rate ≥ min_pass_rate and its worst Δ passes")
