"""Benchmark UDR against a 7B-shaped base (SPEC §11): cold (no cache) and cached, versus reading the tensors.

    python benchmarks/bench_udr.py                       # 32-block gaussian base (generated if missing)
    python benchmarks/bench_udr.py --layers 4 --cold-runs 3 --spectrum outliers
    python benchmarks/bench_udr.py --drop-caches         # also a disk-cold run (needs root)

Measures, for the 7 linear targets of every block (224 tensors for 32 blocks):
- ``read``: every targeted tensor read once through gradience's reader and converted bf16 -> float32
  (what UDR must do at least once), warm page cache;
- ``cold``: ``measure_udr`` without a cache (median of ``--cold-runs``), split into read/convert + ‖W‖_F time
  and σ₁ time, with the iteration counts;
- ``cached``: ``measure_udr`` with a warm norms cache (median of ``--cached-runs``); it must read no tensor;
- optionally (``--drop-caches``) one cold run right after dropping the OS page cache: disk-cold;
- the accuracy of one reported σ₁ (a down_proj) against a run converged to 1e-10;
- with 32 blocks and ``make_adapters.py``'s 7B r16 adapter present: the whole ``gradience audit --base-model
  ... --json`` process with a warm norms cache.
With fewer than 32 blocks, cold figures are also extrapolated linearly to 32 blocks (per-block cost × 32).
Targets: all linear layers of a 7B-shaped base ≤ 120 s cold, ≤ 1 s cached. Results also go to
``benchmarks/results/udr-<time>.json``.
"""

from __future__ import annotations

import os

# Same BLAS setting as the CLI (gradience.cli.main): multi-threaded OpenBLAS is much slower on a busy 2-core box.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import make_base  # noqa: E402
from gradience.io.safetensors import SafetensorsFile  # noqa: E402
from gradience.jsonio import atomic_write_text, dumps  # noqa: E402
from gradience.udr import UdrInput, measure_udr  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
TARGET_COLD_S = 120.0
TARGET_CACHED_S = 1.0
FULL_LAYERS = 32
ADAPTER_FOR_PROCESS = "llama7b_r16_f32"


def udr_inputs(layers: int) -> list[UdrInput]:
    """One input per targeted module; the update norms are arbitrary (they do not change the base work)."""
    out = []
    for i in range(layers):
        for module, (d_out, d_in) in make_base.TARGETS.items():
            out.append(UdrInput(f"model.layers.{i}.{module}", 0.05, 0.2, d_out, d_in, "linear"))
    return out


def read_targets_once(base_dir: Path, names: list[str]) -> tuple[float, int]:
    """Seconds to read (and convert to float32) every targeted tensor once, and the bytes read."""
    import json

    wmap = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, SafetensorsFile] = {}
    t0 = time.perf_counter()
    nbytes = 0
    for name in names:
        fname = wmap[name]
        st = files.setdefault(fname, SafetensorsFile(base_dir / fname))
        arr = st.read_f32(name)
        nbytes += st.tensors[name].nbytes
        float(arr[::97, ::89].sum())  # keep the conversion from being optimized into nothing
    return time.perf_counter() - t0, nbytes


