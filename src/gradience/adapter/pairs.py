"""From tensor names and shapes to LoRA pairs: key parsing, pairing, orientation, rank and scale per module.

Only metadata is used here (names, shapes, dtypes); each pair gets a loader that reads and orients its two
factors when the math asks for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from gradience.adapter.config import merge_issues, module_rank, module_scale
from gradience.adapter.experts import split_expert_slots
from gradience.adapter.model import LoraPair, NonLoraTensors, PairKind
from gradience.adapter.sources import TensorMeta, TensorSource
from gradience.issues import Issue
from gradience.policy.thresholds import MAX_FACTOR_RANK, RANK_ABOVE_DIM_MAX

PEFT_ROOT_PREFIX = "base_model.model."
_FACTOR_ROLES = {"lora_A": ("linear", "A"), "lora_B": ("linear", "B"),
                 "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B")}
_MAGNITUDE = "lora_magnitude_vector"
_PARAM_SUFFIXES = ("weight", "bias")
# How many module names an issue message spells out before "and N more" (the full list is in ``modules``).
_MESSAGE_NAMES = 5


@dataclass(frozen=True)
class FactorKey:
    """A parsed LoRA factor key: ``<prefix>.<role>[.<adapter>][.<param>]``."""

    prefix: str
    role: str           # lora_A, lora_B, lora_embedding_A, lora_embedding_B, lora_magnitude_vector
    adapter: str | None
    param: str | None


def parse_factor_key(key: str) -> FactorKey | None:
    """Parse a state-dict key naming a LoRA factor or DoRA magnitude; None for any other tensor.

    Saved files drop the adapter name (``q_proj.lora_A.weight``); in-memory state dicts keep it
    (``q_proj.lora_A.default.weight``, ``embed_tokens.lora_embedding_A.default``).
    """
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        role = parts[i]
        if role not in _FACTOR_ROLES and role != _MAGNITUDE:
            continue
        rest = parts[i + 1:]
        param: str | None = None
        if rest and rest[-1] in _PARAM_SUFFIXES:
            param, rest = rest[-1], rest[:-1]
        if len(rest) > 1:
            return None
        return FactorKey(".".join(parts[:i]), role, rest[0] if rest else None, param)
    return None


def module_name(prefix: str) -> str:
    """The base model's module path for a PEFT key prefix (``base_model.model.`` stripped)."""
    return prefix[len(PEFT_ROOT_PREFIX):] if prefix.startswith(PEFT_ROOT_PREFIX) else prefix


@dataclass
class _Slot:
    a: TensorMeta | None = None
    b: TensorMeta | None = None
    kind: str = "linear"


class _FactorLoader:
    """Reads one pair's factors and orients them as A (r, d_in), B (d_out, r) (views, no copies for F32)."""

    def __init__(self, source: TensorSource, a_key: str, b_key: str, r: int, d_in: int, d_out: int,
                 transposed: bool) -> None:
        self.source, self.a_key, self.b_key = source, a_key, b_key
        self.r, self.d_in, self.d_out, self.transposed = r, d_in, d_out, transposed

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        read = getattr(self.source, "read_float", self.source.read_f32)  # F64 stays F64 (no overflow to inf)
        a = read(self.a_key)
        b = read(self.b_key)
        if self.transposed:
            a, b = a.T, b.T
        return a.reshape(self.r, self.d_in), b.reshape(self.d_out, self.r)

    def for_gram(self) -> tuple[tuple[np.ndarray, bool], tuple[np.ndarray, bool]]:
        """((A, A is bf16 bits), (B, B is bf16 bits)), oriented like ``__call__``: BF16 factors stay uint16
        views of the file so that the Gram pass converts them chunk by chunk (no whole float32 copy)."""
        read = getattr(self.source, "read_for_gram", None)
        if read is None:
            a, b = self()
            return (a, False), (b, False)
        (a, a16), (b, b16) = read(self.a_key), read(self.b_key)
        if self.transposed:
            a, b = a.T, b.T
        return (a.reshape(self.r, self.d_in), a16), (b.reshape(self.d_out, self.r), b16)

    def release(self) -> None:
        """Drop both factors' mapped pages (a no-op for in-memory sources)."""
        release = getattr(self.source, "release", None)
        if release is not None:
            release(self.a_key)
            release(self.b_key)


