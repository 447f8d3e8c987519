"""``merge`` as a library: validate the inputs, measure every module, decide ranks, stream the merged adapter.

Data flow: the adapter readers (headers only) → per module, the inputs' factors are read once and stacked:
their float64 Grams give σ of the weighted sum and the interference diagnostics (``ties``/``dare``: the dense
element-wise merge of that one module and its spectrum) → the policy decides k per module → the writer
streams the new factors module by module (factors re-read; ``ties``/``dare`` recompute their module) into a
staging directory that replaces OUT when complete. Nothing here prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.adapter.experts import target_parameters
from gradience.adapter.model import LoadedAdapter
from gradience.compress.budget import retained
from gradience.compress.experts import assumed_modules, joint_ranks, stack_unit
from gradience.compress.policy import validate
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.merge import elementwise, factored
from gradience.merge.inputs import ModuleGroup, output_config, parse_weights, validate_inputs
from gradience.merge.ranks import RankInput, decide
from gradience.merge.result import (
    DTYPE_CHOICES,
    METHODS,
    REPORT_NAME,
    MergeOptions,
    MergeResult,
    ModulePlan,
)

_STORED = {"F32": "F32", "BF16": "BF16", "F16": "F16", "F64": "F64"}


def _check_options(options: MergeOptions) -> None:
    if options.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {options.method!r}")
    if options.dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {options.dtype!r}")
    if options.policy is not None:
        if options.method == "cat":
            raise InputError("--method cat writes the exact sum at rank sum(r_i); a truncation policy needs "
                             "--method linear or svd")
        validate(options.policy)
    if not 0.0 < options.density <= 1.0:
        raise InputError(f"--density must be a fraction in (0, 1], got {options.density}")
    if not 0.0 <= options.drop_rate < 1.0:
        raise InputError(f"--drop-rate must be in [0, 1), got {options.drop_rate}")


def _has_stacks(groups: Sequence[ModuleGroup]) -> bool:
    """True when the inputs hold MoE expert stacks (PEFT target_parameters). Every expert is merged as its own module: ΔW_e of the output is the weighted sum of the inputs'
    ΔW_e (``cat``/``linear``), its best rank-K approximation (``svd``), or TIES/DARE of the ΔW_e (trim threshold,
    sign election and drop mask per expert: each expert is its own task-vector matrix), re-factored at rank K,
    the largest rank the policy asks of any expert of the stack (PEFT keeps one r per stacked parameter,
    :mod:`gradience.compress.experts`); ``--budget`` allocates one rank per stack, as compress does."""
    return any(g.template.expert is not None for g in groups)


def _load_stack(group: ModuleGroup, weights: Sequence[float]) -> factored.Stack:
    parts = []
    for i, pair in enumerate(group.pairs):
        if pair is None:
            continue
        a, b = pair.load_factors()
        parts.append((i, a, b, weights[i], pair.scale))
    try:
        return factored.stack(group.name, parts)
    finally:
        for pair in group.pairs:
            if pair is not None:
                pair.release()


def _elementwise(st: factored.Stack, group: ModuleGroup, options: MergeOptions
                 ) -> tuple[elementwise.Slabs, elementwise.Elementwise]:
    slabs = elementwise.Slabs(group.d_out, group.d_in)
    ew = elementwise.prepare(st, group.name, slabs, options.method, density=options.density,
                             drop=options.drop_rate, seed=options.seed)
    return slabs, ew


@dataclass
class Eager:
    """Per-module policies (everything but ``--budget`` and ``--uniform``) decide k from the module alone, so its
    factors are made while its stack is in memory: one read of every input instead of two."""

    alpha: float
    encode: Callable[[ModulePlan, np.ndarray, np.ndarray], None] | None   # None: dry run, factors not kept


def _measure(group: ModuleGroup, weights: Sequence[float], options: MergeOptions,
             eager: Eager | None) -> tuple[ModulePlan, RankInput]:
    """Phase 1 for one module: spectrum of what will be truncated, interference, default rank (and, eagerly,
    the factors)."""
    st = _load_stack(group, weights)
    spec = factored.stack_spectrum(st)
    plan = ModulePlan(group=group, r_after=0, cap=st.rank, interference=factored.pairwise_interference(st, spec))
    plan.cancelled = spec.cancelled
    default = max(p.r for p in group.pairs if p is not None)
    gram: np.ndarray | None = None
    if options.method in ("ties", "dare"):
        slabs, ew = _elementwise(st, group, options)
        stats = elementwise.SlabStats()
        if options.policy is not None and options.policy.name != "rank":
            # σ-based policies need M's whole spectrum: the short side's Gram and its eigenvalues.
            gram = elementwise.merged_gram(st, slabs, ew, stats)
            plan.sigma = elementwise.spectrum_of_gram(gram)
            plan.fro2 = float(np.trace(gram))
            if eager is None:
                gram = None
        else:  # a fixed rank: ‖M‖_F² is all the accounting needs; the top-k directions come later
            plan.fro2 = elementwise.frobenius2(st, slabs, ew, stats)
        plan.cap = min(group.d_out, group.d_in)
        plan.cancelled = plan.cancelled or plan.fro2 <= 0.0
        numel = group.d_out * group.d_in
        plan.sign_conflict_rate = None if stats.multi == 0 else stats.conflicts / stats.multi
        plan.kept_fraction = [c / numel for c in (stats.kept or [])]
    else:
        plan.sigma, plan.grams = spec.sigma, spec
        if options.method == "cat" or (options.method == "linear" and options.policy is None):
            default = st.rank
    sigma = plan.sigma if plan.sigma is not None else np.zeros(0)
    ri = RankInput(sigma, plan.cap, min(default, plan.cap), group.d_in + group.d_out)
    if eager is not None:
        plan.r_after = decide([ri], options.policy, 0)[0][0]
        a_new, b_new = _make_factors(plan, st, options, eager.alpha, gram)
        del gram
        if eager.encode is not None:
            eager.encode(plan, a_new, b_new)
        plan.grams = None
    return plan, ri


def _energy(plan: ModulePlan, method: str) -> None:
    k = plan.r_after
    if method == "cat":
        plan.energy_retained, plan.rel_frob_error = 1.0, 0.0
        return
    if plan.sigma is None:  # ties/dare at a fixed rank: measured from the top-k directions when they are made
        return
    energy = min(1.0, retained(plan.sigma, k))
    plan.energy_retained = energy
    if method in ("linear", "svd"):  # Eckart–Young: the residual is orthogonal to the kept part
        plan.rel_frob_error = math.sqrt(max(0.0, 1.0 - energy))


def _make_factors(plan: ModulePlan, st: factored.Stack, options: MergeOptions, alpha: float,
                  gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The module's output factors (A' (k, d_in), B' (d_out, k)), float64, (α/k)·B'A' = the merge.
    ``gram``: ties/dare's Gram of M when phase 1 already holds it."""
    group, k = plan.group, plan.r_after
    if options.method in ("ties", "dare"):
        slabs, ew = _elementwise(st, group, options)
        top = elementwise.top_k(st, slabs, ew, k, gram)
        gram = None
        a_new, b_new, err, ref = elementwise.factors(st, slabs, ew, top.sigma, top.vectors, k, alpha)
        plan.rel_frob_error = err / ref if ref > 0.0 else (0.0 if err == 0.0 else None)
        plan.factor_method = top.method
        plan.subspace = {"iterations": top.iterations, "converged": top.converged} if top.method == "subspace" \
            else None
        if plan.sigma is None and plan.fro2 is not None:
            plan.energy_retained = (min(1.0, float(np.sum(top.sigma ** 2)) / plan.fro2) if plan.fro2 > 0.0
                                    else 1.0)
        return a_new, b_new
    if k >= st.rank:
        a_new, b_new = factored.cat_factors(st, alpha, k)
        plan.factor_method = "cat"
        return a_new, b_new
    grams = plan.grams if plan.grams is not None else factored.stack_spectrum(st)
    a_new, b_new, how = factored.svd_factors(st, grams, k, alpha)
    plan.factor_method = how
    return a_new, b_new


