"""Benchmark ``gradience monitor`` on a TensorBoard event file vs the same run as run.jsonl (issue 22).

    python benchmarks/bench_logs.py [--events 1000000] [--runs 3] [--json-out FILE]

The run: ``--events`` scalar events, four per step (train/loss, train/learning_rate, train/grad_norm,
train/epoch, one Event each as SummaryWriter.add_scalar writes them), and the run.jsonl holding the same values
(one train_step per step). Each file is monitored in a fresh child process (``monitor_run`` then exit), runs
interleaved; prints the median wall time of each and the ratio (target: TensorBoard ≤ 2× run.jsonl), plus the
median CPU time (user+sys: steadier than wall time on a shared machine) and the peak RSS of each child; the
figures are saved as JSON (default ``benchmarks/results/logs-<time>.json``).

The event file is framed as TensorBoard's RecordWriter frames it (u64 length, masked CRC32C, data, masked
CRC32C) around ``event_pb2.Event`` bytes serialized by TensorBoard's protobuf classes: its own writer computes
CRC32C in pure Python (~4 minutes for 1M events). The first 2000 records are read back with TensorBoard's own
``EventFileLoader`` as a check that the file is what TensorBoard writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys, time
t = time.perf_counter()
from gradience.monitor import monitor_run
r = monitor_run(sys.argv[1])
u = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss, r.training["steps_logged"])
"""
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _values(step: int, n_steps: int) -> dict[str, float]:
    return {"loss": 2.0 * math.exp(-step / n_steps) + 0.1 * math.sin(step), "learning_rate": 1e-4 * (1 - step / n_steps),
            "grad_norm": 0.5 + 0.01 * (step % 17), "epoch": step / n_steps}


def write_files(root: Path, n_events: int) -> tuple[Path, Path]:
    import google_crc32c
    import numpy as np
    from tensorboard.compat.proto import event_pb2, summary_pb2

    def masked(data: bytes) -> int:
        x = google_crc32c.value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    def frame(data: bytes) -> bytes:
        header = struct.pack("<Q", len(data))
        return header + struct.pack("<I", masked(header)) + data + struct.pack("<I", masked(data))

    n_steps = n_events // 4
    tb_dir = root / "tb"
    tb_dir.mkdir()
    tb = tb_dir / "events.out.tfevents.1700000000.bench.1.0"
    jsonl = root / "run.jsonl"
    with open(tb, "wb") as f_tb, open(jsonl, "w") as f_js:
        f_tb.write(frame(event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2").SerializeToString()))
        for step in range(1, n_steps + 1):
            values = _values(step, n_steps)
            for tag, value in values.items():
                ev = event_pb2.Event(wall_time=1.7e9 + step, step=step, summary=summary_pb2.Summary(
                    value=[summary_pb2.Summary.Value(tag=f"train/{tag}", simple_value=value)]))
                f_tb.write(frame(ev.SerializeToString()))
            f32 = {k: float(np.float32(v)) for k, v in values.items()}  # TensorBoard stores float32
            f_js.write(json.dumps({"schema": "gradience.telemetry/v1", "run_id": "bench", "event": "train_step",
                                   "step": step, "loss": f32["loss"], "lr": f32["learning_rate"],
                                   "grad_norm": f32["grad_norm"], "epoch": f32["epoch"]}) + "\n")
    _check_with_tensorboard(tb)
    return tb, jsonl


def _check_with_tensorboard(path: Path, n: int = 2000) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen = 0
    for _event in EventFileLoader(str(path)).Load():
        seen += 1
        if seen >= n:
            break
    assert seen == n, f"TensorBoard's loader read {seen} records"


def _child(path: Path) -> tuple[float, float, int, int]:
    """(wall s, CPU s, peak RSS bytes, steps) of monitor in a fresh interpreter (imports included)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True,
                         timeout=1800).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]) * 1024, int(out[3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_logs_") as tmp:
        t0 = time.perf_counter()
        tb, jsonl = write_files(Path(tmp), args.events)
        print(f"files: {tb.stat().st_size / 1e6:.1f} MB event file, {jsonl.stat().st_size / 1e6:.1f} MB run.jsonl "
              f"({args.events} scalar events, {args.events // 4} steps; written in {time.perf_counter() - t0:.1f} s)")
        sizes = {"tensorboard": tb.stat().st_size, "run.jsonl": jsonl.stat().st_size}
        times: dict[str, list[float]] = {"tensorboard": [], "run.jsonl": []}
        cpu: dict[str, list[float]] = {"tensorboard": [], "run.jsonl": []}
        rss: dict[str, list[int]] = {"tensorboard": [], "run.jsonl": []}
        load_start = os.getloadavg()[0]
        for _ in range(args.runs):
            for name, path in (("run.jsonl", jsonl), ("tensorboard", tb)):
                seconds, cpu_s, peak, steps = _child(path)
                assert steps == args.events // 4, (name, steps)
                times[name].append(seconds)
                cpu[name].append(cpu_s)
                rss[name].append(peak)
    results: dict[str, object] = {"events": args.events, "steps": args.events // 4, "runs": args.runs,
                                  "file_bytes": sizes, "load_avg_start": load_start,
                                  "load_avg_end": os.getloadavg()[0]}
    for name in times:
        print(f"{name:12s} median {statistics.median(times[name]):.2f} s wall, {statistics.median(cpu[name]):.2f} s "
              f"CPU  (wall runs: {', '.join(f'{t:.2f}' for t in times[name])}); peak RSS "
              f"{max(rss[name]) / 2**20:.0f} MiB")
        results[name] = {"wall_s": times[name], "cpu_s": cpu[name], "median_wall_s": statistics.median(times[name]),
                         "median_cpu_s": statistics.median(cpu[name]), "peak_rss_bytes": max(rss[name])}
    ratio = statistics.median(times["tensorboard"]) / statistics.median(times["run.jsonl"])
    cpu_ratio = statistics.median(cpu["tensorboard"]) / statistics.median(cpu["run.jsonl"])
    results.update(ratio_wall=ratio, ratio_cpu=cpu_ratio, target=2.0)
    print(f"ratio tensorboard / run.jsonl = {ratio:.2f} wall, {cpu_ratio:.2f} CPU (target <= 2)")
    out = args.json_out or RESULTS_DIR / f"logs-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from gradience.jsonio import atomic_write_text, dumps

    atomic_write_text(out, dumps(results, pretty=True) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