class _MagnitudeLoader:
    """Reads one DoRA magnitude vector (any stored shape; the pair reshapes it to (d_out,))."""

    def __init__(self, source: TensorSource, key: str) -> None:
        self.source, self.key = source, key

    def __call__(self) -> np.ndarray:
        return self.source.read_f32(self.key).reshape(-1)


@dataclass
class _Orientation:
    r: int
    d_in: int
    d_out: int
    transposed: bool


def _orient(kind: str, a: tuple[int, ...], b: tuple[int, ...], expected_r: int | None) -> _Orientation | None:
    """Rank and dimensions from the stored shapes, or None when they fit no LoRA layout."""
    if kind == "conv":
        # Conv LoRA: A (r, in, *kernel) and B (out, r, 1, ...); flattened to (r, in·k…) and (out, r).
        if len(a) != len(b) or a[0] != b[1] or any(d != 1 for d in b[2:]) or 0 in (a[0], prod(a[1:]), b[0]):
            return None
        return _Orientation(a[0], prod(a[1:]), b[0], False)
    if len(a) != 2 or len(b) != 2:
        return None
    options = []
    if a[0] == b[1]:
        options.append(_Orientation(a[0], a[1], b[0], False))
    if a[1] == b[0]:
        options.append(_Orientation(a[1], a[0], b[1], True))
    options = [o for o in options if o.r > 0 and o.d_in > 0 and o.d_out > 0]
    if len(options) == 2:
        # Square-ish shapes fit both ways: prefer the config's rank, then a rank no larger than the dimensions.
        by_config = [o for o in options if o.r == expected_r]
        plausible = [o for o in options if o.r <= min(o.d_in, o.d_out)]
        options = by_config or plausible or options
    return options[0] if options else None


def rank_bound_problem(r: int, d_in: int, d_out: int) -> str | None:
    """Why a pair's rank (the dimension its factors share) is not believable, or None.

    A forged 2 MB file with A (100000, 2) and B (3, 100000) would make the audit build a 100000 x 100000 Gram
    (75 GB). A real LoRA rank is at most the layer's smaller dimension, give or take a small rank on a tiny
    layer (PEFT accepts r=8 on a 2-class head), and never above ``MAX_FACTOR_RANK``.
    """
    if r > MAX_FACTOR_RANK:
        return f"rank {r} exceeds the limit of {MAX_FACTOR_RANK}"
    if r > min(d_in, d_out) and r > RANK_ABOVE_DIM_MAX:
        return f"rank {r} exceeds the layer's smaller dimension min({d_in}, {d_out})"
    return None


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting ``layers.2`` before ``layers.10`` (files list tensors alphabetically)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _natural_keys(names: list[str]) -> list[list[tuple[int, int | str]]]:
    """:func:`_natural_key` of each name; an MoE expert name (``<parameter>[e]``) reuses its parameter's key,
    split once per parameter instead of once per expert (12,288 regex splits on a Qwen3-30B-A3B adapter)."""
    heads: dict[str, list[tuple[int, int | str]]] = {}
    out = []
    for name in names:
        head, bracket, tail = name.rpartition("[")
        if bracket and tail[-1:] == "]" and tail[:-1].isdecimal():
            key = heads.get(head)
            if key is None:  # head + "[" ends in a non-digit, so the digits after it are their own piece
                key = heads[head] = _natural_key(head + "[")
            out.append([*key, (0, int(tail[:-1])), (1, "]")])
        else:
            out.append(_natural_key(name))
    return out


