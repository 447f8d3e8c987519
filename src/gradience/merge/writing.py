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


class Encoder:
    """Output dtype of every module (``--dtype``, else the stored dtype of the first input that has the module)
    and the encoding of its factors into the stored layout (compress's layout rules)."""

    def __init__(self, loaded: Sequence[LoadedAdapter], options: MergeOptions) -> None:
        from gradience.adapter.loader import open_weights

        self.stored = [{key: meta.dtype for key, meta in open_weights(Path(one.adapter_weights_path or "")).metas()
                        .items()} for one in loaded]
        self.forced = DTYPE_CHOICES[options.dtype]

    def dtype(self, plan: ModulePlan) -> str:
        src = next(i for i, p in enumerate(plan.group.pairs) if p is not None)
        return self.forced or _STORED.get(self.stored[src].get(plan.group.template.a_key, "F32"), "F32")

    def encode(self, plan: ModulePlan, a_new: np.ndarray, b_new: np.ndarray) -> dict[str, np.ndarray]:
        from gradience.compress.tensors import factor_layout  # compress's layout rules
        from gradience.io.safetensors_write import encode_float

        dtype = self.dtype(plan)
        a_st, b_st = factor_layout(plan.group.template, a_new, b_new, plan.r_after)
        try:
            return {"A": encode_float(a_st, dtype), "B": encode_float(b_st, dtype)}
        except ValueError as exc:
            raise InputError(f"module {plan.group.name}: {exc}; choose another --dtype") from None

    def __call__(self, plan: ModulePlan, a_new: np.ndarray, b_new: np.ndarray) -> None:
        """Keep the encoded factors on the plan until the writer reaches them (phase-1 factors)."""
        plan.ready = self.encode(plan, a_new, b_new)


def tensor_specs(encoder: Encoder, plans: Sequence[ModulePlan], weights: Sequence[float],
                 options: MergeOptions, alpha: float) -> tuple[list[TensorSpec], dict[str, int]]:
    """(specs, dtype counts): A then B of every module, in the modules' order; factors made in phase 1 are
    handed over (and dropped), the others computed when the writer reaches them."""
    from gradience.compress.tensors import factor_shapes  # compress's layout rules
    from gradience.merge.core import new_factors

    def produce(plan: ModulePlan, side: str) -> np.ndarray:
        if plan.ready is None:
            plan.ready = encoder.encode(plan, *new_factors(plan, weights, options, alpha))
        out = plan.ready.pop(side)
        if not plan.ready:
            plan.ready = None
        return out

    def produce_stack(group: list[ModulePlan], side: str) -> np.ndarray:
        first = group[0]
        if first.ready is None:
            from gradience.compress.experts import join_stack
            from gradience.io.safetensors_write import encode_float

            parts = [new_factors(p, weights, options, alpha) for p in group]
            a_st, b_st = join_stack(parts, first.r_after)
            dtype = encoder.dtype(first)
            try:
                first.ready = {"A": encode_float(a_st, dtype), "B": encode_float(b_st, dtype)}
            except ValueError as exc:
                raise InputError(f"parameter {first.group.name.rpartition('[')[0]}: {exc}; choose another "
                                 "--dtype") from None
        out = first.ready.pop(side)
        if not first.ready:
            first.ready = None
        return out

    stacks: dict[str, list[ModulePlan]] = {}
    for plan in plans:
        if plan.group.template.expert is not None:
            stacks.setdefault(plan.group.template.a_key, []).append(plan)
    for group in stacks.values():
        group.sort(key=lambda p: p.group.template.expert or 0)

    specs: list[TensorSpec] = []
    dtypes: Counter[str] = Counter()
    for plan in plans:
        tpl = plan.group.template
        if tpl.expert is not None:  # one stacked A/B per parameter: (K·E, in) / (out, K·E), PEFT's layout
            group = stacks[tpl.a_key]
            if plan is not group[0]:
                continue
            dtype = encoder.dtype(plan)
            k_all = plan.r_after * len(group)
            for key, side, stack_shape in ((tpl.a_key, "A", (k_all, tpl.d_in)), (tpl.b_key, "B", (tpl.d_out, k_all))):
                specs.append(TensorSpec(key, dtype, stack_shape, partial(produce_stack, group, side)))
                dtypes[dtype] += 1
            continue
        dtype = encoder.dtype(plan)
        a_shape, b_shape = factor_shapes(tpl, plan.r_after)
        for key, side, shape in ((tpl.a_key, "A", a_shape), (tpl.b_key, "B", b_shape)):
            specs.append(TensorSpec(key, dtype, shape, partial(produce, plan, side)))
            dtypes[dtype] += 1
    return specs, dict(dtypes)


def portability_of(plans: Sequence[ModulePlan], config: dict[str, Any]) -> dict[str, Any]:
    """The one engine table's verdict (:mod:`gradience.engines`) for the adapter merge writes."""
    from gradience.compress.experts import parameter_name
    from gradience.engines import evaluate, facts_from_config

    facts = facts_from_config(config, [p.r_after for p in plans], kinds=sorted({p.group.kind for p in plans}),
                              dora=False, expert_parameters=[parameter_name(p.group.template) for p in plans
                                                             if p.group.template.expert is not None],
                              expert_shapes=[(parameter_name(p.group.template), p.group.d_in, p.group.d_out)
                                             for p in plans if p.group.template.expert is not None])
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
