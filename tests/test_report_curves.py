"""The report's curve collection folds buffered points a bucket-width at a time: the result must be the one
point-by-point folding gives, bit for bit (the page is byte-identical for the same input)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gradience.report.curves import FLUSH_POINTS, Downsampler, RunCurves


def _state(d: Downsampler) -> str:
    return repr((d.count, d.width, d.nonfinite_count, d.nonfinite_steps, d.exact,
                 [(b.x_first, b.x_last, b.n, b.total, b.lo, b.hi, b.x_lo, b.x_hi, b.nonfinite) for b in d.buckets]))


def _one_by_one(points: list[tuple[float, float]], max_buckets: int) -> Downsampler:
    """The reference: every point folded on its own (a flush after each add takes the per-point path)."""
    d = Downsampler(max_buckets)
    for x, y in points:
        d.add(x, y)
        d.flush()
    return d


def _values(rng: random.Random, n: int, discrete: bool = False) -> list[float]:
    if discrete:  # every bucket's min and max occur many times: the x of the first one is kept
        return [rng.choice([0.0, -0.0, 1.0, 2.0]) for _ in range(n)]
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(math.nan if r < 0.002 else math.inf if r < 0.003 else -math.inf if r < 0.004
                   else 1e308 if r < 0.006  # finite, but a run's sum overflows
                   else rng.choice([0.0, -0.0, 1.0, 2.5]) if r < 0.2  # ties: the first min / max is kept
                   else rng.gauss(0.0, 1.0))
    return out


@pytest.mark.parametrize(("n", "max_buckets", "discrete"),
                         [(1, 800, False), (801, 800, False), (3 * FLUSH_POINTS + 7, 800, False),
                          (20_000, 7, False), (5_000, 2, False), (20_000, 800, True), (40_000, 3, True)])
def test_batched_fold_is_bitwise_the_point_by_point_fold(n: int, max_buckets: int, discrete: bool) -> None:
    rng = random.Random(n)
    points = [(float(i), y) for i, y in enumerate(_values(rng, n, discrete))]
    batched = Downsampler(max_buckets)
    for x, y in points:
        batched.add(x, y)
    assert _state(batched) == _state(_one_by_one(points, max_buckets))
    assert batched.count == n


def test_reading_mid_stream_flushes_and_later_points_continue() -> None:
    d = Downsampler()
    ys = np.random.default_rng(1).normal(size=10_000)
    for i, y in enumerate(ys[:5_000]):
        d.add(float(i), float(y))
    assert d.count == 5_000 and sum(b.n for b in d.buckets) == 5_000  # buffered points are visible
    for i, y in enumerate(ys[5_000:], start=5_000):
        d.add(float(i), float(y))
    assert d.count == 10_000
    assert max(b.hi for b in d.buckets) == ys.max() and min(b.lo for b in d.buckets) == ys.min()
    assert _state(d) == _state(_one_by_one([(float(i), float(y)) for i, y in enumerate(ys)], d.max_buckets))


def test_run_curves_skip_missing_and_non_numeric_values_like_before() -> None:
    rng = random.Random(3)
    records = []
    for i in range(2 * FLUSH_POINTS + 11):
        data: dict[str, object] = {"grad_norm": rng.random()}
        data["loss"] = rng.choice([rng.random(), 2, None, True, "x", math.nan])
        if i % 2:
            data["learning_rate"] = rng.random()
        else:
            data["lr"] = rng.choice([rng.random(), None, 3])
        records.append((rng.choice([i + 1, None]), data))
    curves = RunCurves()
    expected: dict[str, list[tuple[float, float]]] = {"loss": [], "lr": [], "grad_norm": []}
    for index, (step, data) in enumerate(records, start=1):
        curves.feed("train_step", step, data)
        x = float(step if step is not None else index)
        lr = data["lr"] if data.get("lr") is not None else data.get("learning_rate")
        for key, value in (("loss", data["loss"]), ("lr", lr), ("grad_norm", data["grad_norm"])):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                expected[key].append((x, float(value)))
    for key, points in expected.items():
        assert _state(getattr(curves, key)) == _state(_one_by_one(points, 800)), key
    assert curves.loss.count < len(records)  # the strings, bools and None were really skipped
