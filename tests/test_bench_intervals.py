"""Bench verdicts on the interval (issue 18 item 2): hand-computed cases and an independent numpy bootstrap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from gradience.bench.intervals import (
    hierarchical_bootstrap_ci,
    interval_verdict,
    items_needed,
    seed_decision,
)
from gradience.bench.stats import noise_floor, paired_bootstrap_ci


def test_the_smoke_example_of_the_issue_is_inconclusive_now() -> None:
    # retrain_p90: Δ +0.000, CI [−0.055, +0.055], tol 0.02 (the point-estimate rule said PASS).
    assert interval_verdict(-0.055, 0.055, 0.02) == "INCONCLUSIVE"
    # At the observed variance the interval's half-width 0.055 must shrink to the margin 0.02:
    # n = 200 · (0.055 / 0.02)² = 1512.5 → 1513 items.
    assert items_needed(0.0, -0.055, 0.055, 200, 0.02) == 1513
    assert seed_decision(0.0, (-0.055, 0.055), 200, 0.02, True) == {"verdict": "INCONCLUSIVE",
                                                                     "n_eval_items_needed": 1513}


def test_three_way_verdict_by_hand() -> None:
    assert interval_verdict(-0.02, 0.03, 0.02) == "PASS"          # lower bound exactly at −tol passes
    assert interval_verdict(-0.019, 0.05, 0.02) == "PASS"
    assert interval_verdict(-0.08, -0.021, 0.02) == "FAIL"        # whole interval below −tol
    assert interval_verdict(-0.08, -0.02, 0.02) == "INCONCLUSIVE"  # upper bound touches −tol: not below it
    assert interval_verdict(float("nan"), 0.0, 0.02) == "INCONCLUSIVE"
    # A loss (lower is better): Δ = arm − probe > 0 is worse; the interval is mirrored.
    assert interval_verdict(-0.1, 0.01, 0.02, higher_is_better=False) == "PASS"
    assert interval_verdict(0.03, 0.2, 0.02, higher_is_better=False) == "FAIL"
    assert interval_verdict(0.0, 0.05, 0.02, higher_is_better=False) == "INCONCLUSIVE"
    assert seed_decision(0.01, (0.0, 0.02), 100, 0.02, True) == {"verdict": "PASS"}


def test_items_needed_uses_the_side_that_crosses_the_tolerance() -> None:
    # Δ below −tol (−0.05): the upper bound must come down; width = hi − Δ = 0.06, margin = 0.03 → 4×.
    assert items_needed(-0.05, -0.09, 0.01, 100, 0.02) == 400
    # Asymmetric interval above: width = Δ − lo = 0.04, margin = Δ + tol = 0.03 → (4/3)² · 90 = 160.
    assert items_needed(0.01, -0.03, 0.02, 90, 0.02) == 160
    # For a loss the orientation flips: Δ = +0.01 (worse by 0.01), interval [−0.01, 0.05], tol 0.02.
    # Oriented: Δ' = −0.01, [−0.05, 0.01], width 0.04, margin 0.01 → 16·50 = 800.
    assert items_needed(0.01, -0.01, 0.05, 50, 0.02, higher_is_better=False) == 800
    assert items_needed(-0.02, -0.05, 0.01, 100, 0.02) is None   # Δ on the tolerance: no n decides it
    assert items_needed(0.0, -0.01, 0.01, 100, 0.02) is None     # already PASS: nothing to compute


def test_items_needed_decides_the_bootstrap_at_that_size() -> None:
    # Per-item differences: 10% of items +1, 10% −1, the rest 0 (Δ = 0, sd 0.447). With 100 items the
    # interval straddles −0.05; at the predicted size the same pattern's interval clears it.
    def pattern(n: int) -> tuple[np.ndarray, np.ndarray]:
        k = n // 10
        probe = np.zeros(n)
        arm = np.zeros(n)
        arm[:k] = 1.0
        probe[k:2 * k] = 1.0
        return probe, arm

    probe, arm = pattern(100)
    lo, hi = paired_bootstrap_ci(probe, arm, "accuracy")
    assert interval_verdict(lo, hi, 0.05) == "INCONCLUSIVE"
    n = items_needed(0.0, lo, hi, 100, 0.05)
    assert n is not None and 250 <= n <= 400   # normal theory: (1.96·0.447/0.05)² ≈ 307
    probe2, arm2 = pattern(int(math.ceil(n / 10) * 10 * 1.1))
    assert interval_verdict(*paired_bootstrap_ci(probe2, arm2, "accuracy"), 0.05) == "PASS"


def _numpy_hierarchical(pairs: list[tuple[np.ndarray, np.ndarray]], samples: int, seed: int) -> np.ndarray:
    """The two-stage bootstrap written the plain way: loop over resamples, seeds, then items."""
    rng = np.random.default_rng(seed)
    out = np.empty(samples)
    for b in range(samples):
        picks = rng.integers(0, len(pairs), len(pairs))
        ds = []
        for s in picks:
            p, a = pairs[s]
            idx = rng.integers(0, p.size, p.size)
            ds.append(a[idx].mean() - p[idx].mean())
        out[b] = np.mean(ds)
    return out


def test_hierarchical_bootstrap_matches_an_independent_numpy_bootstrap() -> None:
    rng = np.random.default_rng(7)
    pairs = []
    for shift in (0.0, 0.04, -0.03):  # three seeds whose arms differ from their probes by different amounts
        probe = (rng.random(150) < 0.8).astype(float)
        arm = probe.copy()
        flip = rng.random(150) < 0.1 + shift
        arm[flip] = 1 - arm[flip]
        pairs.append((probe, arm))
    lo, hi = hierarchical_bootstrap_ci(pairs, "accuracy", samples=4000, seed=3)
    ref = _numpy_hierarchical(pairs, 4000, 11)
    ref_lo, ref_hi = np.percentile(ref, [2.5, 97.5])
    assert lo == pytest.approx(ref_lo, abs=0.006) and hi == pytest.approx(ref_hi, abs=0.006)
    # Wider than the items-only interval of the pooled seeds: the seed spread is in it.
    p_all = np.concatenate([p for p, _ in pairs])
    a_all = np.concatenate([a for _, a in pairs])
    plo, phi = paired_bootstrap_ci(p_all, a_all, "accuracy")
    assert hi - lo > phi - plo
    assert hierarchical_bootstrap_ci(pairs, "accuracy", samples=500) == \
        hierarchical_bootstrap_ci(pairs, "accuracy", samples=500)


def test_hierarchical_bootstrap_hand_cases() -> None:
    # Items carry no variance within a seed: seed A Δ = 1 on every item, seed B Δ = 0. Resampling two seeds
    # gives mean Δ ∈ {0, ½, 1} with probabilities ¼, ½, ¼, so the 95% interval is [0, 1].
    a = (np.zeros(20), np.ones(20))
    b = (np.zeros(20), np.zeros(20))
    assert hierarchical_bootstrap_ci([a, b], "accuracy", samples=2000) == (0.0, 1.0)
    # Identical seeds, identical runs: a zero-width interval at 0.
    same = (np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert hierarchical_bootstrap_ci([same, same, same], "accuracy", samples=300) == (0.0, 0.0)
    # One seed: the items-only interval (same spread as the paired bootstrap).
    rng = np.random.default_rng(0)
    p = (rng.random(300) < 0.7).astype(float)
    q = p.copy()
    q[:20] = 1 - q[:20]
    lo1, hi1 = hierarchical_bootstrap_ci([(p, q)], "accuracy", samples=4000)
    lo2, hi2 = paired_bootstrap_ci(p, q, "accuracy", samples=4000)
    assert lo1 == pytest.approx(lo2, abs=0.01) and hi1 == pytest.approx(hi2, abs=0.01)
    # Perplexity: exp of the mean loss per seed; constant losses give an exact Δ.
    lo, hi = hierarchical_bootstrap_ci([(np.full(5, 0.0), np.full(5, math.log(2.0)))], "ppl", samples=50)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same non-empty items"):
        hierarchical_bootstrap_ci([(np.zeros(3), np.zeros(4))], "accuracy")


def test_noise_floor_above_the_tolerance_is_flagged() -> None:
    # The issue's 3-seed run: probe sd 0.0202 against tol 0.02.
    nf = noise_floor([0.80, 0.8202, 0.8404], tolerance=0.02)
    assert nf["sd"] == pytest.approx(0.0202) and nf["exceeds_tolerance"] is True
    assert noise_floor([0.80, 0.81, 0.82], tolerance=0.02)["exceeds_tolerance"] is False
    assert noise_floor([0.8], tolerance=0.02)["exceeds_tolerance"] is None


def _arm_result(name: str, seed: int, items: np.ndarray) -> Any:
    from gradience.bench.results import ArmResult

    return ArmResult(name=name, seed=seed, metric=float(items.mean()), per_item=items.tolist(), params=100,
                     seconds=0.0, summary={}, adapter_dir="x")


def test_assembled_bench_uses_the_hierarchical_interval_and_warns_on_the_noise_floor() -> None:
    from dataclasses import replace
    from pathlib import Path
    from types import SimpleNamespace

    from gradience.bench.arms import ArmPlan
    from gradience.bench.assemble import assemble
    from gradience.bench.config import load_bench_config
    from gradience.bench.render import render_text

    toy = Path(__file__).resolve().parents[1] / "examples" / "bench" / "toy.yaml"
    cfg = replace(load_bench_config(str(toy)), arms=("truncate_median",))  # tol 0.02
    rng = np.random.default_rng(5)
    seeds = (1, 2, 3)
    probes, arm = {}, {}
    for seed, acc in zip(seeds, (0.80, 0.84, 0.88), strict=True):  # probe sd 0.04 > tol
        p = (rng.random(200) < acc).astype(float)
        a = p.copy()
        a[:4] = 1 - a[:4]
        probes[seed] = _arm_result("probe", seed, p)
        plan = ArmPlan("truncate_median", "truncate", r=4)
        arm[seed] = (plan, _arm_result("truncate_median", seed, a))
    task = SimpleNamespace(kind="classification", model_name="m", dataset_name="d")
    bench = assemble(cfg, task, seeds, probes, {"truncate_median": arm}, 0.0)  # type: ignore[arg-type]
    agg = bench["arms"][0]["aggregate"]
    pairs = [(probes[s].per_item, arm[s][1].per_item) for s in seeds]
    assert agg["ci95"] == list(hierarchical_bootstrap_ci(pairs, "accuracy", samples=cfg.bootstrap_samples))
    assert agg["verdict"] == interval_verdict(*agg["ci95"], 0.02)
    for s in bench["arms"][0]["per_seed"]:
        assert s["verdict"] == interval_verdict(*s["ci95"], 0.02)
        assert s["point_estimate_verdict"] == ("PASS" if s["delta"] >= -0.02 - 1e-9 else "FAIL")
    assert bench["noise_floor"]["exceeds_tolerance"] is True
    assert bench["warnings"] and "noise floor above the tolerance" in bench["warnings"][0]
    text = render_text(bench)
    verdict_at = text.index("Verdict:")
    assert text.index("warning: noise floor above the tolerance") > verdict_at
    assert "point-estimate rule says" in text
