"""Telemetry benchmark (SPEC §11): writer throughput and ``gradience monitor --json`` on a large log.

Prints:
- TelemetryWriter events/s for typical ``train_step`` records (median of ``--repeat`` runs; target >= 100k/s);
- ``gradience monitor --json`` whole-process wall time and peak RSS on generated logs of 100k and
  ``--lines`` (default 1,000,000) lines (target <= 10 s; memory constant: the peak RSS of the big log should
  match the small one's).

Usage: python benchmarks/bench_telemetry.py [--lines 1000000] [--repeat 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig


def writer_rate(path: Path, n_events: int) -> tuple[float, float]:
    """(events per wall second, events per CPU second) for ``n_events`` train_step records written to a fresh
    file. CPU-time rates are robust to other processes competing for the cores; wall rates are what a user
    sees on an idle machine."""
    if path.exists():
        path.unlink()
    with TelemetryWriter(path) as writer:
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(n_events):
            writer.train_step(step, loss=2.0 / (1 + step * 1e-4), lr=5e-5, grad_norm=0.8, epoch=step / n_events)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n_events / elapsed, n_events / max(cpu, 1e-9)


def generate_log(path: Path, n_lines: int) -> None:
    """A realistic run: run_start, train_steps, train/test evals every 1000 steps, an audit, run_end."""
    if path.exists():
        path.unlink()
    config = ConfigSnapshot(model_name="bench-model", dataset_name="bench-data", task_profile="generation",
                            optimizer=OptimizerConfig(name="adamw_torch", lr=1e-4),
                            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    with TelemetryWriter(path) as writer:
        writer.run_start(config)
        written, step = 1, 0
        while written < n_lines - 2:
            step += 1
            loss = 2.5 * math.exp(-step / 200_000) + 0.2
            writer.train_step(step, loss=loss, lr=1e-4 * min(1.0, step / 1000), grad_norm=1.0, epoch=step / 1e5)
            written += 1
            if step % 1000 == 0 and written < n_lines - 4:
                writer.eval(step, "test", {"loss": loss * 1.1, "accuracy": 0.6, "n": 500})
                writer.eval(step, "train", {"loss": loss, "accuracy": 0.7, "n": 500})
                written += 2
        writer.metrics("lora_audit", {"stable_rank_mean": 1.5, "utilization_mean": 0.1, "energy_rank_90_p50": 2,
                                      "energy_rank_90_p90": 4, "suggested_r_global_median": 2,
                                      "suggested_r_global_90": 4, "total_lora_params": 1_000_000,
                                      "adapter": {"r": 16}}, step=step)
        writer.run_end("ok", step=step)


def run_monitor(path: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MiB, exit code) of one whole ``gradience monitor --json`` process.

    The child's ru_maxrss is an upper bound: Linux carries the parent's peak at fork over exec, and this
    parent stays small (~20 MiB), so the figure is the child's own peak whenever it is larger than that."""
    cmd = [sys.executable, "-m", "gradience", "monitor", str(path), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stderr is not None:
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode != 0:
            print(err, file=sys.stderr)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--writer-events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out-dir", default=None, help="where to write the logs (default: a temp dir, removed)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir) if args.out_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)

        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        measured = [writer_rate(out / "writer.jsonl", args.writer_events) for _ in range(args.repeat)]
        rates = [m[0] for m in measured]
        rate, cpu_rate = statistics.median(rates), statistics.median(m[1] for m in measured)
        print(f"writer: {rate:,.0f} events/s wall (median of {args.repeat}; "
              f"min {min(rates):,.0f}, max {max(rates):,.0f}), {cpu_rate:,.0f} events per CPU-second; "
              f"target >= 100,000: {'OK' if rate >= 100_000 else 'BELOW TARGET'}")
        (out / "writer.jsonl").unlink()

        results = {}
        for n in sorted({min(100_000, args.lines), args.lines}):
            log = out / f"run_{n}.jsonl"
            t0 = time.perf_counter()
            generate_log(log, n)
            gen = time.perf_counter() - t0
            size = log.stat().st_size / 2**20
            runs = [run_monitor(log) for _ in range(args.repeat)]
            if any(rc != 0 for *_, rc in runs):
                print(f"monitor failed on {log}", file=sys.stderr)
                return 1
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            rss = statistics.median(r[2] for r in runs)
            results[n] = (wall, rss)
            print(f"monitor --json, {n:,} lines ({size:.0f} MiB, generated in {gen:.1f} s): "
                  f"wall {wall:.2f} s, CPU {cpu:.2f} s (medians of {args.repeat}; {n / wall:,.0f} lines/s), "
                  f"peak RSS {rss:.0f} MiB")
            log.unlink()
        if args.lines in results:
            wall, rss = results[args.lines]
            small = results[min(results)]
            print(f"target: {args.lines:,} lines <= 10 s: {'OK' if wall <= 10 else 'OVER'} ({wall:.2f} s); "
                  f"memory vs {min(results):,} lines: {rss:.0f} / {small[1]:.0f} MiB "
                  f"({'constant' if rss <= small[1] * 1.2 + 5 else 'GROWS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
