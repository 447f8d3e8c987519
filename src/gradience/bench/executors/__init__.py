"""Where a bench's arms run: ``local`` (one after another in this process, the default) or ``ray`` (each
(seed, arm) a Ray task, side by side). Both pin the math libraries to the same thread count so that the
same config and seeds give bit-equal results whichever executor ran them.

Why pinning matters: CPU reductions (matmul, sum) split their work by thread, and the partial sums are added
in a different order for a different thread count, so a float differs in its last bits and a rank suggestion
near a threshold can flip. One thread per arm by default; ``GRADIENCE_BENCH_THREADS`` changes it for both.
"""

from __future__ import annotations

import os

EXECUTORS = ("local", "ray")
THREADS_ENV = "GRADIENCE_BENCH_THREADS"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def arm_threads() -> int:
    """The thread count every arm trains and evaluates with (``GRADIENCE_BENCH_THREADS``, default 1)."""
    raw = os.environ.get(THREADS_ENV, "1").strip()
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        from gradience.errors import InputError

        raise InputError(f"{THREADS_ENV}={raw[:20]!r}: a thread count between 1 and 1024")
    return n


def pin_threads(n: int) -> None:
    """Pin torch's intra-op pool (and the OpenMP/MKL/OpenBLAS variables children inherit) to ``n`` threads."""
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
