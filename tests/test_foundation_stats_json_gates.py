"""Percentile convention, JSON conventions, atomic writes and --fail-on parsing."""

import json
import math
import os

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.gates import parse_gates
from gradience.jsonio import atomic_write_text, decode_nonfinite, dumps
from gradience.stats import mean, median, percentile, weighted_mean


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 24, 101):
        xs = rng.normal(size=n).tolist()
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)


def test_percentile_ignores_none_and_nonfinite() -> None:
    assert median([1.0, None, math.nan, 3.0, math.inf]) == 2.0
    assert percentile([], 50) is None
    assert mean([None, math.nan]) is None
    assert weighted_mean([1.0, 3.0, None], [1.0, 3.0, 5.0]) == pytest.approx(2.5)


def test_dumps_nonfinite_policies() -> None:
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32(2.0), "d": np.arange(2)}
    assert json.loads(dumps(data)) == {"a": None, "b": [None, None, 1.5], "c": 2.0, "d": [0, 1]}
    as_strings = json.loads(dumps(data, nonfinite="string", pretty=False))
    assert as_strings["a"] == "NaN" and as_strings["b"][:2] == ["Infinity", "-Infinity"]
    assert math.isnan(decode_nonfinite("NaN")) and decode_nonfinite("-Infinity") == -math.inf
    assert decode_nonfinite("hello") == "hello"


def test_atomic_write_replaces_whole_file(tmp_path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.json"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.json", "x")
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "atomic.json").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.json").st_mode & 0o777 == 0o666 & ~umask


def test_parse_gates() -> None:
    gates = parse_gates(["utilization<0.25,udr>1.0", "zero_update", "gap>=2"])
    assert [(g.metric, g.op, g.threshold) for g in gates] == [
        ("utilization", "<", 0.25), ("udr", ">", 1.0), ("zero_update", None, None), ("gap", ">=", 2.0)]
    assert gates[0].compare(0.1) and not gates[0].compare(0.3)
    assert gates[2].is_flag
    with pytest.raises(InputError):
        parse_gates(["util<<3"])
