"""Gradience Bench (SPEC §15): validate a suggested LoRA rank by truncating and retraining, over seeds.

``run_bench(load_bench_config(path), output_dir)`` returns the ``gradience.bench/v1`` object and writes
bench.json, bench.md and report.html. Training needs the ``hf`` extra; config parsing and statistics do not.
"""

from typing import Any

from gradience.bench.config import BenchConfig, load_bench_config
from gradience.bench.stats import Verdicts, noise_floor, paired_bootstrap_ci

__all__ = ["BenchConfig", "Verdicts", "load_bench_config", "noise_floor", "paired_bootstrap_ci", "run_bench"]


def run_bench(*args: Any, **kwargs: Any) -> Any:
    """Lazy wrapper: importing gradience.bench stays light (no numpy-heavy runner, no torch)."""
    from gradience.bench.runner import run_bench as _run

    return _run(*args, **kwargs)
