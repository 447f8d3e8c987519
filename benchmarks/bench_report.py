"""Report benchmark (SPEC §14): ``gradience report`` of a 7B r16 adapter + a 100k-step log, whole process.

Prints, for a run directory holding a 100k-step telemetry log and the Llama-2-7B-shaped r=16 adapter
(``make_adapters.py``'s ``llama7b_r16_f32``, 224 pairs, 153 MiB):

- whole-process wall time of ``gradience report RUN -o OUT`` (median and [min-max] of ``--runs`` runs after one
  warm-up), its peak RSS, and the size of the page (targets: <= 3 s, <= 1 MB);
- the same for the two commands whose work the report contains, ``gradience monitor --json`` of the log and
  ``gradience audit --json`` of the adapter: ``report/(monitor+audit)`` is what drawing and rendering add;
- an in-process breakdown of one run: imports, the monitor + curves pass (one streaming pass over the log, as
  the CLI does it) and the curves' share of it (that pass minus ``monitor_run`` alone), audit, views/charts,
  page;
- the 1-minute load average at start and end (on a busy 2-core machine trust the min column).

UDR is off (``--no-udr``): the synthetic adapter names a base that is not available offline; with a base the
norms come from the UDR cache (see ``bench_udr.py``). Usage:
    python benchmarks/bench_report.py [--runs 5] [--steps 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_telemetry import generate_log  # noqa: E402
from make_adapters import DATA_DIR, ensure_adapter  # noqa: E402

TARGET_S = 3.0
TARGET_BYTES = 1_000_000
ADAPTER = "llama7b_r16_f32"


def run_process(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, CPU s = user + sys) of one child process (stdout discarded). CPU time is what the
    process needs on an idle machine; wall time also counts waiting for a core on a busy one."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}: {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], runs: int) -> dict[str, Any]:
    run_process(cmd)  # warm-up: page cache, .pyc files
    samples = [run_process(cmd) for _ in range(runs)]
    walls = [s[0] for s in samples]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "peak_mib": max(s[1] for s in samples), "cpu_median_s": statistics.median(s[2] for s in samples),
            "runs": runs}


def breakdown(run_dir: Path) -> dict[str, float]:
    """Seconds per phase of one in-process report (after the imports it needs); ``curves_share`` is a
    difference of two passes, so on a busy machine it is noisy (it may even come out negative)."""
    code = f"""
import json, time
t0 = time.perf_counter()
import matplotlib, jinja2, numpy
from matplotlib.figure import Figure
from matplotlib.backends.backend_svg import FigureCanvasSVG
from gradience.report import build as b
from gradience.report.views import ChartIds, adapter_view, run_view
from gradience.report.page import render_page
from gradience.monitor import monitor_run
t1 = time.perf_counter()
p = b.plan({str(run_dir)!r})
rep, curves = b._monitor_and_curves(p.run, None)  # the CLI's one streaming pass
t2 = time.perf_counter()
monitor_run(p.run)                                 # the same pass without the curves (for their share)
t3 = time.perf_counter()
summary = b._audit_summary(p.adapter, None, None, False)
t4 = time.perf_counter()
ids = ChartIds("c")
views = [run_view(rep, curves, ids), adapter_view(summary, ids)]
t5 = time.perf_counter()
html = render_page(views, title="bench", ids=ids)
t6 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "monitor_and_curves": t2 - t1, "curves_share": (t2 - t1) - (t3 - t2),
                  "audit": t4 - t3, "views_charts": t5 - t4, "page": t6 - t5}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100_000, help="lines of the generated telemetry log")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    adapter, _ = ensure_adapter(ADAPTER)
    run_dir = DATA_DIR / f"report_run_{args.steps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.jsonl"
    marker = run_dir / "lines.txt"
    if not (log.is_file() and marker.is_file() and marker.read_text() == str(args.steps)):
        generate_log(log, args.steps)
        marker.write_text(str(args.steps))
    link = run_dir / "adapter"
    if not link.exists():
        link.symlink_to(adapter.resolve(), target_is_directory=True)
    out = run_dir / "report.html"
    py = [sys.executable, "-m", "gradience"]
    report = timed([*py, "report", str(run_dir), "-o", str(out), "--no-udr"], args.runs)
    size = out.stat().st_size
    monitor = timed([*py, "monitor", str(log), "--json"], args.runs)
    audit = timed([*py, "audit", "--peft-dir", str(adapter), "--json", "--no-udr"], args.runs)
    phases = breakdown(run_dir)
    load1 = os.getloadavg()[0]

    base = monitor["median_s"] + audit["median_s"]
    print(f"gradience report: 7B r16 adapter ({ADAPTER}, 224 pairs) + {args.steps}-line log, whole process")
    print(f"  {'command':<34}{'median s':>10}{'min s':>8}{'max s':>8}{'CPU s':>8}{'peak MiB':>10}")
    for name, r in (("report RUN -o OUT --no-udr", report), ("monitor LOG --json", monitor),
                    ("audit --json --no-udr", audit)):
        print(f"  {name:<34}{r['median_s']:>10.2f}{r['min_s']:>8.2f}{r['max_s']:>8.2f}{r['cpu_median_s']:>8.2f}"
              f"{r['peak_mib']:>10.0f}")
    print(f"  report / target {TARGET_S:g} s = {report['median_s'] / TARGET_S:.2f} "
          f"({'MET' if report['median_s'] <= TARGET_S else 'MISS'}; min {report['min_s'] / TARGET_S:.2f}; "
          f"CPU {report['cpu_median_s'] / TARGET_S:.2f})")
    print(f"  report / (monitor + audit) = {report['median_s'] / base:.2f}")
    print(f"  page size {size / 1e6:.3f} MB / target 1 MB = {size / TARGET_BYTES:.2f} "
          f"({'MET' if size <= TARGET_BYTES else 'MISS'})")
    print("  in-process breakdown (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"  load average (1 min): {load0:.2f} at start, {load1:.2f} at end")
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"report-{stamp}.json").write_text(json.dumps({
        "report": report, "monitor": monitor, "audit": audit, "page_bytes": size, "breakdown": phases,
        "steps": args.steps, "adapter": ADAPTER, "load": [load0, load1]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
