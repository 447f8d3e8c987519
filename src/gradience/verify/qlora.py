"""QLoRA merges: which base did a merge use, the 16-bit weights W₁₆ or the de-quantised 4-bit ones deq(Q(W₁₆))?

A QLoRA adapter was trained against deq(Q(W₁₆)). The correct 16-bit merge is deq(Q(W₁₆)) + s·B·A; merging into W₁₆
instead adds W₁₆ − deq(Q(W₁₆)), a residual the training never saw (unsloth-zoo PR 810: 10-150x the update on some
layers). Given a 16-bit base and an adapter trained on 4-bit (``--qlora``, or its config names a 4-bit base:
:func:`gradience.quant.residual.trained_on_4bit`), verify accumulates the merge's sums against both candidates and
names the one the merge used. deq(Q(W₁₆)) comes from :func:`gradience.quant.residual.dequantized_twin` (the
audit's residual code: bitsandbytes' quantiser, block size 64; without double quantisation, then with it when that
does not explain the merge). With a bitsandbytes 4-bit
base the checkpoint itself is read de-quantised (:mod:`gradience.quant.bnb4`) and nothing here is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.quant.bnb4 import COMPANIONS, QUANT_TYPES, STATE_PREFIX
from gradience.quant.residual import dequantized_twin, trained_on_4bit
from gradience.udr.base import QUANT_4BIT_DTYPES, BaseWeights
from gradience.verify.blocks import ArrayBlocks

# bitsandbytes' default 4-bit block size (functional.quantize_4bit, transformers' BitsAndBytesConfig): QLoRA's.
QLORA_BLOCKSIZE = 64
MERGED_INTO_16BIT = "merged_into_16bit"       # the named reason of a different_base verdict (in REASONS)
_NAMED = ("not_applied", "applied_twice", "wrong_scale")
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "bfloat16": "bfloat16", "float16": "float16"}


def qlora_mode(config: dict[str, Any], requested: str | None) -> tuple[str | None, str | None]:
    """(quant type, why) when the merge must be checked against deq(Q(W₁₆)) too; (None, None) otherwise."""
    if requested is not None:
        if requested not in QUANT_TYPES:
            raise InputError(f"--qlora: quant type '{requested}' is not one of {', '.join(QUANT_TYPES)}")
        return requested, "--qlora"
    if trained_on_4bit(config):
        return "nf4", f"the adapter config's base_model_name_or_path ({config.get('base_model_name_or_path')}) " \
                      "names a 4-bit base"
    return None, None


# Linear layers bitsandbytes leaves in 16 bits when loading in 4-bit: the output embedding (transformers'
# integrations/bitsandbytes.py get_keys_to_not_convert keeps lm_head, and tied/output embeddings, unquantised).
_KEPT_16BIT = ("lm_head", "embed_out")


def applies(base: BaseWeights, base_name: str, kind: str = "linear") -> bool:
    """A 16-bit linear weight a 4-bit load quantises (a 4-bit one is already the de-quantised base; fp32 masters
    are quantised too; embeddings, convolutions and the output head are not)."""
    info = base.tensors[base_name]
    parts = base_name.split(".")
    head = parts[-2] if len(parts) >= 2 else ""
    return (kind == "linear" and info.is_float and info.dtype not in QUANT_4BIT_DTYPES and len(info.shape) == 2
            and head not in _KEPT_16BIT and "embed" not in head)


def twin_blocks(base: BaseWeights, base_name: str, quant_type: str, double_quant: bool = False
                ) -> tuple[ArrayBlocks, float]:
    """deq(Q(W₁₆)) of one base weight as blocks, and ‖W₁₆ − deq(Q(W₁₆))‖_F (peak: two dense float32 copies, a
    few more with ``double_quant``, which quantises the whole weight at once)."""
    info = base.tensors[base_name]
    w16 = base.read_f32(base_name)
    twin = dequantized_twin(w16, quant_type, QLORA_BLOCKSIZE, _DTYPE_NAMES.get(info.dtype, "float32"),
                            double_quant=double_quant)
    flat16, flat_q = w16.reshape(-1), twin.reshape(-1)
    step = 1 << 20
    total = 0.0
    for i in range(0, flat16.shape[0], step):
        d = flat16[i:i + step].astype(np.float64) - flat_q[i:i + step]
        total += float(d @ d)
    base.release(base_name)
    return ArrayBlocks(twin, info.dtype), math.sqrt(total)


def best_twin(base: BaseWeights, base_name: str, quant_type: str,
              evaluate: Callable[[ArrayBlocks], tuple[dict[str, Any], float]]
              ) -> tuple[dict[str, Any], float, float, bool]:
    """(verdict row against deq(Q(W₁₆)), ‖D‖², ‖W₁₆ − deq(Q(W₁₆))‖, double quantisation used).

    Without double quantisation first; when that is not exact, with it (``bnb_4bit_use_double_quant=True``, the
    default of Unsloth's 4-bit models), keeping the exact or the closer one. The nested 8-bit block scales are
    reproduced to within bitsandbytes' own search (its CPU kernel's binary search sometimes picks the code one
    below the nearest: measured 1e-4 to 1.3e-3 of ‖W‖ apart on 0.04-0.2 % of the elements, against the bf16
    floor of 3.9e-3)."""
    twin, quant_residual = twin_blocks(base, base_name, quant_type)
    row, dd = evaluate(twin)
    del twin
    if row["verdict"] == "exact":
        return row, dd, quant_residual, False
    nested, nested_residual = twin_blocks(base, base_name, quant_type, double_quant=True)
    row2, dd2 = evaluate(nested)
    inf = float("inf")
    if row2["verdict"] == "exact" or (row2.get("residual") or inf) < (row.get("residual") or inf):
        return row2, dd2, nested_residual, True
    return row, dd, quant_residual, False


def combine(on_twin: dict[str, Any], on_16: dict[str, Any], quant_residual: float, norm_d: float,
            quant_type: str, double_quant: bool = False) -> dict[str, Any]:
    """One row's verdict from the two candidate bases; the numbers of both stay in ``row["qlora"]``."""
    rho = quant_residual / norm_d if norm_d > 0 else None
    info: dict[str, Any] = {
        "quant_type": quant_type, "blocksize": QLORA_BLOCKSIZE, "double_quant": double_quant,
        "quantization_residual": rho,
        "verdict_vs_dequantized_4bit": on_twin["verdict"], "residual_vs_dequantized_4bit": on_twin.get("residual"),
        "verdict_vs_16bit": on_16["verdict"], "residual_vs_16bit": on_16.get("residual")}
    if on_twin["verdict"] == "exact":
        both = on_16["verdict"] == "exact"
        info["merged_into"] = "either" if both else "dequantized_4bit"
        out = dict(on_twin)
        out["detail"] = ("merged into the de-quantised 4-bit weights deq(Q(W16)), the base the adapter was trained "
                         "on: " + on_twin["detail"] + (" (the quantisation residual is below rounding here: "
                                                       "either base gives this merge)" if both else ""))
    elif on_16["verdict"] == "exact":
        info["merged_into"] = "16bit"
        out = dict(on_twin)
        out["verdict"] = "different_base"
        out["reason"] = MERGED_INTO_16BIT
        out["detail"] = (f"merged into the 16-bit weights; the adapter was trained against the de-quantized 4-bit "
                         f"ones: residual {on_twin.get('residual') or 0.0:.3g} times the update (W16 - "
                         f"deq(Q(W16)) = {rho or 0.0:.3g}x). Merge into deq(Q(W16)) ({quant_type}, block "
                         f"{QLORA_BLOCKSIZE}) or serve the adapter unmerged on the 4-bit base (unsloth-zoo PR 810)")
    elif on_16["verdict"] in _NAMED and on_twin["verdict"] not in _NAMED:
        info["merged_into"] = "16bit"
        out = dict(on_16)
        out["detail"] = "against the 16-bit weights (themselves the wrong base for a QLoRA adapter): " + on_16["detail"]
    else:
        info["merged_into"] = "dequantized_4bit" if on_twin["verdict"] in _NAMED else None
        out = dict(on_twin)
    out["qlora"] = info
    return out


