"""The QLoRA merge residual: what merging a 4-bit-trained adapter into the 16-bit weights adds besides ΔW.

A QLoRA adapter was trained against deq(Q(W₁₆)), not W₁₆. Merged into W₁₆, the model is deq(Q(W₁₆)) + ΔW +
(W₁₆ − deq(Q(W₁₆))): the last term is a residual the training never saw. unsloth-zoo PR 810 measured it at
10-150x the update on some layers. Per layer we report ρ = ‖W₁₆ − deq(Q(W₁₆))‖_F / ‖s·B·A‖_F, with Q bitsandbytes'
own quantiser (gradience.quant.bnb4.quantize_4bit, bit-exact, without double quantisation: the nested 8-bit absmax
changes each block scale by < 1 %), and the advice: ρ ≥ 1 means merge into deq(Q(W₁₆)) (the base the adapter
learned on), or keep the adapter unmerged on the 4-bit base. ``gradience verify`` uses the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.issues import Issue
from gradience.policy.thresholds import QLORA_RESIDUAL_MAX
from gradience.quant.bnb4 import Bnb4State, code_table, dequantize_4bit, quantize_4bit

# Base names that say the adapter was trained on a bitsandbytes 4-bit base (Unsloth / TheBloke naming).
_FOUR_BIT_MARKERS = ("bnb-4bit", "bnb_4bit", "-4bit", "qlora", "nf4")


def trained_on_4bit(config: dict[str, Any]) -> bool:
    """Whether the adapter config says it was trained on a 4-bit base (its base name, e.g. unsloth/...-bnb-4bit)."""
    name = config.get("base_model_name_or_path")
    return isinstance(name, str) and any(m in name.lower() for m in _FOUR_BIT_MARKERS)


def quantization_residual(weight: np.ndarray, quant_type: str = "nf4", blocksize: int = 64,
                          dtype: str = "bfloat16") -> float:
    """‖W − deq(Q(W))‖_F with bitsandbytes' 4-bit quantiser (values rounded to ``dtype`` as bitsandbytes returns
    them); streamed over row blocks so the temporaries stay small."""
    total = 0.0
    for chunk, deq in _round_trip_chunks(weight, quant_type, blocksize, dtype):
        diff = chunk.astype(np.float64) - deq
        total += float(diff @ diff)
    return math.sqrt(total)


def _round_trip_chunks(weight: np.ndarray, quant_type: str, blocksize: int, dtype: str
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(chunk of the flattened W, deq(Q(chunk))) in steps of whole 4-bit blocks: the one round trip that both
    the residual and :func:`dequantized_twin` use."""
    flat = np.asarray(weight, np.float32).reshape(-1)
    step = max(blocksize, (1 << 22) - (1 << 22) % blocksize)
    code = code_table(quant_type)
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step]
        packed, absmax = quantize_4bit(chunk, quant_type, blocksize)
        state = Bnb4State(quant_type, blocksize, (chunk.shape[0],), dtype)
        yield chunk, dequantize_4bit(packed, absmax, code, state)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``functional.create_dynamic_map()``, Dettmers 2016,
    arXiv:1511.04561): what double quantisation stores the 4-bit block scales in. Per exponent i = 0..6, 2^i
    midpoints of a float32 linspace(0.1, 1) scaled by 10^(i-6), both signs; then 0 and 1; sorted."""
    data: list[float] = []
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        data += (np.float32(10.0 ** (i - 6)) * means).tolist()
        data += (-np.float32(10.0 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, np.float32))


def double_quantized_absmax(absmax: np.ndarray, nested_blocksize: int = 256) -> np.ndarray:
    """The float32 block scales a double-quantised state de-quantises to (bitsandbytes ``quantize_4bit`` with
    ``compress_statistics=True``: absmax − mean quantised blockwise with :func:`dynamic_map`, nearest code by
    midpoints as ``backends/default/ops.py`` ``quantize_blockwise``; de-quantised by ``bnb4.nested_absmax``)."""
    from gradience.quant.bnb4 import nested_absmax

    scales = np.asarray(absmax, np.float32).reshape(-1)
    offset = np.float32(scales.mean(dtype=np.float64))
    centred = scales - offset
    code = dynamic_map()
    bounds = (code[:-1] + code[1:]) / np.float32(2)
    n = centred.shape[0]
    blocks = -(-n // nested_blocksize)
    padded = np.zeros(blocks * nested_blocksize, np.float32)
    padded[:n] = np.abs(centred)
    block_max = padded.reshape(blocks, nested_blocksize).max(axis=1)
    scaled = centred.copy()
    inv = np.float32(1.0) / np.maximum(block_max, np.float32(1e-38))
    for b in range(blocks):   # blocks of 256 scales: a 7B module has ~3000
        scaled[b * nested_blocksize:(b + 1) * nested_blocksize] *= inv[b]
    np.clip(scaled, -1, 1, out=scaled)
    codes = np.searchsorted(bounds, scaled, side="left").astype(np.uint8)
    return nested_absmax(codes, block_max, code, nested_blocksize, float(offset))


def dequantized_twin(weight: np.ndarray, quant_type: str = "nf4", blocksize: int = 64, dtype: str = "bfloat16",
                     *, double_quant: bool = False) -> np.ndarray:
    """deq(Q(W)) as float32 of W's shape: the weights a QLoRA adapter trained on a 4-bit copy of the 16-bit
    ``weight`` actually saw (bitsandbytes' quantiser, rounded to ``dtype``; ``double_quant``: the block scales
    themselves 8-bit quantised, as ``bnb_4bit_use_double_quant=True`` does). ``verify`` checks a merge against it
    and against W itself to name which base a merge used."""
    w = np.asarray(weight, np.float32)
    if double_quant:   # the nested scales depend on the mean over the whole weight: one pass over all of it
        packed, absmax = quantize_4bit(w.reshape(-1), quant_type, blocksize)
        state = Bnb4State(quant_type, blocksize, (w.size,), dtype)
        return dequantize_4bit(packed, double_quantized_absmax(absmax), code_table(quant_type), state
                               ).reshape(w.shape)
    out = np.empty(w.size, np.float32)
    pos = 0
    for chunk, deq in _round_trip_chunks(w, quant_type, blocksize, dtype):
        out[pos:pos + chunk.shape[0]] = deq.reshape(-1)
        pos += chunk.shape[0]
    return out.reshape(w.shape)


@dataclass
class ResidualRow:
    name: str
    residual_frob: float          # ‖W₁₆ − deq(Q(W₁₆))‖_F
    delta_frob: float             # ‖s·B·A‖_F
    ratio: float | None           # residual / delta (None when ΔW = 0)


def residual_rows(weights: Sequence[tuple[str, np.ndarray, float]], quant_type: str = "nf4", blocksize: int = 64,
                  dtype: str = "bfloat16") -> list[ResidualRow]:
    """Rows for (module name, base weight W₁₆, ‖s·B·A‖_F) triples."""
    rows = []
    for name, weight, delta in weights:
        res = quantization_residual(weight, quant_type, blocksize, dtype)
        rows.append(ResidualRow(name, res, delta, res / delta if delta > 0 else None))
    return rows


def residual_issue(rows: Sequence[ResidualRow]) -> Issue | None:
    """The "merge into" recommendation when a layer's residual is at least ``QLORA_RESIDUAL_MAX`` × its update."""
    bad = [r for r in rows if r.ratio is not None and r.ratio >= QLORA_RESIDUAL_MAX]
    if not bad:
        return None
    worst = max(bad, key=lambda r: r.ratio or 0.0)
    return Issue("qlora_merge_residual",
                 f"{len(bad)} of {len(rows)} layer(s): merging into the 16-bit base adds a residual ‖W₁₆ − "
                 f"deq(Q(W₁₆))‖ ≥ {QLORA_RESIDUAL_MAX:g}× the update (worst {worst.ratio:.1f}× on {worst.name}); "
                 "merge into the de-quantised 4-bit base the adapter was trained on (unsloth-zoo PR 810), or serve "
                 "it unmerged on the 4-bit base", "warning", modules=[r.name for r in bad])


