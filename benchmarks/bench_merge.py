"""Benchmark ``gradience merge`` (issue 19) on two 7B-shaped r16 adapters, side by side in one run.

    python benchmarks/bench_merge.py [--runs 5] [--dense-modules 1 | --dense-all-shapes] [--skip-elementwise]

Prints, as medians over ``--runs`` whole-process runs (wall time and peak RSS ``ru_maxrss`` of the child),
interleaved so that machine load affects every arm alike:
* ``gradience merge A B --method svd --rank 16`` vs one ``gradience compress --peft-dir A --rank 8`` (target:
  merge ≤ 3× compress), and ``--method linear`` / ``cat`` (the exact sum, rank 32);
* peak RSS of cat / linear / svd vs inputs + output on disk (target ≤ 1.3×);
* the dense baseline: per module, the numpy dense weighted sum ΔW = w₁s₁B₁A₁ + w₂s₂B₂A₂ (float32) and its SVD
  truncated to 16 (what PEFT's ``svd`` combination and kohya do), timed on ``--dense-modules`` 4096×4096
  modules and extrapolated to all 224 as a lower bound (stated; target: merge ≥ 100× faster);
* ties / dare on a one-module adapter pair of the largest 7B shape (4096×11008): peak RSS above a ``linear``
  merge of the same pair, vs that module's dense ΔW in float64 (target ≤ 1×).

Adapter A is ``make_adapters.py``'s ``llama7b_r16_f32``; B has the same recipe with seed 1 (generated here).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench_compress import _dir_size, _run  # noqa: E402  (the one timed child-process runner)
from make_adapters import DATA_DIR, ensure_adapter  # noqa: E402
from support.synthetic import llama_targets, write_synthetic_adapter  # noqa: E402

MIB = 1024 * 1024
A_NAME = "llama7b_r16_f32"


def _second(name: str, *, layers: int, targets: dict[str, tuple[int, int]], seed: int) -> Path:
    """A synthetic r16 adapter of 7B shapes with its own seed (regenerated only when missing)."""
    out = DATA_DIR / name
    if not (out / "adapter_model.safetensors").is_file():
        write_synthetic_adapter(out, layers=layers, targets=targets, r=16, alpha=32, dtype="F32", seed=seed,
                                base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    return out


def _weights_size(*dirs: Path) -> int:
    return sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)


def _dense_baseline(a_dir: Path, b_dir: Path, n_modules: int, all_shapes: bool, k: int = 16
                    ) -> tuple[float, str, list[str]]:
    """(extrapolated seconds for all modules, how it was extrapolated, one line per timed module).

    Default: ``n_modules`` modules of the square 4096x4096 shape are timed and every module is counted at that
    median, a lower bound (a dense SVD of an m x n matrix with m >= n costs at least that of its n x n block, and
    the 11008x4096 modules are larger). ``all_shapes``: one module of every shape, each shape at its own time.
    """
    import numpy as np

    from gradience.adapter import load_adapter

    la, lb = load_adapter(str(a_dir)), load_adapter(str(b_dir))
    pairs_b = {p.name: p for p in lb.pairs}
    counts: dict[tuple[int, int], int] = {}
    for pa in la.pairs:
        counts[(pa.d_out, pa.d_in)] = counts.get((pa.d_out, pa.d_in), 0) + 1
    square = next(s for s in counts if s[0] == s[1])
    times: dict[tuple[int, int], list[float]] = {}
    lines = []
    for pa in la.pairs:
        shape = (pa.d_out, pa.d_in)
        wanted = 1 if all_shapes else (n_modules if shape == square else 0)
        if len(times.setdefault(shape, [])) >= wanted:
            continue
        pb = pairs_b[pa.name]
        a1, b1 = pa.load_factors()
        a2, b2 = pb.load_factors()
        t0 = time.perf_counter()
        dw = (0.5 * pa.scale) * (np.asarray(b1, np.float32) @ np.asarray(a1, np.float32))
        dw += (0.5 * pb.scale) * (np.asarray(b2, np.float32) @ np.asarray(a2, np.float32))
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        _ = (u[:, :k] * s[:k]) @ vt[:k]
        dt = time.perf_counter() - t0
        times[shape].append(dt)
        lines.append(f"  {shape[0]:>6}x{shape[1]:<6} {dt:8.2f} s  {pa.name}")
    n_all = sum(counts.values())
    if all_shapes:
        total = sum(statistics.median(times[s]) * n for s, n in counts.items())
        how = f"all {n_all} modules, each shape at its measured time"
    else:
        total = statistics.median(times[square]) * n_all
        how = (f"lower bound: all {n_all} modules at the median of {len(times[square])} timed "
               f"{square[0]}x{square[1]} module(s); the 11008x4096 ones cost more")
    return total, how, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dense-modules", type=int, default=1,
                    help="4096x4096 modules timed for the dense baseline (a lower bound for all modules)")
    ap.add_argument("--dense-all-shapes", action="store_true", help="time one module of every shape instead")
    ap.add_argument("--elementwise-runs", type=int, default=1, help="runs of the ties/dare memory check")
    ap.add_argument("--skip-elementwise", action="store_true")
    ap.add_argument("--only-elementwise", action="store_true")
    args = ap.parse_args()
    if args.only_elementwise:
        work = Path(tempfile.mkdtemp(prefix="bench_merge_"))
        try:
            _elementwise(work, args.elementwise_runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    a_dir, _ = ensure_adapter(A_NAME)
    b_dir = _second("llama7b_r16_f32_seed1", layers=32, targets=llama_targets(4096, 11008), seed=1)
    in_size = _weights_size(a_dir, b_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        arms = {
            "compress A --rank 8": ["compress", "--peft-dir", str(a_dir), "--out", str(work / "c"), "--rank", "8",
                                    "--force", "--json"],
            "merge --method svd --rank 16": ["merge", str(a_dir), str(b_dir), "--out", str(work / "svd"),
                                             "--weights", "0.5,0.5", "--method", "svd", "--rank", "16", "--force",
                                             "--json"],
            "merge --method linear": ["merge", str(a_dir), str(b_dir), "--out", str(work / "linear"), "--weights",
                                      "0.5,0.5", "--force", "--json"],
            "merge --method cat": ["merge", str(a_dir), str(b_dir), "--out", str(work / "cat"), "--weights",
                                   "0.5,0.5", "--method", "cat", "--force", "--json"],
        }
        res: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in arms}
        for _ in range(args.runs):
            for name, argv in arms.items():
                wall, rss = _run(argv)
                res[name][0].append(wall)
                res[name][1].append(rss)
        med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
        print(f"inputs: {A_NAME} + seed-1 twin, 2 x 224 modules, weights "
              f"{in_size / MIB:.1f} MiB together (runs={args.runs}, medians)")
        outs = {"merge --method svd --rank 16": work / "svd", "merge --method linear": work / "linear",
                "merge --method cat": work / "cat", "compress A --rank 8": work / "c"}
        for name, (t, rss) in med.items():
            out_size = _dir_size(outs[name])
            ins = _weights_size(a_dir) if name.startswith("compress") else in_size
            print(f"  {name:<30} {t:7.3f} s   peak RSS {rss:7.0f} MiB   RSS/(in+out) "
                  f"{rss / ((ins + out_size) / MIB):.2f}   out {out_size / MIB:.0f} MiB")
        ratio = med["merge --method svd --rank 16"][0] / med["compress A --rank 8"][0]
        print(f"merge svd / compress: {ratio:.2f}x (target <= 3x)")
        if not args.skip_elementwise:  # before the dense baseline: a child's ru_maxrss starts at the parent's RSS
            _elementwise(work, args.elementwise_runs)
        dense_total, how, lines = _dense_baseline(a_dir, b_dir, args.dense_modules, args.dense_all_shapes)
        print("dense baseline (numpy float32 weighted sum + SVD + rank-16 product), timed modules:")
        print("\n".join(lines))
        svd_t = med["merge --method svd --rank 16"][0]
        print(f"dense SVD merging, {how}: {dense_total:.0f} s; merge svd whole process {svd_t:.2f} s: "
              f"{dense_total / svd_t:.0f}x faster (target >= 100x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _elementwise(work: Path, runs: int) -> None:
    target = {"down_proj": (4096, 11008)}
    x = _second("llama7b_down_r16_seed2", layers=1, targets=target, seed=2)
    y = _second("llama7b_down_r16_seed3", layers=1, targets=target, seed=3)
    dense_mib = 4096 * 11008 * 8 / MIB
    base: list[float] = []
    found: dict[str, list[tuple[float, float]]] = {"ties": [], "dare": []}
    for _ in range(runs):
        base.append(_run(["merge", str(x), str(y), "--out", str(work / "l1"), "--force", "--json"])[1])
        for method in found:
            found[method].append(_run(["merge", str(x), str(y), "--out", str(work / method), "--method", method,
                                       "--rank", "16", "--force", "--json"]))
    b = statistics.median(base)
    print(f"ties/dare on one 4096x11008 module (dense dW float64 = {dense_mib:.0f} MiB), runs={runs}:")
    for method, vals in found.items():
        t = statistics.median(v[0] for v in vals)
        rss = statistics.median(v[1] for v in vals)
        print(f"  {method}: {t:6.1f} s  peak RSS {rss:.0f} MiB, {rss - b:.0f} MiB above linear's {b:.0f} MiB "
              f"= {(rss - b) / dense_mib:.2f}x the module's dense dW (target <= 1x)")


if __name__ == "__main__":
    raise SystemExit(main())