def untouched_is_twin(base: BaseWeights, merged: BaseWeights, name: str, quant_type: str, u: float) -> bool:
    """A weight no adapter module adapts, stored in the merged checkpoint as deq(Q(W₁₆)) within rounding (a merge
    done from the 4-bit model writes every quantised linear layer de-quantised)."""
    from gradience.verify.blocks import TensorBlocks, close_within

    return any(close_within(twin_blocks(base, name, quant_type, double_quant)[0], TensorBlocks(merged, name), u)
               for double_quant in (False, True))


def companions(base: BaseWeights) -> set[str]:
    """The quant-state tensors of a bitsandbytes 4-bit base (absmax, quant_map, ...): not weights a merge keeps."""
    out: set[str] = set()
    for name, info in base.tensors.items():
        if info.dtype in QUANT_4BIT_DTYPES:
            out.update(f"{name}.{role}" for role in COMPANIONS)
            out.update(f"{name}.{STATE_PREFIX}{q}" for q in QUANT_TYPES)
    return out & set(base.tensors)


def document_parts(rows: list[dict[str, Any]], quant_type: str | None, why: str | None, base: BaseWeights
                   ) -> tuple[dict[str, Any] | None, list[Issue]]:
    """The document's ``qlora`` block and its issue (modules merged into the 16-bit weights)."""
    four_bit = sorted({i.dtype for i in base.tensors.values() if i.dtype in QUANT_4BIT_DTYPES})
    if quant_type is None and not four_bit:
        return None, []
    counts: dict[str, int] = {}
    for row in rows:
        key = str((row.get("qlora") or {}).get("merged_into"))
        counts[key] = counts.get(key, 0) + 1
    block: dict[str, Any] = {"base_4bit": four_bit or None, "checked_against_dequantized_16bit": quant_type,
                             "why": why if not four_bit else "the base is stored in bitsandbytes 4-bit: the merge "
                                                            "is checked against its de-quantised weights",
                             "blocksize": QLORA_BLOCKSIZE,
                             "double_quant": "tried without, then with (per module: modules[].qlora.double_quant)",
                             "merged_into": counts if quant_type and not four_bit else None}
    bad = [r["name"] for r in rows if r.get("reason") == MERGED_INTO_16BIT]
    issues = []
    if bad:
        worst = max((r for r in rows if r.get("reason") == MERGED_INTO_16BIT),
                    key=lambda r: r.get("residual") or 0.0)
        issues.append(Issue(MERGED_INTO_16BIT,
                            f"{len(bad)} of {len(rows)} module(s) of a QLoRA adapter were merged into the 16-bit "
                            f"weights instead of the de-quantised 4-bit ones it was trained on (worst residual "
                            f"{worst.get('residual') or 0.0:.3g}x the update on {worst['name']}): merge into "
                            "deq(Q(W16)) or serve unmerged on the 4-bit base (unsloth-zoo PR 810)", "error",
                            modules=bad))
    return block, issues
