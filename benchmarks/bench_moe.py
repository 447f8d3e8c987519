"""Benchmark: audit of a Qwen3-30B-A3B-shaped MoE expert adapter (issue 21 item 5).

    python benchmarks/bench_moe.py                   # 48 layers x 128 experts, r=8, BF16 (~630 MB), 3 runs
    python benchmarks/bench_moe.py --layers 4 --runs 1   # a quick look
    git archive REV src | tar -x -C /tmp/before && python benchmarks/bench_moe.py --baseline-src /tmp/before/src

The adapter is what PEFT ``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` saves for
Qwen3-30B-A3B (hidden 2048, moe_intermediate_size 768, 128 experts, 48 layers: config.json of
Qwen/Qwen3-30B-A3B): per layer ``experts.base_layer.lora_A`` (r·E, 2048) / ``lora_B`` (1536, r·E) for
gate_up_proj and ``experts.lora_A`` (r·E, 768) / ``lora_B`` (2048, r·E) for down_proj; factors Gaussian with
B columns decaying per rank, and 3 experts per layer left at B = 0 (never routed). Target: the whole
``gradience audit --json --no-udr`` process within 1.5x the time to read the weights file once (warm page cache,
``readinto`` in 64 MiB chunks in a child process, interpreter start included on both sides). Each child's CPU
time (user+sys) is recorded too, with the load average: on a shared machine the wall clock stretches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gradience.io.safetensors_write import TensorSpec, write_safetensors  # noqa: E402

HIDDEN, INTER = 2048, 768
NEVER = (5, 77, 120)  # experts with B = 0 in every layer


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def make_adapter(out: Path, layers: int, experts: int, r: int, dtype: str = "BF16", seed: int = 0) -> Path:
    """The synthetic adapter (``dtype`` BF16 or F32: the same values, F32 holding the bf16-rounded numbers;
    ``seed`` shifts every factor's seed: a second, independent adapter of the same shape for merge)."""
    weights = out / "adapter_model.safetensors"
    if weights.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    if dtype == "F32":
        def cast(x: np.ndarray) -> np.ndarray:
            return (_bf16(x).astype(np.uint32) << 16).view(np.float32)
    else:
        cast = _bf16
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
        for wrap, d_in, d_out in ((".base_layer", HIDDEN, 2 * INTER), ("", INTER, HIDDEN)):
            def a_fn(seed: int = 100_000 * seed + layer * 2 + len(wrap), d_in: int = d_in) -> np.ndarray:
                rng = np.random.default_rng(seed)
                return cast(rng.standard_normal((r * experts, d_in), np.float32) / np.sqrt(d_in))

            def b_fn(seed: int = 100_000 * seed + 10_000 + layer * 2 + len(wrap), d_out: int = d_out) -> np.ndarray:
                rng = np.random.default_rng(seed)
                b = rng.standard_normal((d_out, r, experts), np.float32) * 0.02
                b *= np.exp(-np.arange(r, dtype=np.float32) / 2.0)[None, :, None]
                b[:, :, list(NEVER)] = 0.0
                return cast(b.reshape(d_out, r * experts))

            specs.append(TensorSpec(f"{prefix}{wrap}.lora_A.weight", dtype, (r * experts, d_in), a_fn))
            specs.append(TensorSpec(f"{prefix}{wrap}.lora_B.weight", dtype, (d_out, r * experts), b_fn))
    write_safetensors(weights, specs, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "base_model_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    return out


_READ_ONCE = """
import sys
buf = bytearray(64 << 20)
view = memoryview(buf)
with open(sys.argv[1], 'rb', buffering=0) as fh:
    while fh.readinto(view):
        pass
"""


# The child runs this checkout's gradience (src/ first on its path), with BLAS pinned as the CLI pins it.
_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p)}


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process. CPU time is reported beside the wall clock
    because the benchmark machine is shared: other processes stretch wall time, far less the CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env or _ENV)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _wall(cmd: list[str]) -> float:
    return _timed(cmd)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "moe")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="a src/ directory of another gradience version (e.g. `git archive REV src`): its audit "
                         "runs interleaved with this checkout's, for a side-by-side before/after")
    args = ap.parse_args()
    out = make_adapter(args.data / f"qwen3_30b_a3b_L{args.layers}_E{args.experts}_r{args.r}", args.layers,
                       args.experts, args.r)
    weights = out / "adapter_model.safetensors"
    read_cmd = [sys.executable, "-c", _READ_ONCE, str(weights)]
    audit_cmd = [sys.executable, "-m", "gradience", "audit", str(out), "--json", "--no-udr"]
    base_env = None
    if args.baseline_src is not None:
        base_env = {**_ENV, "PYTHONPATH": str(args.baseline_src.resolve())}
    load_before = os.getloadavg()[0]
    _wall(read_cmd)  # warm the page cache
    reads, audits, base = [], [], []
    for _ in range(args.runs):  # interleaved, so drift hits every side alike
        reads.append(_timed(read_cmd))
        audits.append(_timed(audit_cmd))
        if base_env is not None:
            base.append(_timed(audit_cmd, base_env))
    summary = json.loads(subprocess.run(audit_cmd, check=True, capture_output=True, text=True, env=_ENV).stdout)
    exp = summary["experts"]
    t_read, t_audit = statistics.median(w for w, _ in reads), statistics.median(w for w, _ in audits)
    c_read, c_audit = statistics.median(c for _, c in reads), statistics.median(c for _, c in audits)
    result: dict[str, object] = {
        "adapter": out.name, "file_bytes": weights.stat().st_size, "pairs": summary["n_layers"],
        "expert_rows": exp["n_expert_rows"], "never_adapted": exp["n_expert_rows"] - exp["n_adapted"],
        "read_once_s": [w for w, _ in reads], "audit_s": [w for w, _ in audits],
        "read_once_median_s": t_read, "audit_median_s": t_audit,
        "ratio": t_audit / t_read, "target_ratio": 1.5,
        "read_once_cpu_s": [c for _, c in reads], "audit_cpu_s": [c for _, c in audits],
        "read_once_cpu_median_s": c_read, "audit_cpu_median_s": c_audit, "cpu_ratio": c_audit / c_read,
        "loadavg_1min": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
    }
    if base:
        t_base = statistics.median(w for w, _ in base)
        result.update(baseline_src=str(args.baseline_src), baseline_audit_s=[w for w, _ in base],
                      baseline_audit_median_s=t_base, baseline_ratio=t_base / t_read,
                      baseline_audit_cpu_median_s=statistics.median(c for _, c in base),
                      speedup_vs_baseline=t_base / t_audit)
    print(json.dumps(result, indent=2))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"moe-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
