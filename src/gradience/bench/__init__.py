"""Gradience Bench (SPEC §15): validate a suggested LoRA rank by truncating and retraining, over seeds.

``run_bench(load_bench_config(path), output_dir)`` returns the ``gradience.bench/v1`` object and writes
bench.json, bench.md and report.html. Training needs the ``hf`` extra; config parsing and statistics do not.

The package namespace is lazy: ``gradience.bench.command`` (the "then verify" command that monitor and audit
print) must import without numpy, so nothing is imported here until a name is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BenchConfig", "Verdicts", "load_bench_config", "noise_floor", "paired_bootstrap_ci", "run_bench"]

_LAZY = {"BenchConfig": "gradience.bench.config", "load_bench_config": "gradience.bench.config",
         "Verdicts": "gradience.bench.stats", "noise_floor": "gradience.bench.stats",
         "paired_bootstrap_ci": "gradience.bench.stats"}


def run_bench(*args: Any, **kwargs: Any) -> Any:
    """Lazy wrapper: importing gradience.bench stays light (no numpy-heavy runner, no torch)."""
    from gradience.bench.runner import run_bench as _run

    return _run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradience.bench' has no attribute {name!r}")
