"""Benchmark: UDR against a 7B-shaped NF4 (QLoRA) base versus its BF16 twin (issue 21 item 5).

    python benchmarks/bench_nf4.py                  # 2 Llama-7B blocks (14 tensors), 3 interleaved runs
    python benchmarks/bench_nf4.py --layers 4 --runs 5

The BF16 base has Llama-2-7B's shapes (hidden 4096, intermediate 11008) for the first ``--layers`` blocks; the
NF4 twin is the same weights quantised by bitsandbytes on CPU (``quantize_4bit``, blocksize 64, double
quantisation: QLoRA's default) and saved in transformers' layout (``.absmax``, ``.quant_map``,
``.nested_absmax``, ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``); without bitsandbytes the twin
is written by gradience's own numpy quantiser (identical codes, no nested absmax). The adapter is r=16 on the
7 linear targets. Both sides run ``measure_udr`` in this process without a norms cache, interleaved; the
target is NF4 ≤ 1.5x BF16. Results also go to ``benchmarks/results/nf4-<time>.json``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gradience.io.safetensors_write import TensorSpec, write_safetensors  # noqa: E402
from gradience.quant.bnb4 import quantize_4bit  # noqa: E402

HIDDEN, INTER, R = 4096, 11008, 16
TARGETS = (("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", HIDDEN, HIDDEN),
           ("self_attn.v_proj", HIDDEN, HIDDEN), ("self_attn.o_proj", HIDDEN, HIDDEN),
           ("mlp.gate_proj", HIDDEN, INTER), ("mlp.up_proj", HIDDEN, INTER), ("mlp.down_proj", INTER, HIDDEN))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _weight(layer: int, index: int, d_in: int, d_out: int) -> np.ndarray:
    rng = np.random.default_rng(layer * 16 + index)
    return rng.standard_normal((d_out, d_in), np.float32) * np.float32(0.02)


def make_bases(root: Path, layers: int) -> tuple[Path, Path, str]:
    bf16, nf4 = root / "bf16", root / "nf4"
    how = "bitsandbytes" if _bnb() is not None else "gradience numpy quantiser (no nested absmax)"
    if (nf4 / "model.safetensors").exists() and (bf16 / "model.safetensors").exists():
        return bf16, nf4, how
    bf16.mkdir(parents=True, exist_ok=True)
    nf4.mkdir(parents=True, exist_ok=True)
    specs16, specs4 = [], []
    for layer in range(layers):
        for index, (name, d_in, d_out) in enumerate(TARGETS):
            key = f"model.layers.{layer}.{name}.weight"
            specs16.append(TensorSpec(key, "BF16", (d_out, d_in),
                                      lambda a=(layer, index, d_in, d_out): _bf16_bits(_weight(*a))))
            specs4.extend(_nf4_specs(key, layer, index, d_in, d_out))
    write_safetensors(bf16 / "model.safetensors", specs16, {"format": "pt"})
    write_safetensors(nf4 / "model.safetensors", specs4, {"format": "pt"})
    cfg = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers}
    (bf16 / "config.json").write_text(json.dumps(cfg))
    (nf4 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True}}))
    return bf16, nf4, how


def _bnb() -> object | None:
    try:
        import bitsandbytes.functional as functional
    except Exception:
        return None
    return functional


def _nf4_specs(key: str, layer: int, index: int, d_in: int, d_out: int) -> list[TensorSpec]:
    """The transformers bnb-4bit tensors of one weight (computed once, served to the writer)."""
    w = _weight(layer, index, d_in, d_out)
    w = (_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)  # the BF16 twin's exact values
    functional = _bnb()
    if functional is not None:
        import torch

        q, state = functional.quantize_4bit(torch.from_numpy(w).to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
        packed = {k: v.numpy() for k, v in state.as_dict(packed=True).items()}
        tensors = {key: q.numpy()} | {f"{key}.{k}": v for k, v in packed.items()}
    else:
        codes, absmax = quantize_4bit(w, "nf4", 64)
        blob = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [d_out, d_in]})
        tensors = {key: codes.reshape(-1, 1), f"{key}.absmax": absmax,
                   f"{key}.quant_map": np.asarray(quantize_code(), np.float32),
                   f"{key}.quant_state.bitsandbytes__nf4": np.frombuffer(blob.encode(), np.uint8)}
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    return [TensorSpec(k, dtypes[v.dtype], tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]


def quantize_code() -> np.ndarray:
    from gradience.quant.bnb4 import code_table

    return code_table("nf4")


def _inputs(layers: int) -> list:
    from gradience.udr import UdrInput

    rng = np.random.default_rng(7)
    out = []
    for layer in range(layers):
        for name, d_in, d_out in TARGETS:
            a = rng.standard_normal((R, d_in)) / np.sqrt(d_in)
            b = rng.standard_normal((d_out, R)) * 0.01
            delta_sigma = float(np.linalg.svd(b @ a, compute_uv=False)[0])
            out.append(UdrInput(f"model.layers.{layer}.{name}", 2.0 * delta_sigma, 2.0 * float(np.linalg.norm(b @ a)),
                                d_out, d_in, scale=2.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "nf4")
    args = ap.parse_args()
    from gradience.udr import measure_udr

    bf16, nf4, how = make_bases(args.data / f"llama7b_L{args.layers}", args.layers)
    inputs = _inputs(args.layers)
    times: dict[str, list[float]] = {"bf16": [], "nf4": []}
    udr: dict[str, dict] = {}
    for path in (bf16, nf4):  # warm the page cache
        with open(path / "model.safetensors", "rb") as fh:
            while fh.read(64 << 20):
                pass
    for _ in range(args.runs):
        for side, path in (("bf16", bf16), ("nf4", nf4)):
            t0 = time.perf_counter()
            report = measure_udr(inputs, str(path), use_cache=False)
            times[side].append(time.perf_counter() - t0)
            udr[side] = report.per_layer
    diffs = [abs(udr["nf4"][k]["udr"] / udr["bf16"][k]["udr"] - 1) for k in udr["bf16"]]
    med = {side: statistics.median(v) for side, v in times.items()}
    result = {"layers": args.layers, "tensors": len(inputs), "nf4_written_by": how,
              "bf16_bytes": (bf16 / "model.safetensors").stat().st_size,
              "nf4_bytes": (nf4 / "model.safetensors").stat().st_size,
              "runs_s": times, "median_s": med, "ratio_nf4_over_bf16": med["nf4"] / med["bf16"], "target": 1.5,
              "udr_rel_diff_max": max(diffs), "udr_rel_diff_median": statistics.median(diffs)}
    print(json.dumps(result, indent=2))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"nf4-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