# At most this many elements of one base tensor are quantised for the residual (a 70B embedding would otherwise
# cost minutes); larger tensors get no row and an info issue.
MAX_RESIDUAL_NUMEL = 1 << 30


def qlora_block(layers: Sequence[Any], base_spec: str, quant_type: str = "nf4", blocksize: int = 64
                ) -> tuple[dict[str, Any], list[Issue]]:
    """The audit's ``qlora`` block: per layer ρ = ‖W₁₆ − deq(Q(W₁₆))‖ / ‖s·B·A‖ against the 16-bit base
    ``base_spec`` (resolved like UDR's base; matched with UDR's name index), and the "merge into" advice."""
    from gradience.udr.base import QUANT_4BIT_DTYPES, BaseWeights
    from gradience.udr.names import BaseNameIndex
    from gradience.udr.resolve import resolve_base

    weights = BaseWeights(resolve_base(base_spec))
    index = BaseNameIndex(weights.tensors)
    issues: list[Issue] = []
    rows: list[ResidualRow] = []
    skipped: list[str] = []
    for layer in layers:
        match = index.match(layer.name)
        info = None if match.tensor is None else weights.tensors[match.tensor]
        if (info is None or info.dtype in QUANT_4BIT_DTYPES or not info.is_float or layer.delta_frob_norm is None
                or math.prod(info.shape) > MAX_RESIDUAL_NUMEL or info.file in weights.file_problems):
            skipped.append(layer.name)
            continue
        assert match.tensor is not None
        w = weights.read_f32(match.tensor)
        dtype = {"BF16": "bfloat16", "F16": "float16"}.get(info.dtype, "float32")
        rows.extend(residual_rows([(layer.name, w, float(layer.delta_frob_norm))], quant_type, blocksize, dtype))
    if skipped:
        issues.append(Issue("qlora_residual_skipped",
                            f"QLoRA residual not computed for {len(skipped)} layer(s) (no 16-bit base weight of "
                            "that name, a 4-bit base, or a non-finite update)", "info", modules=skipped))
    issue = residual_issue(rows)
    if issue is not None:
        issues.append(issue)
    ratios = [r.ratio for r in rows if r.ratio is not None]
    block = {
        "base_model": base_spec, "quant_type": quant_type, "blocksize": blocksize, "double_quant": False,
        "threshold": QLORA_RESIDUAL_MAX, "n_layers": len(rows),
        "ratio_max": max(ratios) if ratios else None,
        "ratio_median": float(np.median(ratios)) if ratios else None,
        "merge_into": ("dequantized_4bit" if any(x >= QLORA_RESIDUAL_MAX for x in ratios) else "either")
        if ratios else None,
        "layers": [{"name": r.name, "residual_frob": r.residual_frob, "delta_frob": r.delta_frob, "ratio": r.ratio}
                   for r in rows],
    }
    return block, issues
