"""`gradience compare A B --json` on two 7B-shaped r=16 adapters vs one `gradience audit --json` (SPEC §13).

    python benchmarks/bench_compare.py              # 7 runs each, interleaved
    python benchmarks/bench_compare.py --runs 5 --json results.json

Whole process, wall time (median, min–max) and peak RSS, the two commands alternated run by run so that a
busy machine slows both alike. Target: compare ≤ 2.5× audit. Also printed: compare with its module pass
single-threaded (GRADIENCE_COMPARE_WORKERS=1), and compare with --base-model absent (both cases take the same
path; the synthetic adapters name a base that is not available offline, as in bench_audit).

A is ``llama7b_r16_f32`` from make_adapters.py (seed 0); B the same shapes with seed 1 (generated here into
``benchmarks/_data/llama7b_r16_f32_seed1`` when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench_audit import gradience_command, run_child  # noqa: E402
from make_adapters import DATA_DIR, DEFAULT_BASE_NAME, RECIPE_FILE, ensure_adapter  # noqa: E402
from support.synthetic import llama_targets, write_synthetic_adapter  # noqa: E402

TARGET_RATIO = 2.5
SECOND = "llama7b_r16_f32_seed1"


def ensure_second(data_dir: Path = DATA_DIR) -> Path:
    """B: Llama-7B shapes, r=16, seed 1 (different factors, same modules)."""
    out = data_dir / SECOND
    recipe = {"layers": 32, "targets": "llama7b", "r": 16, "alpha": 32, "dtype": "F32", "seed": 1, "generator": 1,
              "base_model_name_or_path": DEFAULT_BASE_NAME}
    rp = out / RECIPE_FILE
    if rp.is_file() and (out / "adapter_model.safetensors").is_file() and json.loads(rp.read_text()) == recipe:
        return out
    write_synthetic_adapter(out, layers=32, targets=llama_targets(4096, 11008), r=16, alpha=32, seed=1,
                            base_model_name_or_path=DEFAULT_BASE_NAME)
    rp.write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def _stats(walls: list[float], rss: list[float]) -> dict[str, Any]:
    return {"wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "peak_rss_mib": max(rss), "walls_s": walls}


def bench(a: Path, b: Path, runs: int) -> dict[str, Any]:
    gr = gradience_command()
    cmds: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "audit": ([*gr, "audit", "--peft-dir", str(a), "--json"], None),
        "compare": ([*gr, "compare", str(a), str(b), "--json"], None),
        "compare_serial": ([*gr, "compare", str(a), str(b), "--json"], {"GRADIENCE_COMPARE_WORKERS": "1"}),
    }
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(runs + 1):  # the first round is a warm-up (page cache, bytecode)
        for name, (cmd, env) in cmds.items():
            old = {k: os.environ.get(k) for k in (env or {})}
            os.environ.update(env or {})
            try:
                wall, peak, code, tail = run_child(cmd)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            if code != 0:
                raise SystemExit(f"{name} failed (exit {code}): {tail.strip()[-300:]}")
            if i:
                walls[name].append(wall)
                rss[name].append(peak)
    out = {name: _stats(walls[name], rss[name]) for name in cmds}
    out["ratio"] = out["compare"]["wall_s"] / out["audit"]["wall_s"]
    out["ratio_serial"] = out["compare_serial"]["wall_s"] / out["audit"]["wall_s"]
    out["target_ratio"] = TARGET_RATIO
    out["cpu_count"] = os.cpu_count()
    return out


def render(res: dict[str, Any]) -> str:
    lines = ["compare: two Llama-2-7B-shaped r=16 adapters (224 modules each, 153 MiB fp32) vs one audit",
             f"{'command':<34} {'median s':>9} {'min–max s':>15} {'peak MiB':>9}"]
    labels = {"audit": "gradience audit --json (A)", "compare": "gradience compare A B --json",
              "compare_serial": "  same, GRADIENCE_COMPARE_WORKERS=1"}
    for key, label in labels.items():
        r = res[key]
        lines.append(f"{label:<34} {r['wall_s']:>9.3f} {r['wall_min_s']:>7.3f}–{r['wall_max_s']:<7.3f} "
                     f"{r['peak_rss_mib']:>9.0f}")
    verdict = "meets" if res["ratio"] <= TARGET_RATIO else "MISSES"
    lines += [f"compare / audit = {res['ratio']:.2f}x (serial module pass: {res['ratio_serial']:.2f}x); "
              f"target <= {TARGET_RATIO}x: {verdict}  ({res['cpu_count']} CPUs)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", metavar="F", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    a, _ = ensure_adapter("llama7b_r16_f32")
    b = ensure_second()
    res = bench(a, b, args.runs)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
