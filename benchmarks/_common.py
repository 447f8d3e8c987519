"""What several benchmarks share: timing one child interpreter that reports its own figures.

A child script prints one ``@@ <fields...>`` line on stderr (its inner timings, CPU seconds, peak RSS); the
parent measures the whole-process wall time around it. Benchmarks import this as ``_common`` (they run as
scripts, so ``benchmarks/`` is on ``sys.path``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

#: BLAS pinned to one thread in the child, so timings compare single-threaded work on a shared machine.
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def timed_child(script: str, args: list[str], what: str) -> tuple[float, list[str]]:
    """(whole-process wall seconds, the fields of the child's last ``@@`` line) of ``python -c script args``
    with one BLAS thread; exits naming ``what`` and the child's stderr tail when it fails or reports nothing."""
    env = dict(os.environ, **ONE_BLAS_THREAD)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("@@ ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{what} failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    return wall, line[-1].split()[1:]
