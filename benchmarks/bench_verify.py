"""Benchmark ``gradience verify --merged`` (issue 20, item 5) on a Llama-2-7B-shaped checkpoint subset.

    python benchmarks/bench_verify.py [--layers 2] [--runs 3] [--no-embed]

Writes (once, git-ignored) ``benchmarks/_data/verify7b_L<layers>/``: a bf16 base with ``--layers`` blocks of 7B
shapes (q/k/v/o 4096², gate/up 11008×4096, down 4096×11008, norms) plus the 32000×4096 embedding, an r=16
alpha=32 fp32 adapter on the seven projections, and the bf16 merged checkpoint round(W + s·B·A). Every tensor is
produced and written one at a time with gradience's streaming safetensors writer (a few hundred MB of RAM).

Prints medians over ``--runs`` fresh processes (wall time, peak RSS from ``getrusage``) of:
* ``read``: both checkpoints streamed once through the same reader, every tensor converted to float32 in row
  blocks (what any check of the values must at least do), once through the memory-mapped reader the UDR uses and
  once through verify's own ``pread`` block reader (``gradience.verify.blocks``: the honest baseline, since verify
  pays exactly this for its reads), and ``raw read``: the files' bytes read sequentially;
* ``verify``: ``gradience verify --merged ... --json``, and ``verify (direct)`` with GRADIENCE_VERIFY_GRAM=0 (the
  update D formed block by block instead of the Gram sums of ``gradience.verify.gram``);
the ratio verify / read (target ≤ 2×) and the peak RSS beyond the interpreter and the adapter, against three
times the largest dense weight the verify reads (target ≤ 1×). The page cache is warm in every run (the files
were just written or read), so both sides are CPU-bound: the fairest case for the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _common import timed_child

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "_data"
HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000
RANK, ALPHA = 16, 32
TARGETS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
RECIPE = 1

_CHILD = r"""
import resource, sys, time
mode = sys.argv[1]
t0 = time.perf_counter()
if mode in ("verify", "verify_direct"):
    if mode == "verify_direct":  # the direct path (D formed block by block) instead of the Gram sums
        import os
        os.environ["GRADIENCE_VERIFY_GRAM"] = "0"
    from gradience.cli.main import main
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(sys.argv[2:])
    assert rc == 0, rc
elif mode == "read":
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base
    total = 0.0
    for spec in sys.argv[2:]:
        w = BaseWeights(resolve_base(spec))
        for name in w.tensors:
            for _, _, block in w.row_blocks(name):
                total += float(block[0, 0])
            w.release(name)
elif mode == "blocks":
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base
    from gradience.verify.blocks import TensorBlocks
    total = 0.0
    for spec in sys.argv[2:]:
        w = BaseWeights(resolve_base(spec))
        for name in w.tensors:
            tb = TensorBlocks(w, name)
            for _, _, block in tb.blocks(tb.rows_per_block):
                total += float(block[0, 0])
