"""``compress`` planning: refuse what cannot be compressed faithfully, then choose k per module (SPEC §12).

The audit's exact spectra (one read of every pair) feed the policy; the result is a list of
:class:`~gradience.compress.result.LayerPlan` and the output ``adapter_config.json``. Nothing is written here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.audit.core import LayerAudit, audit_pairs, layer_issues
from gradience.audit.suggest import per_layer_suggestions, unique_pattern_key
from gradience.compress.budget import BudgetLayer, allocate, parse_budget, retained
from gradience.compress.experts import (
    assumed_modules,
    budget_items,
    expert_row,
    joint_ranks,
    parameter_name,
    stacked_groups,
)
from gradience.compress.experts import rank_pattern as expert_rank_pattern
from gradience.compress.policy import (
    Policy,
    apply_modifiers,
    budget_candidates,
    raw_rank,
    uniform_budget_rank,
    validate,
)
from gradience.compress.result import DTYPE_CHOICES, CompressOptions, LayerPlan
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import ALLOWED_RANKS_DEFAULT

# init_lora_weights values whose saved factors are not a delta (SPEC §2), used when the adapter package does
# not provide mutated_base_init (the DoRA/mutated-base work adds it to gradience.adapter.config).
_MUTATED_PREFIXES = ("pissa", "olora", "corda", "loftq", "lora_ga")
_BROKEN_INPUT_CODES = ("unpaired_factor", "shape_mismatch", "unsupported_dtype")


def mutated_init(config: dict[str, Any]) -> str | None:
    """The mutated-base ``init_lora_weights`` value of ``config`` (pissa*, olora, corda, loftq, lora_ga), or None.

    Uses the adapter package's ``mutated_base_init`` (the audit's rule) when present.
    """
    from gradience.adapter import config as adapter_config

    rule = getattr(adapter_config, "mutated_base_init", None)
    if rule is not None:
        found: str | None = rule(config)
        return found
    value = config.get("init_lora_weights")
    if isinstance(value, str) and value.strip().lower().startswith(_MUTATED_PREFIXES):
        return value
    return None


def _output_alpha(loaded: LoadedAdapter) -> float:
    where = loaded.adapter_config_path or loaded.adapter_weights_path
    if not loaded.config:
        raise InputError("compress needs the adapter's adapter_config.json (the output config is derived from it)",
                         where)
    alpha = loaded.config.get("lora_alpha")
    try:
        number = None if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) else float(alpha)
    except OverflowError:  # an integer beyond float's range (a 400-digit lora_alpha)
        number = None
    if number is None or not math.isfinite(number) or number == 0:
        shown = (f"an integer of ~{int(alpha.bit_length() * 0.30103) + 1} digits"
                 if isinstance(alpha, int) and not isinstance(alpha, bool) and abs(alpha) >= 10**30 else repr(alpha))
        raise InputError(f"lora_alpha is {shown}: compress needs a finite, non-zero lora_alpha to know each "
                         "module's scale", where)
    return number


def preflight(loaded: LoadedAdapter) -> float:
    """Refuse inputs compress cannot turn into a faithful adapter; returns the output's lora_alpha."""
    where = loaded.adapter_config_path or loaded.adapter_weights_path
    mutated = mutated_init(loaded.config)
    if mutated is not None:
        raise InputError(f"init_lora_weights is {mutated!r}: the saved factors hold principal components of the "
                         "base model, not a delta (s·B·A is not the update), so truncating them would change the "
                         "base; convert the adapter with PEFT's path_initial_model_for_weight_conversion first",
                         where)
    # PEFT stores A as (r, d_in) and B as (d_out, r); shapes that only fit transposed are either another
    # layout or a mismatched pair (A (4, 16) with B (16, 8) "fits" as r=16 on 4x8): either way the output
    # would be an adapter PEFT cannot load (issue 17), so compress refuses rather than guessing.
    transposed = [i for i in loaded.issues if i.code == "transposed_factors"]
    if transposed:
        mods = transposed[0].modules or []
        raise InputError(f"{len(mods) or 'some'} module(s) ({', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''}) "
                         "have lora_A/lora_B shapes that do not form a PEFT pair (A (r, d_in), B (d_out, r) with "
                         "one r); they fit only transposed or mismatched, so compress would write an adapter "
                         "PEFT cannot load", loaded.adapter_weights_path)
    broken = [i for i in loaded.issues if i.code in _BROKEN_INPUT_CODES]
    if broken:
        raise InputError("cannot write a loadable adapter from this one: " + "; ".join(i.message for i in broken),
                         loaded.adapter_weights_path)
    return _output_alpha(loaded)


