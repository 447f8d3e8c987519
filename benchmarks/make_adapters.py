"""Generate the synthetic PEFT adapters of SPEC §11 into ``benchmarks/_data/`` (git-ignored).

    python benchmarks/make_adapters.py            # all of them (~2 GiB, about a minute)
    python benchmarks/make_adapters.py tiny_r8 llama7b_r16_f32
    python benchmarks/make_adapters.py --list

Factors are random with a decaying singular spectrum that varies per pair, B non-zero (see
``tests/support/synthetic.py``, the one writer shared with the tests). The ``*_steep_*`` adapters have
σ_r/σ₁ < 1e-4 on every pair (decay on B, A or both) and one exactly rank-deficient pair in eight, as
trained adapters often do: they exercise the audit's refinement path, the flat ones its fast path. An adapter is regenerated only when its
recorded recipe differs from the current one, so repeated runs are free.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from support.synthetic import llama_targets, write_synthetic_adapter  # noqa: E402

DATA_DIR = BENCH_DIR / "_data"
RECIPE_FILE = "bench_recipe.json"

_TINY = {"q_proj": (768, 768), "v_proj": (768, 768)}  # 6 blocks × 2 targets × r=8 → 0.56 MiB fp32
_LLAMA7B = llama_targets(4096, 11008)
_LLAMA70B = llama_targets(8192, 28672, kv_out=1024)  # 8 KV heads × 128 → k/v_proj out 1024

# name -> (description, layers, targets, r, dtype)
ADAPTERS: dict[str, tuple[str, int, dict[str, tuple[int, int]], int, str]] = {
    "tiny_r8": ("tiny (6 layers, d=768, q/v, r=8)", 6, _TINY, 8, "F32"),
    "llama7b_r16_f32": ("Llama-2-7B shapes, 7 targets × 32 blocks, r=16", 32, _LLAMA7B, 16, "F32"),
    "llama7b_r16_bf16": ("Llama-2-7B shapes, r=16, bf16", 32, _LLAMA7B, 16, "BF16"),
    "llama7b_r64_f32": ("Llama-2-7B shapes, r=64", 32, _LLAMA7B, 64, "F32"),
    "llama7b_r64_bf16": ("Llama-2-7B shapes, r=64, bf16", 32, _LLAMA7B, 64, "BF16"),
    "llama70b_r16_f32": ("Llama-70B shapes (GQA k/v 1024), 7 targets × 80 blocks, r=16", 80, _LLAMA70B, 16, "F32"),
    "llama7b_r16_steep_f32": ("7B shapes, r=16, steep spectra + rank-deficient pairs", 32, _LLAMA7B, 16, "F32"),
    "llama7b_r16_steep_bf16": ("7B shapes, r=16, steep, bf16", 32, _LLAMA7B, 16, "BF16"),
    "llama7b_r64_steep_f32": ("7B shapes, r=64, steep", 32, _LLAMA7B, 64, "F32"),
    "llama70b_r16_steep_f32": ("70B shapes, r=16, steep", 80, _LLAMA70B, 16, "F32"),
}
# The base a real adapter of these shapes names: the audit then takes the same path a user's would (the base
# is not available offline, so UDR is skipped with an issue).
BASE_NAMES = {"tiny_r8": "gpt2", "llama70b_r16_f32": "meta-llama/Llama-2-70b-hf"}
DEFAULT_BASE_NAME = "meta-llama/Llama-2-7b-hf"


def spectrum_of(name: str) -> str:
    """"steep" for the ``*_steep_*`` adapters, else "power" (see ``write_synthetic_adapter``)."""
    return "steep" if "_steep_" in name else "power"


def flat_twin(name: str) -> str | None:
    """The flat-spectrum adapter of the same shapes and dtype as a steep one (None for a flat one)."""
    twin = name.replace("_steep_", "_")
    return twin if twin != name and twin in ADAPTERS else None


def recipe(name: str) -> dict[str, Any]:
    _, layers, targets, r, dtype = ADAPTERS[name]
    return {"layers": layers, "targets": {k: list(v) for k, v in targets.items()}, "r": r, "alpha": 2 * r,
            "dtype": dtype, "seed": 0, "generator": 2, "spectrum": spectrum_of(name),
            "base_model_name_or_path": BASE_NAMES.get(name.replace("_steep", ""), DEFAULT_BASE_NAME)}


def adapter_dir(name: str, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / name


def pair_count(name: str) -> int:
    _, layers, targets, _, _ = ADAPTERS[name]
    return layers * len(targets)


def ensure_adapter(name: str, data_dir: Path = DATA_DIR, *, force: bool = False) -> tuple[Path, bool]:
    """Generate ``name`` unless an identical recipe is already on disk; returns (dir, generated?)."""
    out = adapter_dir(name, data_dir)
    wanted = recipe(name)
    recipe_path = out / RECIPE_FILE
    weights = out / "adapter_model.safetensors"
    if (not force and recipe_path.is_file() and weights.is_file()
            and json.loads(recipe_path.read_text()) == wanted):
        return out, False
    if out.exists():
        shutil.rmtree(out)
    _, layers, targets, r, dtype = ADAPTERS[name]
    write_synthetic_adapter(out, layers=layers, targets=targets, r=r, alpha=2 * r, dtype=dtype, seed=0,
                            base_model_name_or_path=wanted["base_model_name_or_path"], spectrum=wanted["spectrum"])
    recipe_path.write_text(json.dumps(wanted, indent=2) + "\n")
    return out, True


# --- "trained" spectra (issue 17 item 7): the shape of what a real training run gives -----------------------------
# Per module B = 0.02·G·diag(e^(−i/τ))·Q (G Gaussian d_out×r, Q a random r×r rotation, τ log-uniform in
# [0.4, r/1.5]: effective rank from ~1 to ~r across modules) and A Gaussian/√d_in, fp32. Unlike the "steep"
# adapters above (decay placed on one factor, σ_r/σ₁ < 1e-4 everywhere), about half of these pairs are
# ill-conditioned only through the rotation Q, which is what sends the audit down its Cholesky-root path.
TRAINED_ADAPTERS: dict[str, tuple[str, int, dict[str, tuple[int, int]], int]] = {
    "llama7b_r16_trained_f32": ("7B shapes, r=16, trained-like spectra (B = 0.02·G·diag(e^(-i/τ))·Q)", 32,
                                _LLAMA7B, 16),
}


def trained_pair(rng: Any, d_out: int, d_in: int, r: int) -> tuple[Any, Any, float]:
    """(A (r, d_in), B (d_out, r), τ) of one trained-like module, float32."""
    import numpy as np

    tau = float(np.exp(rng.uniform(np.log(0.4), np.log(r / 1.5))))
    q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    g = rng.standard_normal((d_out, r))
    b = (0.02 * g * np.exp(-np.arange(r) / tau)) @ q
    a = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
    return a.astype(np.float32), b.astype(np.float32), tau


def ensure_trained_adapter(name: str, data_dir: Path = DATA_DIR, *, force: bool = False) -> tuple[Path, bool]:
    """Generate the trained-like adapter ``name`` (see TRAINED_ADAPTERS) unless it is up to date."""
    import numpy as np

    from support.synthetic import MLP_LEAVES, write_safetensors

    _, layers, targets, r = TRAINED_ADAPTERS[name]
    out = data_dir / name
    wanted = {"layers": layers, "targets": {k: list(v) for k, v in targets.items()}, "r": r, "alpha": 2 * r,
              "dtype": "F32", "seed": 0, "generator": "trained-1", "base_model_name_or_path": DEFAULT_BASE_NAME}
    recipe_path, weights = out / RECIPE_FILE, out / "adapter_model.safetensors"
    if (not force and recipe_path.is_file() and weights.is_file()
            and json.loads(recipe_path.read_text()) == wanted):
        return out, False
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for i in range(layers):
        for leaf, (d_out, d_in) in targets.items():
            part = "mlp" if leaf in MLP_LEAVES else "self_attn"
            prefix = f"base_model.model.model.layers.{i}.{part}.{leaf}"
            a, b, _ = trained_pair(rng, d_out, d_in, r)
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    write_safetensors(weights, tensors, dtype="F32")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": sorted(targets), "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": DEFAULT_BASE_NAME, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    recipe_path.write_text(json.dumps(wanted, indent=2) + "\n")
    return out, True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"adapters to build (default: all): {', '.join(ADAPTERS)}")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("--list", action="store_true", help="list the adapters and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (desc, *_rest) in ADAPTERS.items():
            print(f"{name:20s} {desc}")
        return 0
    unknown = [n for n in args.names if n not in ADAPTERS]
    if unknown:
        ap.error(f"unknown adapter(s): {', '.join(unknown)}")
    for name in args.names or list(ADAPTERS):
        t0 = time.perf_counter()
        out, generated = ensure_adapter(name, args.data_dir, force=args.force)
        size = (out / "adapter_model.safetensors").stat().st_size / 2**20
        state = f"generated in {time.perf_counter() - t0:.1f} s" if generated else "up to date"
        print(f"{name:20s} {size:8.1f} MiB  {pair_count(name):4d} pairs  {state}  {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
