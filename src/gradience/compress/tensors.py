"""The output tensors of ``compress``, produced lazily one pair at a time for the streaming writer.

Each LoRA factor of a changed module is recomputed (truncated SVD or rescale, :mod:`gradience.compress.factors`)
when the writer reaches it; everything else (verbatim modules, DoRA magnitudes, modules_to_save copies) is
copied as stored bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.adapter.sources import SafetensorsSource
from gradience.audit.spectrum import factor_grams
from gradience.compress.experts import join_stack, parameter_name, split_stack
from gradience.compress.factors import (
    batched_gram_truncation,
    rescaled_factors,
    scaled_truncated_factors,
    truncated_factors,
)
from gradience.compress.result import LayerPlan
from gradience.engines import OutputFacts, facts_from_config
from gradience.errors import InputError
from gradience.io.safetensors_write import TensorSpec

_STORED_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                 "F32": "F32", "BF16": "BF16", "F16": "F16", "F64": "F64"}


def _stored_name(dtype: str, key: str, where: str | None) -> str:
    name = _STORED_DTYPE.get(dtype)
    if name is None:
        raise InputError(f"tensor '{key}' has dtype {dtype}, which compress cannot write", where)
    return name


def factor_layout(pair: LoraPair, a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """New (A (k, d_in), B (d_out, k)) in the pair's stored layout: conv 4-D, transposed pairs transposed."""
    if pair.kind == "conv":
        return a.reshape((k, *pair.a_shape[1:])), b.reshape((pair.b_shape[0], k, *pair.b_shape[2:]))
    if tuple(pair.a_shape) != (pair.r, pair.d_in):  # the reader transposed both factors back
        return a.T, b.T
    return a, b


# Largest/smallest Gram diagonal for which the unscaled truncation keeps float64 accuracy (an all-zero factor
# has a zero Gram and goes the scaled way too, which handles it).
_GRAM_SAFE = (1e-250, 1e250)


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(x).all()) for x in arrays)


def _truncate(layer: LayerPlan, a: np.ndarray, b: np.ndarray, where: str | None
              ) -> tuple[np.ndarray, np.ndarray, str]:
    """The truncated factors of one module; finite factors whose σ or Grams overflow float64 (F64 ~1e200)
    go through the scaled path; NaN/Inf factors or a LAPACK failure are a clean InputError."""
    try:
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            grams = factor_grams(a, b)
            tops = [float(np.max(np.diag(g))) if g.size else 1.0 for g in grams]
            # Grams near float64's ends (subnormal or overflowing) lose the σ accuracy: scaled path below.
            if all(_GRAM_SAFE[0] <= t <= _GRAM_SAFE[1] for t in tops):
                a_new, b_new, method = truncated_factors(a, b, layer.r_after, layer.coef, grams)
                if _finite(a_new, b_new):
                    return a_new, b_new, method
    except np.linalg.LinAlgError:
        pass
    if not _finite(a, b):
        raise InputError(f"module {layer.name}: its factors hold NaN/Inf, which cannot be truncated", where)
    try:
        a_new, b_new, method = scaled_truncated_factors(a, b, layer.r_after, layer.coef)
    except np.linalg.LinAlgError as exc:
        raise InputError(f"module {layer.name}: its SVD failed ({exc}); the factors changed while being read?",
                         where) from None
    return a_new, b_new, method


def _read_pair(raw: _RawReader, pair: LoraPair) -> tuple[np.ndarray, np.ndarray]:
    """A (r, d_in), B (d_out, r) of ``pair`` read through the writer's own source (pread copies, F64 kept)."""
    a = raw.read_float(pair.a_key, "")
    b = raw.read_float(pair.b_key, "")
    if pair.kind != "conv" and tuple(pair.a_shape) != (pair.r, pair.d_in):
        a, b = a.T, b.T
    return a.reshape(pair.r, pair.d_in), b.reshape(pair.d_out, pair.r)