def _names(modules: list[str]) -> str:
    shown = ", ".join(modules[:_MESSAGE_NAMES])
    return shown + (f" and {len(modules) - _MESSAGE_NAMES} more" if len(modules) > _MESSAGE_NAMES else "")


def build_pairs(source: TensorSource, config: Mapping[str, Any], adapter_name: str | None = None
                ) -> tuple[list[LoraPair], NonLoraTensors, list[Issue]]:
    """Pair the factors of ``source`` into LoRA pairs; everything else is counted as non-LoRA tensors.

    ``adapter_name`` keeps only factors whose key carries that adapter segment (or none), for in-memory
    state dicts of models holding several adapters.
    """
    slots: dict[tuple[str, str | None], _Slot] = {}
    magnitudes: dict[tuple[str, str | None], TensorMeta] = {}  # DoRA m vectors, attached to their pair below
    non_lora = NonLoraTensors()
    adapters_seen: set[str] = set()
    for key, meta in source.metas().items():
        parsed = parse_factor_key(key)
        if parsed is not None and adapter_name is not None and parsed.adapter not in (None, adapter_name):
            continue  # another adapter's factor in a multi-adapter state dict
        if parsed is not None and parsed.role == _MAGNITUDE and parsed.param != "bias":
            magnitudes[(parsed.prefix, parsed.adapter)] = meta
            continue
        if parsed is None or parsed.role == _MAGNITUDE or parsed.param == "bias":
            # modules_to_save copies, heads, lora_B biases: reported, not audited.
            non_lora.count += 1
            non_lora.params += meta.numel
            non_lora.names.append(key)
            continue
        if parsed.adapter is not None:
            adapters_seen.add(parsed.adapter)
        slot_kind, side = _FACTOR_ROLES[parsed.role]
        slot = slots.setdefault((parsed.prefix, parsed.adapter), _Slot(kind=slot_kind))
        if side == "A":
            slot.a = meta
        else:
            slot.b = meta

    issues: list[Issue] = []
    if len(adapters_seen) > 1:
        issues.append(Issue("multiple_adapters",
                            f"the state dict holds factors of several adapters ({', '.join(sorted(adapters_seen))}); "
                            "all are listed, select one by adapter name to audit it alone"))
    unpaired: list[str] = []
    unpaired_keys: list[str] = []
    shape_bad: dict[str, dict[str, Any]] = {}
    dtype_bad: dict[str, str] = {}
    rank_bad: dict[str, dict[str, int]] = {}
    transposed: list[str] = []
    magnitude_bad: dict[str, str] = {}
    used_magnitudes: set[tuple[str, str | None]] = set()
    per_module_issues: list[Issue] = []
    # PEFT target_parameters wrappers (MoE experts): one pair per expert, named after the parameter
    pairs, expert_issues = split_expert_slots(slots, source, config, module_name)
    issues.extend(expert_issues)

    for (prefix, _adapter), slot in slots.items():
        name = module_name(prefix)
        if slot.a is None or slot.b is None:
            present = slot.a or slot.b
            assert present is not None
            unpaired.append(name)
            unpaired_keys.append(present.key)
            continue
        a, b = slot.a, slot.b
        if not (a.is_float and b.is_float):
            dtype_bad[name] = f"{a.dtype}/{b.dtype}"
            continue
        kind: PairKind = "embedding" if slot.kind == "embedding" else ("conv" if len(a.shape) > 2 else "linear")
        expected_r = module_rank(config, name)
        orient = _orient(kind, a.shape, b.shape, expected_r)
        if orient is None:
            shape_bad[name] = {"a_shape": list(a.shape), "b_shape": list(b.shape)}
            continue
        bomb = rank_bound_problem(orient.r, orient.d_in, orient.d_out)
        if bomb is not None:  # refused from the shapes alone, before any r x r allocation
            shape_bad[name] = {"a_shape": list(a.shape), "b_shape": list(b.shape), "reason": bomb}
            continue
        if orient.transposed:
            transposed.append(name)
        if expected_r is not None and expected_r != orient.r:
            rank_bad[name] = {"shape_r": orient.r, "config_r": expected_r}
        alpha, scale, scale_issues = module_scale(config, name, orient.r)
        per_module_issues.extend(scale_issues)
        loader = _FactorLoader(source, a.key, b.key, orient.r, orient.d_in, orient.d_out, orient.transposed)
        mag_slot = (prefix, _adapter) if (prefix, _adapter) in magnitudes else (prefix, None)
        mag = magnitudes.get(mag_slot)
        if mag is not None:
            used_magnitudes.add(mag_slot)
            if not mag.is_float or mag.numel != orient.d_out:
                magnitude_bad[name] = f"{mag.key} {mag.dtype}{list(mag.shape)}, expected {orient.d_out} floats"
                mag = None
        pairs.append(LoraPair(
            name=name, peft_prefix=prefix, kind=kind, dora=mag_slot in used_magnitudes, r=orient.r, alpha=alpha,
            scale=scale, a_key=a.key, b_key=b.key, a_shape=a.shape, b_shape=b.shape, d_in=orient.d_in,
            d_out=orient.d_out, loader=loader, magnitude_key=None if mag is None else mag.key,
            magnitude_loader=None if mag is None else _MagnitudeLoader(source, mag.key),
        ))

    for slot_key, mag in magnitudes.items():
        if slot_key not in used_magnitudes:  # a magnitude without its LoRA pair: reported, not audited
            non_lora.count += 1
            non_lora.params += mag.numel
            non_lora.names.append(mag.key)
    if magnitude_bad:
        issues.append(Issue("shape_mismatch",
                            "DoRA magnitude vectors that do not hold one float per output feature; the effective "
                            "update of these modules cannot be computed: "
                            + _names([f"{n} ({v})" for n, v in magnitude_bad.items()]),
                            modules=list(magnitude_bad), extra={"magnitudes": magnitude_bad}))

    if unpaired:
        issues.append(Issue("unpaired_factor",
                            f"{len(unpaired)} LoRA factor(s) without their twin (lora_A without lora_B or the "
                            f"reverse), not audited: {_names(unpaired_keys)}",
                            modules=unpaired, extra={"keys": unpaired_keys}))
    if dtype_bad:
        issues.append(Issue("unsupported_dtype",
                            f"LoRA factors that are not floating point, not audited: {_names(list(dtype_bad))}",
                            modules=list(dtype_bad), extra={"dtypes": dtype_bad}))
    if shape_bad:
        detail = [f"{n} (A {tuple(s['a_shape'])}, B {tuple(s['b_shape'])}"
                  + (f": {s['reason']})" if "reason" in s else ")") for n, s in shape_bad.items()]
        issues.append(Issue("shape_mismatch",
                            "factor shapes fit neither A (r, d_in) / B (d_out, r) nor its transpose, not audited: "
                            + _names(detail), modules=list(shape_bad), extra={"shapes": shape_bad}))
    if rank_bad:
        detail = [f"{n} (factors r={v['shape_r']}, config r={v['config_r']})" for n, v in rank_bad.items()]
        issues.append(Issue("rank_mismatch",
                            "factor rank differs from the config's r / rank_pattern; the factor shapes are used: "
                            + _names(detail), modules=list(rank_bad), extra={"ranks": rank_bad}))
    if transposed:
        issues.append(Issue("transposed_factors",
                            "factors stored transposed (A as (d_in, r), B as (r, d_out)) were transposed back: "
                            + _names(transposed), severity="info", modules=transposed))
    issues.extend(merge_issues(per_module_issues))
    keys = _natural_keys([p.name for p in pairs])
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    pairs[:] = [pairs[i] for i in order]
    return pairs, non_lora, issues
