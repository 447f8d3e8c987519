"""Benchmark the streamed UDR path and DoRA's effective update against the convert-once path (issue 9).

    python benchmarks/bench_udr_stream.py                 # one 8192x8192 bf16 tensor (128 MiB), 3 runs each
    python benchmarks/bench_udr_stream.py --rows 4096 --cols 11008 --runs 5

For one bf16 base tensor (a spectrum with a realistic slow decay), medians of ``--runs`` of ``measure_udr``:
- ``once``: the default path, the tensor converted to float32 once (peak memory: a float32 copy);
- ``streamed``: the same with ``stream_min_bytes=0``, converted block by block on every pass;
- ``dora``: a DoRA r=16 layer on that tensor (base norms from the streamed path plus the effective update).
Reports seconds, the ratios streamed/once and dora/once, and tracemalloc peaks. Results also go to
``benchmarks/results/udr-stream-<time>.json``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from gradience.udr import UdrInput  # noqa: E402
from gradience.udr.measure import measure_udr  # noqa: E402
from support.synthetic import write_safetensors  # noqa: E402

NAME = "model.layers.0.mlp.down_proj"


def make_base(root: Path, rows: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    k = min(rows, cols)
    # Decaying spectrum like a trained weight: a few strong directions over a noise floor.
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1.0 / np.sqrt(k))
    u = rng.standard_normal((rows, 8), dtype=np.float32) / np.float32(np.sqrt(rows))
    v = rng.standard_normal((8, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
    w += (u * (3.0 * 0.8 ** np.arange(8, dtype=np.float32))) @ v
    write_safetensors(root / "model.safetensors", {NAME + ".weight": w}, dtype="BF16")
    (root / "config.json").write_text("{}")


def timed(inputs: list[UdrInput], base: Path, stream: int, runs: int) -> dict[str, Any]:
    times, peaks = [], []
    result: dict[str, Any] = {}
    for _ in range(runs):
        tracemalloc.start()
        t0 = time.perf_counter()
        report = measure_udr(inputs, str(base), use_cache=False, workers=1, stream_min_bytes=stream)
        times.append(time.perf_counter() - t0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        result = report.per_layer[NAME]
    return {"median_s": statistics.median(times), "times_s": times, "peak_mb": max(peaks) / 1e6,
            "row": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    a = (0.01 * rng.standard_normal((16, args.cols))).astype(np.float32)
    b = (0.01 * rng.standard_normal((args.rows, 16))).astype(np.float32)
    m = np.ones(args.rows, np.float32)
    plain = [UdrInput(NAME, 1.0, 1.0, d_out=args.rows, d_in=args.cols)]
    dora = [UdrInput(NAME, None, None, d_out=args.rows, d_in=args.cols, dora=True, dora_loader=lambda: (a, b, m),
                     scale=2.0)]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_base(base, args.rows, args.cols)
        once = timed(plain, base, 1 << 62, args.runs)
        streamed = timed(plain, base, 0, args.runs)
        dora_run = timed(dora, base, 0, args.runs)
    f32_mb = 4 * args.rows * args.cols / 1e6
    out = {"shape": [args.rows, args.cols], "float32_mb": f32_mb, "once": once, "streamed": streamed,
           "dora": dora_run, "ratio_streamed_vs_once": streamed["median_s"] / once["median_s"],
           "ratio_dora_vs_once": dora_run["median_s"] / once["median_s"],
           "sigma_rel_diff_streamed_vs_once": abs(streamed["row"]["base_sigma_max"] / once["row"]["base_sigma_max"]
                                                  - 1.0)}
    print(f"bf16 {args.rows}x{args.cols} ({f32_mb:.0f} MB as float32), medians of {args.runs}:")
    for key in ("once", "streamed", "dora"):
        print(f"  {key:<9} {out[key]['median_s']:7.2f} s   peak {out[key]['peak_mb']:7.1f} MB")
    print(f"  streamed/once = {out['ratio_streamed_vs_once']:.2f}x, dora/once = {out['ratio_dora_vs_once']:.2f}x, "
          f"σ₁ streamed vs once: {out['sigma_rel_diff_streamed_vs_once']:.1e}")
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    path = results / f"udr-stream-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