# -- planning ----------------------------------------------------------------------------------------------
def _layer_ranks(audits: list[LayerAudit], policy: Policy, use_rslora: bool, pairs: list[LoraPair],
                 assumed: set[str]) -> tuple[list[int], dict[str, Any]]:
    """k per layer after the policy and its modifiers (before --uniform and before the experts of a stacked MoE
    parameter share one rank, :mod:`gradience.compress.experts`); extra policy facts for the report."""
    extra: dict[str, Any] = {}
    finite = [la.singular_values is not None for la in audits]
    if policy.name == "per_layer":
        allowed = policy.allowed_ranks or ALLOWED_RANKS_DEFAULT
        rows = per_layer_suggestions(audits, allowed, policy.margin, use_rslora)["layers"]
        ks = [apply_modifiers(int(row["suggested_r"]), la.r, policy, round_to=None)
              for row, la in zip(rows, audits, strict=True)]
        return ks, extra
    if policy.name == "budget":
        before = sum(la.params for la in audits)
        budget = parse_budget(str(policy.value), before)
        extra["budget_params"] = budget
        if policy.uniform:
            return _uniform_budget(audits, budget, policy), extra
        if any(p.expert is not None for p in pairs):  # stacked MoE parameters are one item each
            blayers, members = budget_items(pairs, [la.singular_values for la in audits],
                                            lambda r: budget_candidates(r, policy), assumed)
        else:
            blayers = [BudgetLayer(sigma=la.singular_values if la.singular_values is not None else np.zeros(la.r),
                                   cost=la.d_in + la.d_out,
                                   candidates=budget_candidates(la.r, policy) if ok else (la.r,))
                       for la, ok in zip(audits, finite, strict=True)]
            members = [[i] for i in range(len(audits))]
        res = allocate(blayers, budget)
        extra.update({"budget_params_used": res.params, "objective": res.objective,
                      "objective_upper_bound": res.upper_bound, "greedy_optimal_at_params": res.prefix_params})
        ranks = [0] * len(audits)
        for idx, k in zip(members, res.ranks, strict=True):
            for i in idx:
                ranks[i] = k
        return ranks, extra
    ks = []
    for la, ok in zip(audits, finite, strict=True):
        if not ok:
            ks.append(la.r)  # non-finite factors: nothing to judge, kept as they are
            continue
        assert la.singular_values is not None
        k = raw_rank(policy, la.singular_values, la.r)
        ks.append(apply_modifiers(k, la.r, policy, round_to=policy.allowed_ranks))
    return ks, extra


def _uniform_budget(audits: list[LayerAudit], budget: int, policy: Policy) -> list[int]:
    """--budget --uniform: the largest single rank K (every module zero-padded to K) that fits the budget."""
    k = uniform_budget_rank([la.d_in + la.d_out for la in audits], [la.r for la in audits], budget, policy)
    return [k] * len(audits)


def _errors(sigma: np.ndarray | None, k: int) -> tuple[float | None, float | None, float | None]:
    if sigma is None:
        return None, None, None
    s1 = float(sigma[0]) if sigma.size else 0.0
    if s1 <= 0.0:
        return 1.0, 0.0, 0.0
    energy = min(1.0, retained(sigma, k))
    spectral = float(sigma[k]) / s1 if k < sigma.size else 0.0
    return energy, math.sqrt(max(0.0, 1.0 - energy)), spectral


def _default_rank(ranks: list[int]) -> int:
    counts = Counter(ranks)
    top = max(counts.values())
    return max(r for r, c in counts.items() if c == top)  # ties: the larger rank (as the audit's default_r)


