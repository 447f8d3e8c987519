"""Bench statistics on constructed per-item results whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradience.bench.stats import Verdicts, metric_value, noise_floor, paired_bootstrap_ci


def test_identical_results_give_a_zero_interval() -> None:
    items = [1.0, 0.0, 1.0, 1.0, 0.0] * 20
    assert paired_bootstrap_ci(items, items, "accuracy") == (0.0, 0.0)


def test_an_arm_right_on_every_item_the_probe_missed() -> None:
    lo, hi = paired_bootstrap_ci([0.0] * 40, [1.0] * 40, "accuracy")
    assert lo == hi == 1.0


def test_ten_flipped_items_out_of_a_hundred_match_the_normal_approximation() -> None:
    probe = np.array([1.0] * 50 + [0.0] * 50)
    arm = probe.copy()
    arm[50:60] = 1.0  # ten items the probe got wrong, the arm right: Δ = 0.10
    assert metric_value(arm, "accuracy") - metric_value(probe, "accuracy") == pytest.approx(0.10)
    lo, hi = paired_bootstrap_ci(probe, arm, "accuracy", samples=4000)
    # Per-item differences are Bernoulli(0.1): sd of the mean = sqrt(0.1·0.9/100) = 0.03, so ≈ 0.10 ± 0.059.
    assert 0.03 <= lo <= 0.06
    assert 0.14 <= hi <= 0.17
    assert lo < 0.10 < hi


def test_the_interval_is_deterministic_and_paired() -> None:
    rng = np.random.default_rng(1)
    probe = rng.integers(0, 2, 300).astype(float)
    arm = probe.copy()
    arm[:15] = 1 - arm[:15]
    assert paired_bootstrap_ci(probe, arm, "accuracy") == paired_bootstrap_ci(probe, arm, "accuracy")
    # Pairing: the same arm against a shuffled probe (independent items) gives a much wider interval.
    lo, hi = paired_bootstrap_ci(probe, arm, "accuracy")
    lo2, hi2 = paired_bootstrap_ci(rng.permutation(probe), arm, "accuracy")
    assert hi - lo < 0.5 * (hi2 - lo2)


def test_paired_results_need_the_same_items() -> None:
    with pytest.raises(ValueError, match="same non-empty items"):
        paired_bootstrap_ci([1.0, 0.0], [1.0], "accuracy")


def test_perplexity_is_exp_of_the_mean_loss() -> None:
    assert metric_value([0.0, 2 * math.log(2.0)], "ppl") == pytest.approx(2.0)
    assert metric_value([0.5, 1.5], "eval_loss") == pytest.approx(1.0)


def test_one_tolerance_decides_every_verdict() -> None:
    v = Verdicts(tolerance=0.01, min_pass_rate=2 / 3)
    assert v.verdict(-0.01) == "PASS"          # exactly at the tolerance (0.825 − 0.835 style rounding)
    assert v.verdict(0.825 - 0.835) == "PASS"
    assert v.verdict(-0.0101) == "FAIL"
    assert v.verdict(float("nan")) == "FAIL"
    loss = Verdicts(tolerance=0.01, min_pass_rate=2 / 3, higher_is_better=False)
    assert loss.verdict(+0.01) == "PASS" and loss.verdict(+0.02) == "FAIL" and loss.verdict(-0.5) == "PASS"


def test_aggregate_over_seeds() -> None:
    v = Verdicts(tolerance=0.01, min_pass_rate=2 / 3)
    ok = v.aggregate([0.0, 0.005, -0.005])
    assert ok["verdict"] == "PASS" and ok["pass_rate"] == 1.0
    assert ok["mean_delta"] == pytest.approx(0.0) and ok["sd_delta"] == pytest.approx(0.005)
    assert ok["worst_delta"] == pytest.approx(-0.005)
    # Two of three pass, but the worst seed is outside the tolerance: the policy fails.
    bad = v.aggregate([0.0, -0.02, 0.01])
    assert bad["pass_rate"] == pytest.approx(2 / 3) and bad["worst_delta"] == pytest.approx(-0.02)
    assert bad["verdict"] == "FAIL"
    one = v.aggregate([0.0])
    assert one["sd_delta"] is None and one["verdict"] == "PASS"
    # For a loss the worst Δ is the largest.
    assert Verdicts(0.01, 2 / 3, higher_is_better=False).aggregate([0.0, 0.03])["worst_delta"] == pytest.approx(0.03)


def test_noise_floor_is_the_probe_seed_spread() -> None:
    nf = noise_floor([0.80, 0.82, 0.84])
    assert nf["sd"] == pytest.approx(0.02) and nf["range"] == pytest.approx(0.04)
    single = noise_floor([0.8])
    assert single["sd"] is None and "one seed" in single["note"]
