"""Run every benchmark of SPEC §11 and print their figures one after another.

    python benchmarks/run_all.py            # full: generate data, audit, UDR, telemetry/monitor
    python benchmarks/run_all.py --quick    # tiny + 7B r16 audit only, 3 runs (a smoke run)
    python benchmarks/run_all.py --skip udr telemetry
    python benchmarks/run_all.py --udr-layers 4     # UDR on a 4-block base, extrapolated to 32 blocks

Each benchmark runs as its own process (so one cannot skew another's memory figures) with this interpreter.
Benchmarks whose script is not present are listed as skipped, not failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def steps(quick: bool, runs: int | None, udr_layers: int | None) -> list[tuple[str, str, list[str]]]:
    """(group, script, args) in running order."""
    layers = ["--layers", str(udr_layers)] if udr_layers else []
    audit_args = ["--runs", str(runs or (3 if quick else 7))]
    if quick:
        audit_args += ["--only", "tiny_r8", "llama7b_r16_f32"]
    return [
        ("audit", "make_adapters.py", ["tiny_r8", "llama7b_r16_f32"] if quick else []),
        ("audit", "bench_audit.py", audit_args),
        ("udr", "make_base.py", layers),
        ("udr", "bench_udr.py", layers),
        ("telemetry", "bench_telemetry.py", []),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="audit smoke run only (tiny + 7B r16, 3 runs)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per audit figure (default 7, quick 3)")
    ap.add_argument("--udr-layers", type=int, default=None,
                    help="blocks of the 7B-shaped UDR base (default: all 32, a ~12.6 GiB file; fewer are extrapolated)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["audit", "udr", "telemetry"])
    args = ap.parse_args(argv)
    skip = set(args.skip) | ({"udr", "telemetry"} if args.quick else set())

    outcome: list[tuple[str, str]] = []
    for group, script, script_args in steps(args.quick, args.runs, args.udr_layers):
        path = BENCH_DIR / script
        if group in skip:
            outcome.append((script, "skipped (--skip/--quick)"))
            continue
        if not path.is_file():
            outcome.append((script, "skipped (not present)"))
            continue
        print(f"\n{'=' * 100}\n== {script} {' '.join(script_args)}\n{'=' * 100}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(path), *script_args], cwd=BENCH_DIR.parent)
        outcome.append((script, f"exit {code} in {time.perf_counter() - t0:.0f} s"))
    print(f"\n{'=' * 100}\nsummary")
    for script, state in outcome:
        print(f"  {script:22s} {state}")
    return 0 if all(not s.startswith("exit") or s.startswith("exit 0") for _, s in outcome) else 1


if __name__ == "__main__":
    raise SystemExit(main())