def _unit_ranks(pairs: list[LoraPair], ks: list[int]) -> list[int]:
    """One rank per PEFT module or stacked MoE parameter (its experts share one r), for the default r."""
    first = {idx[0] for idx in stacked_groups(pairs).values()}
    return [k for i, (p, k) in enumerate(zip(pairs, ks, strict=True)) if p.expert is None or i in first]


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def plan(loaded: LoadedAdapter, options: CompressOptions) -> tuple[list[LayerPlan], dict[str, Any], list[Issue],
                                                                    dict[str, Any]]:
    """(layer plans, output config, issues, policy facts) without writing anything."""
    policy = options.policy
    validate(policy)
    if options.dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {options.dtype!r}")
    alpha = preflight(loaded)
    try:
        audits = audit_pairs(loaded.pairs)
    except np.linalg.LinAlgError as exc:
        raise InputError(f"the spectrum of a module could not be computed ({exc}): the factors hold extreme "
                         "values or changed while being read", loaded.adapter_weights_path) from None
    use_rslora = bool(loaded.config.get("use_rslora", False))
    assumed = assumed_modules(loaded)
    ks, extra = _layer_ranks(audits, policy, use_rslora, loaded.pairs, assumed)
    ks = joint_ranks(loaded.pairs, ks, assumed)  # one K per stacked MoE parameter (PEFT's layout)
    if policy.uniform:
        top = max(ks)
        ks = [top] * len(ks)
        extra["uniform_rank"] = top

    layers: list[LayerPlan] = []
    for pair, la, k in zip(loaded.pairs, audits, ks, strict=True):
        if k < pair.r:
            action = "truncated"
        elif k == pair.r:
            action = "kept"
        else:
            action = "padded"
        sigma = la.singular_values
        if action == "truncated" and sigma is not None and sigma[0] <= 0.0:
            action_note = {"zero_update": True}
        else:
            action_note = {}
        energy, frob, spectral = _errors(sigma, min(k, pair.r))
        layers.append(LayerPlan(
            name=pair.name, peft_prefix=pair.peft_prefix, module_type=la.module_type, kind=pair.kind,
            dora=pair.dora, r_before=pair.r, r_after=k, d_in=pair.d_in, d_out=pair.d_out, action=action,
            energy_retained=energy, rel_frob_error=frob, rel_spectral_error=spectral,
            coef=pair.scale * k / alpha, pair=pair, sigma=sigma,
            extra=action_note if pair.expert is None else {**action_note, **expert_row(pair)}))
        if action != "truncated":
            layers[-1].method = "copy" if layers[-1].verbatim else "rescale"

    names = [la.name if la.pair is None or la.pair.expert is None else parameter_name(la.pair) for la in layers]
    names = list(dict.fromkeys(names))
    default_r = _default_rank(_unit_ranks(loaded.pairs, ks))
    config = dict(loaded.config)
    config["r"] = default_r
    config["lora_alpha"] = _json_number(alpha)
    config["rank_pattern"] = {unique_pattern_key(la.name, names): la.r_after for la in layers
                              if la.r_after != default_r and (la.pair is None or la.pair.expert is None)}
    stack_pattern = expert_rank_pattern(loaded.pairs, ks, default_r, assumed, unique_pattern_key, names)
    config["rank_pattern"].update(stack_pattern)
    config["alpha_pattern"] = {}
    config["use_rslora"] = False

    # The audit's own layer issues (zero_update, non_finite_weights, non_lora_tensors), in its wording.
    issues = list(loaded.issues) + layer_issues(audits, loaded.non_lora)
    dora = [la.name for la in layers if la.dora and la.action == "truncated"]
    if dora:
        issues.append(Issue("dora_directional_truncated",
                            f"{len(dora)} DoRA module(s): the directional update s·B·A was truncated and the "
                            "magnitude vectors were kept as they are; the merged weight's error depends on the base "
                            "(pass --base-model for its exact value)", "info", modules=dora))
    stack_keys = list(stack_pattern)
    if stack_keys:
        issues.append(Issue("peft_pattern_warning_expected",
                            "PEFT 0.21 warns that rank_pattern keys of expert parameters "
                            f"({', '.join(stack_keys[:3])}) 'did not match any targeted module and were ignored': "
                            "its check (tuners_utils.py BaseTuner.inject_adapter) looks at target_modules only; "
                            "_create_and_replace applies them to the target_parameters wrappers", "info",
                            modules=stack_keys))
    if extra.get("uniform_rank") is not None and any(la.action == "padded" for la in layers):
        padded = [la.name for la in layers if la.action == "padded"]
        issues.append(Issue("zero_padded", f"{len(padded)} module(s) of lower rank were zero-padded to the uniform "
                                           f"rank {extra['uniform_rank']} (ΔW unchanged)", "info", modules=padded))
    return layers, config, issues, extra