elif mode == "raw":
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in sys.argv[2:]:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
elif mode == "idle":
    import numpy, gradience.udr.base  # the interpreter and the imports every mode pays for
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"@@ {dt:.6f} {ru.ru_utime + ru.ru_stime:.6f} {ru.ru_maxrss}", file=sys.stderr)
"""


def _bf16(x: np.ndarray) -> np.ndarray:
    from gradience.io.safetensors_write import f32_to_bf16_bits

    return f32_to_bf16_bits(x)


def _weight(seed: int, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, std, shape).astype(np.float32)


def _factors(seed: int, d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10_000 + seed)
    a = rng.normal(0, 1 / math.sqrt(d_in), (RANK, d_in)).astype(np.float32)
    b = rng.normal(0, 0.01, (d_out, RANK)).astype(np.float32)
    return a, b


def build(out: Path, layers: int, embed: bool) -> None:
    """Write base/, merged/ and adapter/ under ``out`` (skipped when the recipe file matches)."""
    from gradience.io.safetensors_write import TensorSpec, write_safetensors

    recipe = {"recipe": RECIPE, "layers": layers, "embed": embed}
    stamp = out / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    t0 = time.perf_counter()
    scale = ALPHA / RANK
    weights: list[tuple[str, tuple[int, ...], int, str | None]] = []  # (name, shape, seed, adapted module)
    seed = 0
    if embed:
        weights.append(("model.embed_tokens.weight", (VOCAB, HIDDEN), seed, None))
    for i in range(layers):
        for target, shape in TARGETS.items():
            seed += 1
            weights.append((f"model.layers.{i}.{target}.weight", shape, seed, f"model.layers.{i}.{target}"))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            seed += 1
            weights.append((f"model.layers.{i}.{norm}.weight", (HIDDEN,), seed, None))
    weights.append(("model.norm.weight", (HIDDEN,), seed + 1, None))

    def produce(shape: tuple[int, ...], s: int, module: str | None, merged: bool):
        def make() -> np.ndarray:
            w = _weight(s, shape) if len(shape) == 2 else 1.0 + _weight(s, shape, 0.01)
            if merged and module is not None:
                a, b = _factors(s, *shape)
                w = w + scale * (b @ a)
            return _bf16(w)
        return make

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": VOCAB}
    for kind in ("base", "merged"):
        (out / kind).mkdir(parents=True, exist_ok=True)
        specs = [TensorSpec(n, "BF16", shape, produce(shape, s, m, kind == "merged")) for n, shape, s, m in weights]
        write_safetensors(out / kind / "model.safetensors", specs, {"format": "pt"})
        (out / kind / "config.json").write_text(json.dumps(config))
    adapter: list[TensorSpec] = []
    for _n, shape, s, module in weights:
        if module is None:
            continue
        a, b = _factors(s, *shape)
        adapter.append(TensorSpec(f"base_model.model.{module}.lora_A.weight", "F32", a.shape, lambda a=a: a))
        adapter.append(TensorSpec(f"base_model.model.{module}.lora_B.weight", "F32", b.shape, lambda b=b: b))
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter" / "adapter_model.safetensors", adapter)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": [t.split(".")[-1] for t in TARGETS]}))
    stamp.write_text(json.dumps(recipe))
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", flush=True)


def _child(args: list[str]) -> tuple[float, float, float]:
    wall, (_inner, cpu, rss) = timed_child(_CHILD, args, "child")
    return wall, float(cpu), int(rss) / 1024.0


def _medians(jobs: dict[str, list[str]], runs: int) -> dict[str, tuple[float, float, float]]:
    """Median (wall s, CPU s, peak RSS MiB) per job; the jobs are interleaved run by run, so a burst of load
    from other processes on a shared machine hits every job alike."""
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in jobs}
    for _ in range(runs):
        for key, args in jobs.items():
            results[key].append(_child(args))
    return {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in results.items()}  # type: ignore[misc]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-embed", action="store_true")
    ap.add_argument("--workers", type=int, default=None,
                    help="GRADIENCE_VERIFY_WORKERS for the verify runs (default: verify's own choice)")
    args = ap.parse_args()
    if args.workers:
        os.environ["GRADIENCE_VERIFY_WORKERS"] = str(args.workers)
    out = DATA_DIR / f"verify7b_L{args.layers}{'_noembed' if args.no_embed else ''}"
    build(out, args.layers, not args.no_embed)
    base, merged, adapter = out / "base", out / "merged", out / "adapter"
    files = [base / "model.safetensors", merged / "model.safetensors"]
    size = sum(f.stat().st_size for f in files)
    _child(["raw", *map(str, files)])                       # warm the page cache
    m = _medians({"idle": ["idle"], "raw": ["raw", *map(str, files)], "read": ["read", str(base), str(merged)],
                  "blocks": ["blocks", str(base), str(merged)],
                  "verify": ["verify", "verify", "--merged", str(merged), "--base-model", str(base), "--peft-dir",
                             str(adapter), "--json"],
                  "verify_direct": ["verify_direct", "verify", "--merged", str(merged), "--base-model", str(base),
                                    "--peft-dir", str(adapter), "--json"]}, args.runs)
    idle, raw, read, blocks, verify = m["idle"], m["raw"], m["read"], m["blocks"], m["verify"]
    direct = m["verify_direct"]
    adapter_mib = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    largest = max(HIDDEN * INTERMEDIATE, 0 if args.no_embed else VOCAB * HIDDEN) * 2 / 2**20   # bf16 bytes
    largest_module = HIDDEN * INTERMEDIATE * 2 / 2**20
    beyond = verify[2] - idle[2] - adapter_mib
    print(f"7B shapes, {args.layers} block(s){'' if args.no_embed else ' + embedding'}: two bf16 checkpoints "
          f"of {size / 2 / 2**30:.2f} GiB each, r={RANK} adapter {adapter_mib:.0f} MiB; medians of {args.runs} runs; "
          f"verify workers: {os.environ.get('GRADIENCE_VERIFY_WORKERS', 'default')}, {os.cpu_count()} CPUs")
    print(f"  raw read of both files : {raw[0]:7.2f} s wall {raw[1]:7.2f} s CPU")
    print(f"  read both (f32 blocks) : {read[0]:7.2f} s wall {read[1]:7.2f} s CPU   peak RSS {read[2]:6.0f} MiB")
    print(f"  read both (verify's    : {blocks[0]:7.2f} s wall {blocks[1]:7.2f} s CPU   peak RSS {blocks[2]:6.0f} MiB "
          "(pread blocks into reused buffers)")
    print(f"  verify --merged        : {verify[0]:7.2f} s wall {verify[1]:7.2f} s CPU   peak RSS {verify[2]:6.0f} MiB "
          f"(interpreter {idle[2]:.0f} MiB, {idle[1]:.2f} s CPU)")
    print(f"  verify (direct path)   : {direct[0]:7.2f} s wall {direct[1]:7.2f} s CPU   peak RSS {direct[2]:6.0f} MiB "
          "(GRADIENCE_VERIFY_GRAM=0)")
    print(f"  verify / read = {verify[0] / read[0]:.2f}x wall, {verify[1] / read[1]:.2f}x CPU (target <= 2x); "
          f"verify / raw read = {verify[0] / raw[0]:.2f}x wall")
    print(f"  verify / read with verify's own block reader = {verify[0] / blocks[0]:.2f}x wall, "
          f"{verify[1] / blocks[1]:.2f}x CPU")
    print(f"  peak RSS beyond interpreter + adapter: {beyond:.0f} MiB = {beyond / (3 * largest):.2f} x (3 x the "
          f"largest weight read, {largest:.0f} MiB bf16); {beyond / (3 * largest_module):.2f} x (3 x the largest "
          f"adapted module, {largest_module:.0f} MiB)")
    load = os.getloadavg()
    result = {"bench": "verify", "layers": args.layers, "embed": not args.no_embed, "runs": args.runs,
              "cpus": os.cpu_count(), "loadavg_after": load, "checkpoint_bytes": size,
              "workers": os.environ.get("GRADIENCE_VERIFY_WORKERS", "default"),
              "medians": {k: {"wall_s": v[0], "cpu_s": v[1], "peak_rss_mib": v[2]} for k, v in m.items()},
              "ratios": {"verify_over_read_wall": verify[0] / read[0], "verify_over_read_cpu": verify[1] / read[1],
                         "verify_over_blocks_wall": verify[0] / blocks[0],
                         "verify_over_blocks_cpu": verify[1] / blocks[1],
                         "direct_over_read_wall": direct[0] / read[0], "direct_over_read_cpu": direct[1] / read[1],
                         "direct_over_blocks_cpu": direct[1] / blocks[1]},
              "rss_beyond_mib": beyond, "rss_beyond_over_3x_largest_module": beyond / (3 * largest_module),
              "target": "verify <= 2x read (whole process); RSS beyond <= 3x one module's dense weight"}
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    path = results / f"verify-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
