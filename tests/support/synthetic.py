"""Numpy-only synthetic PEFT adapters and a minimal safetensors writer (no torch).

One implementation shared by the tests and by ``benchmarks/make_adapters.py``. The writer is independent
of ``gradience.io.safetensors`` on purpose: tests use it to check that reader against files it did not
write itself, and to craft odd files (NaN factors, bf16, custom keys).

Synthetic factors have a decaying singular spectrum that differs from pair to pair (a power law with a
random exponent), so energy ranks and utilizations vary across layers the way they do in trained adapters,
and B is non-zero unless asked otherwise.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

# Weight shapes (d_out, d_in) of the seven usual Llama LoRA targets.
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc",
                        "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h"})


def llama_targets(hidden: int, intermediate: int, kv_out: int | None = None) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of q,k,v,o,gate,up,down for a Llama block (``kv_out`` < hidden for grouped-query attention)."""
    kv = hidden if kv_out is None else kv_out
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate),
    }


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round-to-nearest-even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_tensor(arr: np.ndarray, dtype: str) -> bytes:
    """Raw little-endian bytes of ``arr`` stored as safetensors ``dtype`` (F32, F16, BF16, F64)."""
    if dtype == "BF16":
        return f32_to_bf16_bits(np.asarray(arr, dtype=np.float32)).tobytes()
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return np.ascontiguousarray(arr, dtype=SAFETENSORS_DTYPES[dtype]).tobytes()


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        size = _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], *, dtype: str = "F32",
                      dtypes: Mapping[str, str] | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (float arrays) as a safetensors file; ``dtypes`` overrides ``dtype`` per tensor."""
    path = Path(path)
    names = list(tensors)
    kinds = {n: (dtypes or {}).get(n, dtype) for n in names}
    entries = [(n, kinds[n], tuple(np.shape(tensors[n]))) for n in names]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_header_bytes(entries, {"format": "pt"} if metadata is None else metadata))
        for n in names:
            fh.write(encode_tensor(tensors[n], kinds[n]))
    os.replace(tmp, path)
    return path


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file (independent of gradience's reader)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header: dict[str, Any] = json.loads(fh.read(n))
    return header


def decaying_factors(rng: np.random.Generator, d_out: int, d_in: int, r: int, *, exponent: float,
                     magnitude: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Random (A (r, d_in), B (d_out, r)) float32 whose product has σ_i ≈ magnitude·(i+1)^-exponent.

    Gaussian columns scaled by 1/sqrt(d) are nearly orthonormal, so the singular values of B·A follow the
    imposed profile closely (not exactly; tests compare against a dense SVD, never against the profile).
    """
    profile = (magnitude * np.arange(1, r + 1, dtype=np.float64) ** -exponent).astype(np.float32)
    a = rng.standard_normal((r, d_in), dtype=np.float32)
    a *= np.float32(1.0 / np.sqrt(d_in))
    a *= profile[:, None]
    b = rng.standard_normal((d_out, r), dtype=np.float32)
    b *= np.float32(1.0 / np.sqrt(d_out))
    return a, b


# ``spectrum="steep"`` (write_synthetic_adapter): every pair's σ_r/σ₁ is 10^-decades with decades drawn from
# this range (trained adapters often decay this fast), and one pair in RANK_DEFICIENT_EVERY is exactly
# rank-deficient. Both take the audit's refinement path, so benchmarks measure it instead of the easy case.
STEEP_DECADES = (4.5, 8.0)
RANK_DEFICIENT_EVERY = 8
STEEP_PLACEMENTS = ("b", "a", "split", "rotated")


