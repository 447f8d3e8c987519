"""The merged adapter's tensors (produced lazily, one module at a time), its portability verdict, the write.

Keys and stored layout of each module are those of the first input that has it (PEFT's names, transposed
fan_in_fan_out pairs and conv 4-D shapes as that input stored them), so every engine that loaded the inputs
finds the module where it expects it. The writer is compress's (:mod:`gradience.compress.writer`: staging
directory beside OUT, swapped in atomically when complete).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter
from gradience.errors import InputError
from gradience.io.safetensors_write import TensorSpec
from gradience.merge.result import DTYPE_CHOICES, REPORT_NAME, MergeOptions, MergeResult, ModulePlan

_STORED = {"F32": "F32", "BF16": "BF16", "F16": "F16", "F64": "F64"}


def _stored_dtypes(loaded: Sequence[LoadedAdapter]) -> list[dict[str, str]]:
    """Each input's stored dtype per tensor key (headers only)."""
    from gradience.adapter.loader import open_weights

    out = []
    for one in loaded:
        metas = open_weights(Path(one.adapter_weights_path or "")).metas()
        out.append({key: meta.dtype for key, meta in metas.items()})
    return out


def tensor_specs(loaded: Sequence[LoadedAdapter], plans: Sequence[ModulePlan], weights: Sequence[float],
                 options: MergeOptions, alpha: float) -> tuple[list[TensorSpec], dict[str, int]]:
    """(specs, dtype counts): A then B of every module, in the modules' order; factors computed on demand."""
    from gradience.compress.tensors import _factor_layout, _factor_shapes  # compress's layout rules (private)
    from gradience.io.safetensors_write import encode_float
    from gradience.merge.core import new_factors

    stored = _stored_dtypes(loaded)
    forced = DTYPE_CHOICES[options.dtype]
    pending: dict[str, dict[str, np.ndarray]] = {}

    def produce(plan: ModulePlan, side: str, dtype: str) -> np.ndarray:
        name = plan.group.name
        slot = pending.get(name)
        if slot is None:
            a_new, b_new = new_factors(plan, weights, options, alpha)
            a_st, b_st = _factor_layout(plan.group.template, a_new, b_new, plan.r_after)
            try:
                slot = pending[name] = {"A": encode_float(a_st, dtype), "B": encode_float(b_st, dtype)}
            except ValueError as exc:
                raise InputError(f"module {name}: {exc}; choose another --dtype") from None
        out = slot.pop(side)
        if not slot:
            del pending[name]
        return out

    specs: list[TensorSpec] = []
    dtypes: Counter[str] = Counter()
    for plan in plans:
        tpl = plan.group.template
        src = next(i for i, p in enumerate(plan.group.pairs) if p is not None)
        raw = stored[src].get(tpl.a_key, "F32")
        dtype = forced or _STORED.get(raw, "F32")
        a_shape, b_shape = _factor_shapes(tpl, plan.r_after)
        for key, side, shape in ((tpl.a_key, "A", a_shape), (tpl.b_key, "B", b_shape)):
            specs.append(TensorSpec(key, dtype, shape, partial(produce, plan, side, dtype)))
            dtypes[dtype] += 1
    return specs, dict(dtypes)


def portability_of(plans: Sequence[ModulePlan], config: dict[str, Any]) -> dict[str, Any]:
    """The one engine table's verdict (:mod:`gradience.engines`) for the adapter merge writes."""
    from gradience.engines import evaluate, facts_from_config

    facts = facts_from_config(config, [p.r_after for p in plans], kinds=sorted({p.group.kind for p in plans}),
                              dora=False)
    return evaluate(facts)


def write(out_dir: Any, specs: Sequence[TensorSpec], config: dict[str, Any], result: MergeResult) -> None:
    """Stream the tensors, then config and merge.json (written after the weights: the measured errors of
    ties/dare are filled in while the factors are produced)."""
    from gradience.compress.writer import write_peft_adapter

    def written() -> None:
        result.written = True

    metadata = {"format": "pt", "gradience_merge_method": result.options.method,
                "gradience_merge_inputs": json.dumps([i["sha256"] for i in result.inputs])}
    try:
        write_peft_adapter(out_dir, specs, config, report=result.to_dict, report_name=REPORT_NAME,
                           metadata=metadata, on_weights_written=written)
    except BaseException:
        result.written = False
        raise