def accuracy_check(base_dir: Path, name: str, sigma: float) -> float:
    """Relative error of a reported σ₁ against a run converged to 1e-10 (dense SVD of 4096×11008 would take
    minutes here)."""
    import json

    from gradience.udr.spectral import spectral_norm

    wmap = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    ref = spectral_norm(SafetensorsFile(base_dir / wmap[name]).read_f32(name), rtol=1e-10).sigma_max
    return abs(sigma - ref) / ref


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_run(inputs: list[UdrInput], base_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = measure_udr(inputs, str(base_dir), use_cache=False)
    wall = time.perf_counter() - t0
    assert report.summary["n_layers_with_udr"] == len(inputs), report.issues
    st = report.stats
    probe = inputs[-1].name  # a down_proj (4096×11008)
    return {"wall_s": wall, "probe": probe, "probe_sigma": report.per_layer[probe]["base_sigma_max"], "read_s": st["time_read_s"], "sigma_s": st["time_sigma_s"],
            "max_iterations": st["max_iterations"], "mean_iterations": st["mean_iterations"],
            "bytes_read": st["bytes_read"], "tensors_read": st["tensors_read"]}


def whole_process_cached(base_dir: Path, cache: str, runs: int) -> dict[str, Any] | None:
    """`gradience audit --base-model BASE --json` on the 7B r16 synthetic adapter (from make_adapters.py, when
    present) with a warm norms cache: the whole command, as a user runs it the second time."""
    adapter = BENCH_DIR / "_data" / ADAPTER_FOR_PROCESS
    if not (adapter / "adapter_model.safetensors").is_file():
        return None
    cmd = [sys.executable, "-m", "gradience", "audit", "--peft-dir", str(adapter), "--base-model", str(base_dir),
           "--base-norms-cache", cache, "--json"]
    times = []
    for _ in range(runs + 1):  # the first run warms the page cache for the adapter file
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"audit failed: {proc.stderr}")
    import json

    data = json.loads(proc.stdout)
    assert data["n_layers_with_udr"] == 224, data.get("issues")
    return {"adapter": ADAPTER_FOR_PROCESS, "runs_s": times[1:], "median_s": statistics.median(times[1:]),
            "udr_median": data["udr_median"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="blocks of the base to use (default 32)")
    ap.add_argument("--spectrum", choices=["gaussian", "outliers"], default="gaussian")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--cached-runs", type=int, default=7)
    ap.add_argument("--drop-caches", action="store_true", help="add one disk-cold run (drops the page cache)")
    args = ap.parse_args(argv)

    make_base.DATA_DIR.mkdir(parents=True, exist_ok=True)
    base_dir = make_base.generate(args.layers, args.spectrum)
    inputs = udr_inputs(args.layers)
    names = [i.name + ".weight" for i in inputs]
    load_start = os.getloadavg()[0]

    read_once_s, nbytes = min(read_targets_once(base_dir, names) for _ in range(2))  # 2nd is page-cache warm
    cold = [cold_run(inputs, base_dir) for _ in range(args.cold_runs)]
    disk_cold = None
    if args.drop_caches and drop_page_cache():
        disk_cold = cold_run(inputs, base_dir)

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "norms.json")
        measure_udr(inputs, str(base_dir), cache_path=cache)  # fill the cache
        cached = []
        for _ in range(args.cached_runs):
            t0 = time.perf_counter()
            report = measure_udr(inputs, str(base_dir), cache_path=cache)
            cached.append(time.perf_counter() - t0)
            assert report.stats["tensors_read"] == 0 and report.stats["cache_hits"] == len(inputs)
        process = whole_process_cached(base_dir, cache, args.cached_runs) if args.layers == FULL_LAYERS else None

    probe_err = accuracy_check(base_dir, cold[0]["probe"] + ".weight", cold[0]["probe_sigma"])
    med = {k: statistics.median(r[k] for r in cold) for k in ("wall_s", "read_s", "sigma_s")}
    scale = FULL_LAYERS / args.layers
    results: dict[str, Any] = {
        "schema": "gradience.bench.udr/v1", "base": str(base_dir), "spectrum": args.spectrum,
        "layers": args.layers, "tensors": len(inputs), "gib_read": nbytes / 2**30,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "cpu_count": os.cpu_count(),
        "read_once_s": read_once_s, "cold_runs": cold, "cold_median": med, "probe_rel_error": probe_err,
        "cold_min_wall_s": min(r["wall_s"] for r in cold),
        "disk_cold": disk_cold, "cached_runs_s": cached, "cached_median_s": statistics.median(cached),
        "whole_process_cached": process,
        "extrapolated_32_blocks": {"cold_median_s": med["wall_s"] * scale, "read_once_s": read_once_s * scale},
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
    }
    cold32 = med["wall_s"] * scale
    results["verdicts"] = [
        f"cold, all linear layers of a 7B-shaped base: {cold32:.1f} s (target {TARGET_COLD_S:.0f} s): "
        + ("MET" if cold32 <= TARGET_COLD_S else "MISS"),
        f"cached: {results['cached_median_s']:.3f} s (target {TARGET_CACHED_S:.0f} s): "
        + ("MET" if results["cached_median_s"] <= TARGET_CACHED_S else "MISS"),
    ]
    iters = [r["max_iterations"] for r in cold]
    lines = [
        f"UDR benchmark: {len(inputs)} linear tensors of {base_dir.name} ({nbytes / 2**30:.2f} GiB bf16), "
        f"spectrum={args.spectrum}, BLAS threads={results['blas_threads']}",
        f"  {'read+convert once (warm page cache):':<37}{read_once_s:8.2f} s",
        f"  {f'cold UDR, median of {len(cold)}:':<37}{med['wall_s']:8.2f} s  (min {results['cold_min_wall_s']:.2f}; "
        f"read+‖W‖_F {med['read_s']:.2f} s, σ₁ {med['sigma_s']:.2f} s; "
        f"{med['wall_s'] / read_once_s:.1f}x the read)",
        f"  σ₁ block-Lanczos steps: mean {statistics.median(r['mean_iterations'] for r in cold):.1f}, "
        f"max {max(iters)}; σ₁ of {cold[0]['probe']} vs a 1e-10 run: rel. error {probe_err:.1e} "
        "(target ≤ 1e-4)",
    ]
    if disk_cold:
        lines.append(f"  {'disk-cold UDR (page cache dropped):':<37}{disk_cold['wall_s']:8.2f} s")
    lines.append(f"  {f'cached UDR, median of {len(cached)}:':<37}{results['cached_median_s']:8.3f} s "
                 f"(min {min(cached):.3f}, max {max(cached):.3f}); no tensor read")
    if process:
        lines.append(f"  {'audit --base-model, whole process,':<37}{process['median_s']:8.3f} s (median of "
                     f"{len(process['runs_s'])}, warm norms cache, adapter {process['adapter']})")
    if args.layers != FULL_LAYERS:
        lines.append(f"  extrapolated to {FULL_LAYERS} blocks: cold {cold32:.1f} s, read {read_once_s * scale:.1f} s")
    lines.append(f"  machine: {os.cpu_count()} CPUs, load average {load_start:.2f} at start, "
                 f"{results['load_avg_end']:.2f} at end (other work inflates medians; trust min when high)")
    lines += [f"  {v}" for v in results["verdicts"]]
    print("\n".join(lines))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"udr-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_text(out, dumps(results, pretty=True) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