def steep_factors(rng: np.random.Generator, d_out: int, d_in: int, r: int, *, decades: float,
                  placement: str = "b", magnitude: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 (A, B) whose product has σ_i ≈ magnitude·10^(-decades·i/(r-1)) (σ_r/σ₁ ≈ 10^-decades).

    ``placement`` puts the decay on B's columns ("b": B carries the learned scale, as after training from
    PEFT's B = 0 init), on A's rows ("a"), half on each ("split"), or on B in a random rotated basis
    ("rotated": no row or column scale shows it). Scaling whole rows/columns keeps the decay when the factors
    are rounded to bf16 (rounding is relative per entry); a rotated decay does not survive bf16 rounding.
    """
    steps = np.arange(r, dtype=np.float64) / max(r - 1, 1)
    profile = magnitude * 10.0 ** (-decades * steps)
    a = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal((d_out, r)) / np.sqrt(d_out)
    if placement == "a":
        a *= profile[:, None]
    elif placement == "b":
        b *= profile[None, :]
    elif placement == "split":
        a *= np.sqrt(profile)[:, None]
        b *= np.sqrt(profile)[None, :]
    elif placement == "rotated":
        q, _ = np.linalg.qr(rng.standard_normal((r, r)))
        b = (b * profile[None, :]) @ q
    else:
        raise ValueError(f"placement must be 'a', 'b', 'split' or 'rotated', not {placement!r}")
    return a.astype(np.float32), b.astype(np.float32)


def rank_deficient_factors(rng: np.random.Generator, d_out: int, d_in: int, r: int, *, rank: int,
                           magnitude: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """float32 (A, B) with B·A of rank exactly ``rank`` < r: B's last r - rank columns repeat earlier ones
    bit for bit and the matching rows of A are zero (a rank-r adapter that only learned ``rank`` directions)."""
    a, b = decaying_factors(rng, d_out, d_in, r, exponent=1.0, magnitude=magnitude)
    b[:, rank:] = b[:, np.arange(rank, r) % rank]
    a[rank:] = 0.0
    return a, b


def _steep_pair(seed: int, i: int, t: int, d_out: int, d_in: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """One pair of a ``spectrum="steep"`` adapter (its own random stream, independent of the default one)."""
    rng = np.random.default_rng([seed, i, t, 7])
    if r > 1 and (i * 7 + t) % RANK_DEFICIENT_EVERY == 0:
        return rank_deficient_factors(rng, d_out, d_in, r, rank=int(rng.integers(1, max(2, r // 2))))
    placement = STEEP_PLACEMENTS[int(rng.integers(0, len(STEEP_PLACEMENTS)))]
    return steep_factors(rng, d_out, d_in, r, decades=float(rng.uniform(*STEEP_DECADES)), placement=placement)


def _pattern_value(pattern: Mapping[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern matching: key equals the name or matches a trailing dotted suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def write_synthetic_adapter(out_dir: str | os.PathLike[str], *, layers: int, targets: Mapping[str, tuple[int, int]],
                            r: int, alpha: float, dtype: str = "F32", seed: int = 0,
                            rank_pattern: Mapping[str, int] | None = None,
                            alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False,
                            prefix: str = "base_model.model.model.layers.{i}.self_attn",
                            mlp_prefix: str | None = None, base_model_name_or_path: str | None = None,
                            zero_b: bool = False, exponent_range: tuple[float, float] = (0.5, 2.0),
                            config_overrides: Mapping[str, Any] | None = None, spectrum: str = "power") -> Path:
    """Write a PEFT-layout LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with numpy.

    ``targets`` maps a module leaf name to its weight shape (d_out, d_in). Leaves in ``MLP_LEAVES`` live
    under ``mlp_prefix`` (default: ``prefix`` with ``self_attn`` replaced by ``mlp``). Each pair's rank
    follows ``rank_pattern`` with PEFT's matching rules. The file is streamed pair by pair, so a 790 MiB
    adapter never sits in memory. ``zero_b`` writes B = 0 (an adapter saved before training).
    ``spectrum``: "power" (default: power-law decay, exponent drawn from ``exponent_range``) or "steep"
    (σ_r/σ₁ < 1e-4 on every pair, decay on B, A or both, and every ``RANK_DEFICIENT_EVERY``-th pair exactly
    rank-deficient; see :func:`steep_factors`).
    """
    if spectrum not in ("power", "steep"):
        raise ValueError(f"spectrum must be 'power' or 'steep', not {spectrum!r}")
    if dtype not in ("F32", "BF16", "F16"):
        raise ValueError(f"dtype must be F32, BF16 or F16, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mlp_prefix = mlp_prefix if mlp_prefix is not None else prefix.replace("self_attn", "mlp")

    pairs: list[tuple[str, int, int, int, int, int]] = []  # (peft prefix, layer, target idx, r, d_out, d_in)
    for i in range(layers):
        for t, (leaf, (d_out, d_in)) in enumerate(targets.items()):
            peft_prefix = (mlp_prefix if leaf in MLP_LEAVES else prefix).format(i=i) + "." + leaf
            module_name = peft_prefix.removeprefix("base_model.model.")
            pairs.append((peft_prefix, i, t, int(_pattern_value(rank_pattern, module_name, r)), d_out, d_in))

    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for peft_prefix, _, _, rank, d_out, d_in in pairs:
        entries.append((f"{peft_prefix}.lora_A.weight", dtype, (rank, d_in)))
        entries.append((f"{peft_prefix}.lora_B.weight", dtype, (d_out, rank)))

    weights = out / "adapter_model.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    low, high = exponent_range
    with open(tmp, "wb") as fh:
        fh.write(_header_bytes(entries, {"format": "pt"}))
        for _, i, t, rank, d_out, d_in in pairs:
            if spectrum == "steep":
                a, b = _steep_pair(seed, i, t, d_out, d_in, rank)
            else:
                rng = np.random.default_rng([seed, i, t])
                a, b = decaying_factors(rng, d_out, d_in, rank, exponent=float(rng.uniform(low, high)))
            if zero_b:
                b[:] = 0.0
            fh.write(encode_tensor(a, dtype))
            fh.write(encode_tensor(b, dtype))
    os.replace(tmp, weights)

    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted(targets), "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "base_model_name_or_path": base_model_name_or_path, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update(config_overrides or {})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def synthetic_pair_keys(layers: int, targets: Iterable[str],
                        prefix: str = "base_model.model.model.layers.{i}.self_attn") -> list[str]:
    """The module names (without ``base_model.model.``) that ``write_synthetic_adapter`` produces."""
    mlp_prefix = prefix.replace("self_attn", "mlp")
    names = []
    for i in range(layers):
        for leaf in targets:
            names.append(((mlp_prefix if leaf in MLP_LEAVES else prefix).format(i=i) + "." + leaf)
                         .removeprefix("base_model.model."))
    return names