def new_factors(plan: ModulePlan, weights: Sequence[float], options: MergeOptions,
                alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Phase 2 (``--budget`` / ``--uniform``): read the module again and make its factors."""
    return _make_factors(plan, _load_stack(plan.group, weights), options, alpha)


def _duplicates(loaded: Sequence[LoadedAdapter], shas: Sequence[str], explicit_weights: bool) -> list[Issue]:
    """The same adapter given twice (same weights file bytes and same per-module scales) adds its update twice:
    refused unless --weights says how much of each copy is meant (then a warning)."""
    seen: dict[tuple[str, tuple[float, ...]], int] = {}
    issues: list[Issue] = []
    for i, (one, sha) in enumerate(zip(loaded, shas, strict=True)):
        key = (sha, tuple(p.scale for p in one.pairs))
        first = seen.setdefault(key, i)
        if first == i:
            continue
        same = f"adapters {first + 1} and {i + 1} are the same adapter (weights sha256 {sha[:12]}, same scales)"
        if not explicit_weights:
            raise InputError(f"{same}: merging it with itself adds its update twice (2x ΔW, not a merge of two "
                             "tasks); pass a different adapter, or --weights if a scaled copy is what you want",
                             one.adapter_weights_path or one.peft_dir)
        issues.append(Issue("duplicate_input", f"{same}: merged with the --weights given (their weights add up)",
                            "warning"))
    return issues


def _inputs_doc(loaded: Sequence[LoadedAdapter], weights: Sequence[float],
                shas: Sequence[str]) -> list[dict[str, Any]]:
    return [{"path": one.peft_dir, "adapter_name": one.adapter_name, "weights_path": one.adapter_weights_path,
             "sha256": sha, "weight": w, "r": one.config.get("r"),
             "lora_alpha": one.config.get("lora_alpha"), "use_rslora": bool(one.config.get("use_rslora", False)),
             "base_model_name_or_path": one.config.get("base_model_name_or_path"), "n_modules": len(one.pairs)}
            for one, w, sha in zip(loaded, weights, shas, strict=True)]


def _issues(plans: Sequence[ModulePlan], notes: Sequence[str], n_inputs: int) -> list[Issue]:
    issues = [Issue("forced", note, "warning") for note in notes]
    partial = [p.group.name for p in plans if p.group.partial]
    if partial:
        issues.append(Issue("partial_modules", f"{len(partial)} module(s) are in only some of the {n_inputs} "
                                               "adapters: merged with a zero update for the others",
                            "info", modules=partial))
    zero = [p.group.name for p in plans if p.cancelled or (p.sigma is not None and (not p.sigma.size or p.sigma[0] <= 0.0))]
    stalled = [p.group.name for p in plans if p.subspace is not None and not p.subspace["converged"]]
    if stalled:
        issues.append(Issue("subspace_not_converged", f"{len(stalled)} module(s): the top-k directions of the "
                                                      "element-wise merge did not converge within the iteration "
                                                      "bound; their retained energy is what was reached",
                            "warning", modules=stalled))
    if zero:
        issues.append(Issue("zero_update", f"{len(zero)} merged module(s) are exactly zero (the weighted updates "
                                           "cancel or are zero)", "warning", modules=zero))
    return issues


def merge(loaded: Sequence[LoadedAdapter], out: str | os.PathLike[str] | None,
          options: MergeOptions) -> MergeResult:
    """Merge ``loaded`` adapters into ``out`` (a PEFT adapter + ``merge.json``); ``out=None`` / dry run: plan only."""
    from gradience.compress.writer import check_adapter_out

    _check_options(options)
    inp = validate_inputs(loaded, force=options.force)
    weights = parse_weights(options.weights, len(loaded))
    from gradience.compress.tensors import source_sha256

    shas = [source_sha256(one) for one in loaded]
    duplicate_issues = _duplicates(loaded, shas, options.weights is not None)
    out_dir = None
    if out is not None:
        sources = [p for one in loaded for p in (one.peft_dir, one.adapter_weights_path, one.adapter_config_path)
                   if p]
        out_dir = check_adapter_out(out, sources, options.force, report_name=REPORT_NAME,
                                    clean=not options.dry_run)
    from gradience.merge.writing import Encoder, portability_of, tensor_specs, write

    stacks = _has_stacks(inp.groups)
    # expert stacks share one rank, decided after every expert is measured: their factors are made in phase 2
    per_module = not stacks and (options.policy is None or (options.policy.name != "budget"
                                                             and not options.policy.uniform))
    encoder = Encoder(loaded, options)
    eager = Eager(inp.alpha, None if options.dry_run or out_dir is None else encoder) if per_module else None
    try:
        measured = [_measure(g, weights, options, eager) for g in inp.groups]
    except factored.NonFiniteFactors as exc:  # the one-line error names the adapter file that holds them
        one = loaded[exc.input_index]
        raise InputError(exc.problem, one.adapter_weights_path or one.peft_dir) from None
    plans = [m[0] for m in measured]
    params_sum = sum(g.summed_rank * (g.d_in + g.d_out) for g in inp.groups)
    assumed: set[str] = set().union(*(assumed_modules(one) for one in loaded))
    ks, extra = decide([m[1] for m in measured], options.policy, params_sum,
                       [stack_unit(g.template, assumed) for g in inp.groups] if stacks else None)
    if stacks:
        ks = joint_ranks([g.template for g in inp.groups], ks, assumed)
    for plan, k in zip(plans, ks, strict=True):
        plan.r_after = k
        _energy(plan, options.method)
    targets = list(dict.fromkeys(t for one in loaded for t in target_parameters(one.config)))
    config = output_config(loaded[0].config, inp.groups, ks, inp.alpha, inp.base_model, assumed=assumed,
                           target_parameters=targets)
    result = MergeResult(options=options, inputs=_inputs_doc(loaded, weights, shas), modules=plans,
                         out_config=config, out_dir=None if out is None else os.fspath(out),
                         issues=duplicate_issues + _issues(plans, inp.notes, len(loaded)), policy_extra=extra)
    specs, dtypes = tensor_specs(encoder, plans, weights, options, inp.alpha)
    result.dtype_out = dtypes
    result.portability = portability_of(plans, config)
    if options.dry_run or out_dir is None:
        if options.method in ("ties", "dare") and eager is None:
            for plan in plans:
                plan.rel_frob_error = None  # measured when the factors are made, at write time
        return result
    write(out_dir, specs, config, result)
    return result


__all__ = ["MergeOptions", "MergeResult", "merge", "new_factors"]
