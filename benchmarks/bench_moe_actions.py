"""Benchmark: compress and merge of a Qwen3-30B-A3B-shaped MoE expert adapter, against its audit.

    python benchmarks/bench_moe_actions.py                       # 8 layers x 128 experts, r=8, F32 (210 MB), 5 runs
    git archive REV src | tar -x -C /tmp/before && python benchmarks/bench_moe_actions.py --baseline-src /tmp/before/src

The adapter is :func:`bench_moe.make_adapter`'s (F32 here; a second one with other seeds is the merge partner).
Arms, each a whole CLI process: ``audit --json --no-udr``, ``compress --energy 0.9 --json`` (SPEC §compress:
within 2x the audit), ``compress --dry-run``, ``merge A B --json`` (linear: the exact sum, rank 16). Runs are
interleaved (every arm once per round, the baseline's arms beside this checkout's) and each child's CPU time
(user+sys) is recorded beside its wall time: the machine is shared, and compress/merge wall time includes the
fsync of the written files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_moe import _ENV, _timed, make_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dtype", choices=("F32", "BF16"), default="F32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "moe")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="a src/ directory of another gradience version: its compress/merge run interleaved")
    args = ap.parse_args()
    stem = f"qwen3_30b_a3b_L{args.layers}_E{args.experts}_r{args.r}_{args.dtype.lower()}"
    one = make_adapter(args.data / stem, args.layers, args.experts, args.r, args.dtype)
    two = make_adapter(args.data / f"{stem}_s1", args.layers, args.experts, args.r, args.dtype, seed=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_moe_actions_"))
    py = [sys.executable, "-m", "gradience"]
    arms = {
        "audit": [*py, "audit", str(one), "--json", "--no-udr"],
        "compress": [*py, "compress", str(one), "--energy", "0.9", "--json", "--out", str(tmp / "c"), "--force"],
        "compress_dry_run": [*py, "compress", str(one), "--energy", "0.9", "--json", "--dry-run"],
        "merge": [*py, "merge", str(one), str(two), "--json", "--out", str(tmp / "m"), "--force"],
    }
    sides = {"after": _ENV}
    if args.baseline_src is not None:
        sides["before"] = {**_ENV, "PYTHONPATH": str(args.baseline_src.resolve())}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {s: {a: [] for a in arms} for s in sides}
    load_before = os.getloadavg()[0]
    try:
        for _ in range(args.runs):
            for arm, cmd in arms.items():
                for side, env in sides.items():
                    if arm == "audit" and side == "before":
                        continue  # the audit is the yardstick, not under change here
                    shutil.rmtree(tmp / "c", ignore_errors=True)
                    shutil.rmtree(tmp / "m", ignore_errors=True)
                    times[side][arm].append(_timed(cmd, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, object] = {"adapter": stem, "file_bytes": (one / "adapter_model.safetensors").stat().st_size,
                                 "runs": args.runs, "loadavg_1min": [load_before, os.getloadavg()[0]],
                                 "cpus": os.cpu_count()}
    audit_wall = statistics.median(w for w, _ in times["after"]["audit"])
    audit_cpu = statistics.median(c for _, c in times["after"]["audit"])
    for side, by_arm in times.items():
        for arm, runs in by_arm.items():
            if not runs:
                continue
            wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
            result[f"{side}_{arm}"] = {"wall_s": [round(w, 3) for w, _ in runs], "cpu_s": [round(c, 3) for _, c in runs],
                                       "wall_median_s": round(wall, 3), "cpu_median_s": round(cpu, 3),
                                       "wall_vs_audit": round(wall / audit_wall, 2),
                                       "cpu_vs_audit": round(cpu / audit_cpu, 2)}
    print(json.dumps(result, indent=2))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"moe-actions-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
