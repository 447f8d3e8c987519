"""Benchmark ``gradience compress`` (SPEC §12) on the 7B r64 bf16 synthetic adapter.

    python benchmarks/make_adapters.py llama7b_r64_bf16
    python benchmarks/bench_compress.py [--adapter NAME] [--runs 5] [--dense-layers 3]

Prints, as medians over ``--runs`` whole-process runs (wall time and peak RSS of the child, from
``resource.getrusage``):
* ``gradience compress --energy 0.9`` vs ``gradience audit --json`` of the same input (target ≤ 2×), and peak RSS
  vs input + output size (target ≤ input + output + 30%);
* per layer, the factored truncation (what compress does) vs a dense-SVD approach (numpy ``svd`` of the dense
  ΔW, what PEFT's convert_to_lora / mergekit / kohya do) on ``--dense-layers`` layers of each shape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import timed_child

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "_data"

_CHILD = r"""
import resource, sys, time
t0 = time.perf_counter()
from gradience.cli.main import main
rc = main(sys.argv[1:])
dt = time.perf_counter() - t0
sys.stdout.flush()
print(f"@@ {rc} {dt:.6f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def _run(argv: list[str]) -> tuple[float, float]:
    """(whole-process wall seconds, peak RSS MiB) of one ``gradience`` run in a fresh interpreter."""
    wall, fields = timed_child(_CHILD, argv, "run")
    return wall, int(fields[2]) / 1024.0  # fields: rc, inner seconds, peak RSS KiB


# compress called as a library from a fresh interpreter with the BLAS left at its default thread count (what a
# training script or notebook gets); PIN=0 replaces gradience.blas.limited_blas_threads by a no-op (the
# behaviour before the library pinned the tiny LAPACK calls itself).
_LIBRARY_CHILD = r"""
import contextlib, sys, time
t0 = time.perf_counter()
import gradience.blas
if sys.argv[1] == "0":
    gradience.blas.limited_blas_threads = lambda n=1: contextlib.nullcontext()
from gradience.adapter import load_adapter
from gradience.compress import CompressOptions, Policy, compress
compress(load_adapter(sys.argv[2]), sys.argv[3], CompressOptions(policy=Policy(name="energy", value=0.9), force=True))
print(f"@@ 0 {time.perf_counter() - t0:.6f} 0", file=sys.stderr)
"""


def _library_run(adapter: Path, out: Path, pin: bool) -> float:
    """Whole-process wall seconds of one in-process ``compress()`` (BLAS threads: the library's default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LIBRARY_CHILD, "1" if pin else "0", str(adapter), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"library run failed ({proc.returncode})\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def in_process_vs_cli(adapter: Path, work: Path, runs: int) -> dict[str, float]:
    """Medians (s) of compress --energy 0.9: the CLI (BLAS pinned by cli/main.py), the library with its own
    pinning (gradience.blas) and the library without it; runs interleaved so machine load hits all three."""
    walls: dict[str, list[float]] = {"cli": [], "library_pinned": [], "library_unpinned": []}
    out = work / "out_lib"
    for _ in range(runs):
        walls["cli"].append(_run(["compress", "--peft-dir", str(adapter), "--out", str(out), "--energy", "0.9",
                                  "--force", "--json"])[0])
        walls["library_pinned"].append(_library_run(adapter, out, pin=True))
        walls["library_unpinned"].append(_library_run(adapter, out, pin=False))
    return {k: statistics.median(v) for k, v in walls.items()}


def _median_runs(argv: list[str], runs: int, before: object | None = None) -> tuple[float, float]:
    walls, rss = [], []
    for _ in range(runs):
        w, m = _run(argv)
        walls.append(w)
        rss.append(m)
    return statistics.median(walls), statistics.median(rss)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _dense_vs_factored(adapter: Path, n_per_shape: int) -> list[tuple[str, tuple[int, int], int, float, float]]:
    """Per layer: (name, (d_out, d_in), k, factored seconds, dense seconds) for a few layers of each shape."""
    import numpy as np

    from gradience.adapter import load_adapter
    from gradience.audit.spectrum import energy_rank, factor_grams, singular_values
    from gradience.compress.factors import truncated_factors

    loaded = load_adapter(str(adapter))
    seen: dict[tuple[int, int], int] = {}
    out = []
    for pair in loaded.pairs:
        shape = (pair.d_out, pair.d_in)
        if seen.get(shape, 0) >= n_per_shape:
            continue
        seen[shape] = seen.get(shape, 0) + 1
        a, b = pair.load_factors()
        t0 = time.perf_counter()
        grams = factor_grams(a, b)
        sigma = singular_values(a, b)
        k = max(1, energy_rank(sigma, 0.9))
        truncated_factors(a, b, k, pair.scale, grams)
        t_fact = time.perf_counter() - t0
        t0 = time.perf_counter()
        dw = pair.scale * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        _ = (u[:, :k] * s[:k]) @ vt[:k]
        t_dense = time.perf_counter() - t0
        out.append((pair.name, shape, k, t_fact, t_dense))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default="llama7b_r64_bf16", help="name under benchmarks/_data")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dense-layers", type=int, default=1, help="layers per shape for the dense-SVD comparison")
    ap.add_argument("--in-process", action="store_true",
                    help="only compare compress in-process (library, BLAS pinned or not) with the CLI")
    args = ap.parse_args()
    adapter = DATA_DIR / args.adapter
    if not (adapter / "adapter_model.safetensors").is_file():
        print(f"missing {adapter}; run: python benchmarks/make_adapters.py {args.adapter}", file=sys.stderr)
        return 2
    in_size = (adapter / "adapter_model.safetensors").stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    if args.in_process:
        try:
            med = in_process_vs_cli(adapter, work, args.runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"adapter: {args.adapter}  compress --energy 0.9, whole process, median of {args.runs} "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        for key, label in (("cli", "CLI (BLAS pinned by cli/main.py)"),
                           ("library_pinned", "library, gradience.blas pinning"),
                           ("library_unpinned", "library, no pinning (before)")):
            print(f"  {label:<36} {med[key]:.3f} s")
        return 0
    try:
        out = work / "out"
        audit_t, audit_rss = _median_runs(["audit", "--peft-dir", str(adapter), "--json", "--no-udr"], args.runs)
        comp_t, comp_rss = _median_runs(["compress", "--peft-dir", str(adapter), "--out", str(out), "--energy",
                                         "0.9", "--force", "--json"], args.runs)
        out_size = _dir_size(out)
        mib = 1024 * 1024
        print(f"adapter: {args.adapter}  weights {in_size / mib:.1f} MiB; output {out_size / mib:.1f} MiB")
        print(f"audit --json            median {audit_t:.3f} s   peak RSS {audit_rss:.0f} MiB   (runs={args.runs})")
        print(f"compress --energy 0.9   median {comp_t:.3f} s   peak RSS {comp_rss:.0f} MiB")
        print(f"ratio compress / audit: {comp_t / audit_t:.2f}x  (target <= 2.0x)")
        limit = (in_size + out_size) / mib * 1.3
        print(f"peak RSS / (input + output): {comp_rss / ((in_size + out_size) / mib):.2f}  "
              f"(target <= 1.30, i.e. {limit:.0f} MiB)")
        print("\nper layer: factored truncation (compress) vs dense SVD of ΔW (numpy, float32)")
        print(f"  {'shape':>13} {'k':>3} {'factored':>10} {'dense SVD':>10} {'speed-up':>9}  module")
        for name, shape, k, tf, td in _dense_vs_factored(adapter, args.dense_layers):
            print(f"  {shape[0]:>6}x{shape[1]:<6} {k:>3} {tf * 1e3:>8.1f}ms {td:>9.2f}s {td / tf:>8.0f}x  {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
