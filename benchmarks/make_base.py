"""Generate a synthetic Llama-2-7B-shaped base checkpoint for the UDR benchmark (SPEC §11).

    python benchmarks/make_base.py                  # 32 blocks, bf16, sharded: ~12.6 GiB, a few minutes
    python benchmarks/make_base.py --layers 4       # fewer blocks (bench_udr.py extrapolates to 32)
    python benchmarks/make_base.py --spectrum outliers

Writes ``benchmarks/_data/base_llama7b_<spectrum>_L<layers>/`` (git-ignored): ``config.json``,
``model-0000i-of-0000N.safetensors`` shards (≤ 4 GiB each) and ``model.safetensors.index.json``, laid out as
``save_pretrained`` writes a LlamaForCausalLM (embed_tokens, per block q/k/v/o/gate/up/down + 2 norms,
final norm, lm_head). Tensors are streamed to disk one at a time (memory stays ~200 MB). A base is regenerated
only when its recorded recipe changed. Needs numpy only.

Spectra: ``gaussian`` (default) is i.i.d. N(0, 0.02²): a flat, densely packed top spectrum, the slowest case
for iterative σ₁. ``outliers`` adds a rank-4 component whose singular values sit 10–40 % above the bulk edge,
closer to trained LLM weights (which have a few dominant directions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "_data"
RECIPE_FILE = "bench_recipe.json"

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 4096, 11008, 32000, 32
SHARD_BYTES = 4 * 1024**3
INIT_STD = 0.02
TARGETS = {  # module -> (d_out, d_in), as nn.Linear stores its weight
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        for module, shape in TARGETS.items():
            plan.append((f"model.layers.{i}.{module}.weight", shape))
        plan.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)))
        plan.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)))
    plan += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return plan


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def make_tensor(name: str, shape: tuple[int, ...], spectrum: str) -> np.ndarray:
    """Deterministic float32 values for one tensor (norm weights are ones, like a fresh Llama)."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng(_seed(name))
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= INIT_STD
    if spectrum == "outliers" and ".layers." in name:
        d_out, d_in = shape
        edge = INIT_STD * (math.sqrt(d_out) + math.sqrt(d_in))  # Marchenko–Pastur bulk edge
        u, _ = np.linalg.qr(rng.standard_normal((d_out, 4)))
        v, _ = np.linalg.qr(rng.standard_normal((d_in, 4)))
        s = edge * np.array([1.4, 1.3, 1.2, 1.1])
        w += ((u * s) @ v.T).astype(np.float32)
    return w


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (as torch does)."""
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], spectrum: str) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in entries:
            fh.write(to_bf16_bits(make_tensor(name, shape, spectrum)).tobytes())
    tmp.replace(path)


def base_dir_for(layers: int, spectrum: str) -> Path:
    return DATA_DIR / f"base_llama7b_{spectrum}_L{layers}"


def generate(layers: int, spectrum: str, force: bool = False) -> Path:
    out = base_dir_for(layers, spectrum)
    recipe = {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "vocab": VOCAB, "layers": layers,
              "spectrum": spectrum, "dtype": "BF16", "init_std": INIT_STD, "shard_bytes": SHARD_BYTES, "v": 1}
    recipe_path = out / RECIPE_FILE
    if not force and recipe_path.is_file() and json.loads(recipe_path.read_text()) == recipe:
        print(f"up to date: {out}")
        return out
    plan = tensor_plan(layers)
    total = sum(2 * math.prod(s) for _, s in plan)
    free = shutil.disk_usage(DATA_DIR.parent if not DATA_DIR.exists() else DATA_DIR).free
    if total > free - 2 * 1024**3:
        sys.exit(f"make_base: need {total / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB free; use --layers N")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, entries in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / fname, entries, spectrum)
        weight_map.update({name: fname for name, _ in entries})
        print(f"  wrote {fname} ({len(entries)} tensors) at {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    recipe_path.write_text(json.dumps(recipe) + "\n")
    print(f"base: {out} ({total / 2**30:.2f} GiB, {len(shards)} shards) in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"decoder blocks (default {LAYERS})")
    ap.add_argument("--spectrum", choices=["gaussian", "outliers"], default="gaussian")
    ap.add_argument("--force", action="store_true", help="regenerate even when the recipe is unchanged")
    args = ap.parse_args(argv)
    if not 1 <= args.layers <= LAYERS:
        ap.error(f"--layers must be in 1..{LAYERS}")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    generate(args.layers, args.spectrum, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