def factor_shapes(pair: LoraPair, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if pair.kind == "conv":
        return (k, *pair.a_shape[1:]), (pair.b_shape[0], k, *pair.b_shape[2:])
    if tuple(pair.a_shape) != (pair.r, pair.d_in):
        return (pair.d_in, k), (k, pair.d_out)
    return (k, pair.d_in), (pair.d_out, k)


class _RawReader:
    """Stored bytes of one tensor: zero-copy from safetensors, re-encoded (lossless) from pickled state dicts."""

    def __init__(self, source: Any, where: str | None) -> None:
        self.source = source
        self.where = where
        self.raw = source.read_raw if isinstance(source, SafetensorsSource) else None

    def read(self, key: str, dtype: str) -> np.ndarray:
        if self.raw is not None:
            return self.raw(key)
        from gradience.io.safetensors_write import encode_float

        if dtype == "F64":
            raise InputError(f"tensor '{key}' is float64 in a pickled file; convert the adapter to safetensors",
                             self.where)
        return encode_float(self.source.read_f32(key), dtype)

    def read_float(self, key: str, dtype: str) -> np.ndarray:
        """One floating tensor as numbers (float64 kept as float64, BF16 widened exactly)."""
        read = getattr(self.source, "read_float", None)
        return read(key) if read is not None else self.source.read_f32(key)


def source_sha256(loaded: LoadedAdapter) -> str:
    """sha256 of the weights file (for a sharded adapter: of its shards in index order, concatenated)."""
    path = Path(loaded.adapter_weights_path or "")
    files = [path]
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            weight_map = {}
        files = [path.parent / name for name in dict.fromkeys(weight_map.values())]
    digest = hashlib.sha256()
    buf = bytearray(1 << 22)  # one reused buffer (readinto): a fresh 4 MiB bytes object per chunk cost ~25%
    view = memoryview(buf)
    for file in files:
        try:
            with open(file, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    digest.update(view[:n])
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", file) from None
    return digest.hexdigest()


def tensor_specs(loaded: LoadedAdapter, layers: list[LayerPlan], out_dtype: str | None
                  ) -> tuple[list[TensorSpec], dict[str, int], dict[str, Any]]:
    """The output tensors in the input's key order, each produced lazily (one pair's factors at a time)."""
    from gradience.adapter.loader import open_weights
    from gradience.adapter.pairs import parse_factor_key
    from gradience.io.safetensors_write import encode_float

    where = loaded.adapter_weights_path
    source = open_weights(Path(where or ""))
    if isinstance(source, SafetensorsSource):
        source.use_copies()  # one tensor at a time anyway; a shrinking input is an error, not SIGBUS
    raw = _RawReader(source, where)
    metas = source.metas()
    by_key: dict[str, tuple[LayerPlan, str]] = {}
    stacks: dict[str, tuple[list[LayerPlan], str]] = {}  # MoE expert stacks: one A/B key for all experts
    for layer in layers:
        assert layer.pair is not None
        if layer.pair.expert is not None:
            stacks.setdefault(layer.pair.a_key, ([], "A"))[0].append(layer)
            stacks[layer.pair.b_key] = (stacks[layer.pair.a_key][0], "B")
            continue
        by_key[layer.pair.a_key] = (layer, "A")
        by_key[layer.pair.b_key] = (layer, "B")
    pending: dict[str, dict[str, np.ndarray]] = {}

    def take(slot_key: str, side: str, dtype: str, what: str) -> np.ndarray:
        """One side of factors computed for both, encoded in its own dtype (A and B may be stored in different
        dtypes, and the writer may ask for B first); the slot is dropped once both sides are taken."""
        slot = pending[slot_key]
        out = slot.pop(side)
        if not slot:
            del pending[slot_key]
        try:
            return encode_float(out, dtype)
        except ValueError as exc:
            raise InputError(f"{what}: {exc}; choose another --dtype", where) from None

    def new_factors(layer: LayerPlan, side: str, dtype: str) -> np.ndarray:
        pair = layer.pair
        assert pair is not None
        slot = pending.get(layer.name)
        if slot is None:
            a, b = _read_pair(raw, pair)
            if layer.action == "truncated":
                # The Grams are recomputed here, on factors just read, rather than kept from the audit pass
                # (cheap next to the read, and independent of how the audit reduces its factors).
                a_new, b_new, method = _truncate(layer, a, b, where)
                layer.method = method
            else:
                a_new, b_new = rescaled_factors(a, b, layer.r_after, layer.coef)
            a_st, b_st = factor_layout(pair, a_new, b_new, layer.r_after)
            slot = pending[layer.name] = {"A": a_st, "B": b_st}
        return take(layer.name, side, dtype, f"module {layer.name}")

    def new_stack(group: list[LayerPlan], side: str, dtype: str) -> np.ndarray:
        """Every expert's factors recomputed on its own, joined back in PEFT's stacked layout."""
        first = group[0].pair
        assert first is not None and first.num_experts is not None
        slot = pending.get(first.a_key)
        if slot is None:
            a_all = raw.read_float(first.a_key, "").reshape(first.a_shape)
            b_all = raw.read_float(first.b_key, "").reshape(first.b_shape)
            parts = split_stack(a_all, b_all, first.num_experts, first.r)
            ordered = sorted(group, key=lambda la: (la.pair.expert or 0) if la.pair else 0)
            k = group[0].r_after
            batch = None
            if all(la.action == "truncated" and la.coef == ordered[0].coef for la in ordered):
                # one batched Gram truncation for the whole stack; experts it cannot take go the one-pair way
                batch = batched_gram_truncation(a_all.reshape(first.num_experts, first.r, -1),
                                                b_all.reshape(first.d_out, first.r, first.num_experts),
                                                k, ordered[0].coef)
            if batch is not None and len(ordered) == first.num_experts:
                # the batch's A' (E, k, in) and B' (a view of (out, k, E)) are already PEFT's stacked layout:
                # only the experts the batch could not take are redone and written into it
                a_st, b_st = batch[0].reshape(-1, batch[0].shape[2]), batch[1].transpose(1, 2, 0)
                for e in np.flatnonzero(~batch[2]).tolist():
                    layer = ordered[e]
                    assert layer.pair is not None and layer.pair.expert == e
                    a_in, b_in = parts[e]
                    a_e, b_e, layer.method = _truncate(layer, a_in, b_in, where)
                    a_st[e * k:(e + 1) * k], b_st[:, :, e] = a_e, b_e
                for e in np.flatnonzero(batch[2]).tolist():
                    ordered[e].method = "gram"
                b_st = b_st.reshape(first.d_out, -1)
            else:
                out_parts = []
                for layer in ordered:
                    assert layer.pair is not None and layer.pair.expert is not None
                    e = layer.pair.expert
                    a, b = parts[e]
                    if batch is not None and batch[2][e]:
                        a_new, b_new, layer.method = batch[0][e], batch[1][e], "gram"
                    elif layer.action == "truncated":
                        a_new, b_new, layer.method = _truncate(layer, a, b, where)
                    else:
                        a_new, b_new = rescaled_factors(a, b, layer.r_after, layer.coef)
                    out_parts.append((a_new, b_new))
                a_st, b_st = join_stack(out_parts, k)
            slot = pending[first.a_key] = {"A": a_st, "B": b_st}
        return take(first.a_key, side, dtype, f"parameter {parameter_name(first)}")

    by_prefix = {layer.peft_prefix: layer for layer in layers}

    def scaled_bias(key: str, layer: LayerPlan, stored: str) -> np.ndarray:
        # PEFT applies lora_B's bias times the module's scale (forward: lora_B(lora_A(x)) * scaling; merge:
        # base bias += scaling * lora_B.bias). The output's scale is α/k, so the bias carries the same
        # coefficient c = s·k/α as B'·A' (issue 17: copied unchanged, it was applied r/k times too strongly).
        value = np.asarray(raw.read_float(key, stored), dtype=np.float64) * layer.coef
        try:
            return encode_float(value, stored)
        except ValueError as exc:
            raise InputError(f"lora_B bias of module {layer.name}: {exc}", where) from None

    specs: list[TensorSpec] = []
    dtypes: Counter[str] = Counter()
    non_lora: dict[str, Any] = {"count": 0, "params": 0, "names": [], "dora_magnitudes": 0, "lora_biases": 0,
                                "lora_biases_rescaled": 0}
    for key, meta in metas.items():
        stored = _stored_name(meta.dtype, key, where)
        stack = stacks.get(key)
        if stack is not None:
            group, side = stack
            dtype = out_dtype or stored
            dtypes[dtype] += 1
            if all(la.verbatim for la in group) and dtype == stored:
                specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
                continue
            k_all = group[0].r_after * len(group)
            shape = (k_all, meta.shape[1]) if side == "A" else (meta.shape[0], k_all)
            for la in group:
                la.method = "convert" if la.verbatim else la.method
            specs.append(TensorSpec(key, dtype, shape, partial(new_stack, group, side, dtype)))
            continue
        hit = by_key.get(key)
        if hit is None:
            parsed = parse_factor_key(key)
            if parsed is not None and parsed.role == "lora_magnitude_vector":
                non_lora["dora_magnitudes"] += 1
            elif parsed is not None and parsed.param == "bias":
                non_lora["lora_biases"] += 1
                owner = by_prefix.get(parsed.prefix) if parsed.role in ("lora_B", "lora_embedding_B") else None
                if owner is not None and not owner.verbatim:
                    non_lora["lora_biases_rescaled"] += 1
                    specs.append(TensorSpec(key, stored, meta.shape, partial(scaled_bias, key, owner, stored)))
                    dtypes[stored] += 1
                    continue
            else:
                non_lora["count"] += 1
                non_lora["params"] += meta.numel
                non_lora["names"].append(key)
            specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
            dtypes[stored] += 1
            continue
        layer, side = hit
        assert layer.pair is not None
        dtype = out_dtype or stored
        dtypes[dtype] += 1
        if layer.verbatim and dtype == stored:
            specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
            continue
        if layer.verbatim:
            layer.method = "convert"
        a_shape, b_shape = factor_shapes(layer.pair, layer.r_after)
        specs.append(TensorSpec(key, dtype, a_shape if side == "A" else b_shape,
                                partial(new_factors, layer, side, dtype)))
    return specs, dict(dtypes), non_lora


def output_facts(layers: list[LayerPlan], config: dict[str, Any], non_lora: dict[str, Any]) -> OutputFacts:
    """The written adapter as the engine table sees it (the one rule set of :mod:`gradience.engines`)."""
    return facts_from_config(config, [la.r_after for la in layers], kinds={la.kind for la in layers},
                             non_lora_names=non_lora["names"], has_lora_bias=bool(non_lora["lora_biases"]),
                             dora=bool(config.get("use_dora")) or any(la.dora for la in layers),
                             expert_parameters=[parameter_name(la.pair) for la in layers
                                                if la.pair is not None and la.pair.expert is not None],
                             expert_shapes=[(parameter_name(la.pair), la.d_in, la.d_out) for la in layers
                                            if la.pair is not None and la.pair.expert is not None],
                             # an MLX output is judged as its PEFT twin (the mlx_output issue says so)
                             adapter_format="peft")


# Earlier private names (merge imported them before they were public).
_factor_layout = factor_layout
_factor_shapes = factor_shapes
