"""``gradience bench --executor ray --max-parallel 2`` against the local executor on the offline toy (issue 24).

    python benchmarks/bench_ray.py [--seeds 1,2] [--arms truncate_per_layer,retrain_per_layer,uniform:4]

Starts its own Ray head on loopback (``ray start --head --node-ip-address 127.0.0.1``, Ray's single-host switch
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, 2 CPUs, no dashboard, no usage stats) and stops exactly the processes
it started. Measures, on the toy at ``--smoke`` sizes:

1. Ray start-up: ``ray start`` until the GCS answers, and the driver's ``ray.init`` connect.
2. Scheduling of an empty task (median of 20 round trips on a warm worker).
3. The bench wall time, local (arms one after another, in this process) vs Ray (``--max-parallel 2``), and
   their ratio; the two bench.json files compared (every metric and verdict, timings aside).
4. Per-arm overhead on Ray: the driver's submit-to-result time minus the arm's own seconds (median, and the
   first task per worker, which pays the worker's imports and data loading).

Both executors pin torch/BLAS/OMP to the same thread count (GRADIENCE_BENCH_THREADS, default 1). The local run
goes first and warms this process's imports; the Ray workers import on their own. Results: JSON on stdout and
in benchmarks/results/ray-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))


def _strip(obj: Any, out: Path) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v, out) for k, v in obj.items() if k not in ("seconds", "elapsed_seconds")}
    if isinstance(obj, list):
        return [_strip(v, out) for v in obj]
    return obj[len(str(out)):] if isinstance(obj, str) and obj.startswith(str(out)) else obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--arms", default="truncate_per_layer,retrain_per_layer,uniform:4")
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()

    from support.ray_cluster import local_ray_cluster, ray_env

    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_") or k == "HF_HUB_OFFLINE"})
    from gradience.bench.config import load_bench_config, parse_arms, parse_seeds
    from gradience.bench.executors.ray_exec import RayBenchRunner
    from gradience.bench.runner import BenchRunner

    cfg = replace(load_bench_config(str(REPO / "examples" / "bench" / "toy.yaml")), smoke=True,
                  seeds=parse_seeds(args.seeds), arms=parse_arms(args.arms))
    quiet = None
    result: dict[str, Any] = {"benchmark": "bench_ray", "cpus": os.cpu_count(), "seeds": args.seeds,
                              "arms": args.arms, "max_parallel": args.max_parallel,
                              "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        local = BenchRunner(cfg, tmpdir / "local", progress=quiet).run()
        result["local_wall_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with local_ray_cluster(tmpdir / "ray", num_cpus=2) as address:
            result["ray_start_s"] = time.perf_counter() - t0
            import ray

            t0 = time.perf_counter()
            ray.init(address=address, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
            result["ray_connect_s"] = time.perf_counter() - t0

            @ray.remote(num_cpus=1)
            def noop() -> int:
                return 0

            t0 = time.perf_counter()
            ray.get(noop.remote())
            result["first_empty_task_s"] = time.perf_counter() - t0  # a worker process starts
            trips = []
            for _ in range(20):
                t0 = time.perf_counter()
                ray.get(noop.remote())
                trips.append(time.perf_counter() - t0)
            result["empty_task_round_trip_ms_median"] = 1000 * statistics.median(trips)

            runner = RayBenchRunner(cfg, tmpdir / "ray_bench", progress=quiet, address=address,
                                    max_parallel=args.max_parallel, threads=_threads())
            t0 = time.perf_counter()
            on_ray = runner.run()
            result["ray_bench_wall_s"] = time.perf_counter() - t0
            ray.shutdown()
        overheads = [(seed, name, wall - own) for seed, name, wall, own in runner.task_timings]
        result["per_arm_overhead_s"] = [{"seed": s, "arm": n, "overhead_s": round(o, 3)} for s, n, o in overheads]
        result["per_arm_overhead_s_median"] = statistics.median(o for _, _, o in overheads)
        result["ray_over_local_wall_ratio"] = result["ray_bench_wall_s"] / result["local_wall_s"]
        result["ray_total_with_start_s"] = result["ray_bench_wall_s"] + result["ray_start_s"]
        result["bench_json_equal"] = _strip(on_ray, tmpdir / "ray_bench") == _strip(local, tmpdir / "local")
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text + "\n")


def _threads() -> int:
    from gradience.bench.executors import arm_threads

    return arm_threads()


if __name__ == "__main__":
    main()
