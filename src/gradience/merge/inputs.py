"""The adapters to merge: refusals (one line each), module matching across inputs, the output config.

Why refuse rather than warn: a merge writes an adapter that people ship. DoRA renormalises every merged weight
by its magnitude vector, so a weighted sum of DoRA updates is not the DoRA of anything; a mutated-base init
(PiSSA/OLoRA/...) stores components of the base, not a delta; adapters trained on different bases, or with a
module of different shape, do not add up to an update of one model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradience.adapter.config import mutated_base_init
from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.errors import InputError
from gradience.policy.thresholds import MERGE_MAX_INPUTS

# Loader issues after which the factors cannot be trusted to be the update PEFT applies.
_BROKEN_CODES = ("unpaired_factor", "shape_mismatch", "unsupported_dtype", "unscaled", "invalid_pattern")


def _where(loaded: LoadedAdapter) -> str | None:
    return loaded.adapter_config_path or loaded.adapter_weights_path or loaded.peft_dir


@dataclass
class ModuleGroup:
    """One target module across the inputs: ``pairs[i]`` is input i's pair, None where input i lacks it."""

    name: str
    kind: str
    d_in: int
    d_out: int
    pairs: list[LoraPair | None]

    @property
    def template(self) -> LoraPair:
        """The first input's pair for this module: its keys and stored layout are the output's."""
        return next(p for p in self.pairs if p is not None)

    @property
    def ranks(self) -> list[int | None]:
        return [None if p is None else p.r for p in self.pairs]

    @property
    def summed_rank(self) -> int:
        return sum(p.r for p in self.pairs if p is not None)

    @property
    def partial(self) -> bool:
        return any(p is None for p in self.pairs)


@dataclass
class MergePlanInputs:
    """Validated inputs: modules in a stable order (first input's order, then new ones), the output alpha."""

    groups: list[ModuleGroup]
    alpha: float
    base_model: str | None
    notes: list[str] = field(default_factory=list)


def parse_weights(spec: str | Sequence[float] | None, n: int) -> list[float]:
    """``"0.5,0.5"`` (or a sequence) -> n finite floats; default 1.0 each (every update as it was trained)."""
    if spec is None:
        return [1.0] * n
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"--weights must be comma-separated numbers, got {spec[:200]!r}") from None
    else:
        values = [float(v) for v in spec]
    if len(values) != n:
        raise InputError(f"--weights has {len(values)} value(s) for {n} adapter(s)")
    if not all(math.isfinite(v) for v in values):
        raise InputError("--weights must be finite numbers")
    return values


def _alpha(loaded: LoadedAdapter) -> float:
    alpha = loaded.config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise InputError(f"lora_alpha is {alpha!r}: merge needs a finite, non-zero lora_alpha to know each "
                         "module's scale", _where(loaded))
    return float(alpha)


def _refuse_one(loaded: LoadedAdapter, force: bool) -> None:
    where = _where(loaded)
    if not loaded.config:
        raise InputError("merge needs the adapter's adapter_config.json (each module's scale comes from it)",
                         loaded.adapter_weights_path)
    mutated = mutated_base_init(loaded.config)
    if mutated is not None:
        raise InputError(f"init_lora_weights is {mutated!r}: the saved factors hold components of the base model, "
                         "not a delta, so they cannot be added to other updates; convert it with PEFT's "
                         "path_initial_model_for_weight_conversion first", where)
    if loaded.config.get("use_dora") or any(p.dora for p in loaded.pairs):
        raise InputError("DoRA adapter: each merged weight is renormalised by its magnitude vector, so a weighted "
                         "sum of DoRA updates is not a DoRA update of anything; merge plain LoRA adapters", where)
    if loaded.config.get("format") == "mlx":
        # issue 21: MLX has its own layout; not written yet
        src = (loaded.peft_dir or "MLX_DIR").rstrip("/") or "MLX_DIR"
        raise InputError("MLX-LM adapter: merge cannot write this layout yet; convert it to PEFT first (ΔW "
                         f"unchanged) with: gradience compress {src} --out {src}-peft --format peft, then merge "
                         f"{src}-peft", where)
    broken = [i for i in loaded.issues if i.code in _BROKEN_CODES]
    if broken:
        raise InputError("cannot merge this adapter: " + "; ".join(i.message for i in broken[:3]), where)
    if loaded.non_lora.count and not force:
        raise InputError(f"{loaded.non_lora.count} non-LoRA tensor(s) (modules_to_save, heads, lora biases) cannot "
                         "be merged as updates; pass --force to drop them from the output", where)
    _alpha(loaded)


def _base_name(loaded: LoadedAdapter) -> str | None:
    value = loaded.config.get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def validate_inputs(loaded: Sequence[LoadedAdapter], *, force: bool) -> MergePlanInputs:
    """Refuse what cannot be merged (one ``InputError`` line each) and match modules by name."""
    if len(loaded) < 2:
        raise InputError("merge needs at least two adapters")
    if len(loaded) > MERGE_MAX_INPUTS:
        raise InputError(f"merge takes at most {MERGE_MAX_INPUTS} adapters, got {len(loaded)}")
    for one in loaded:
        _refuse_one(one, force)
    notes: list[str] = []
    bases = [_base_name(one) for one in loaded]
    known = [b for b in bases if b is not None]
    if len(set(known)) > 1:
        first = known[0]
        other = next(b for b in known if b != first)
        if not force:
            where = next(_where(one) for one, b in zip(loaded, bases, strict=True) if b == other)
            raise InputError(f"base_model_name_or_path is {other!r}, not {first!r} as in the first adapter: updates "
                             "of different base models do not add up; pass --force if they are the same model "
                             "under two names", where)
        notes.append(f"base models differ ({', '.join(sorted(set(known)))}); merged because of --force")

    groups: dict[str, ModuleGroup] = {}
    n = len(loaded)
    for i, one in enumerate(loaded):
        for pair in one.pairs:
            group = groups.get(pair.name)
            if group is None:
                group = groups[pair.name] = ModuleGroup(pair.name, pair.kind, pair.d_in, pair.d_out, [None] * n)
            elif (group.kind, group.d_out, group.d_in) != (pair.kind, pair.d_out, pair.d_in):
                raise InputError(f"module {pair.name} is a {pair.kind} {pair.d_out}x{pair.d_in} update here but a "
                                 f"{group.kind} {group.d_out}x{group.d_in} one in an earlier adapter: the adapters "
                                 "are for different models", _where(one))
            elif group.pairs[i] is not None:
                raise InputError(f"module {pair.name} appears twice in one adapter", _where(one))
            tpl = next((p for p in group.pairs if p is not None), pair)
            if pair.num_experts != tpl.num_experts:
                raise InputError(f"parameter {pair.name.rpartition('[')[0]} has {pair.num_experts} experts here but "
                                 f"{tpl.num_experts} in an earlier adapter: the adapters are for different models",
                                 _where(one))
            if pair.kind == "conv" and (tuple(pair.a_shape[1:]), tuple(pair.b_shape[2:])) != (
                    tuple(tpl.a_shape[1:]), tuple(tpl.b_shape[2:])):
                raise InputError(f"module {pair.name}: conv kernel shapes differ between the adapters", _where(one))
            group.pairs[i] = pair
    return MergePlanInputs(groups=list(groups.values()), alpha=_alpha(loaded[0]),
                           base_model=bases[0] if bases[0] is not None else (known[0] if known else None),
                           notes=notes)


def output_config(first: dict[str, Any], groups: Sequence[ModuleGroup], ranks: Sequence[int], alpha: float,
                  base_model: str | None, *, assumed: set[str] | None = None,
                  target_parameters: Sequence[str] = ()) -> dict[str, Any]:
    """PEFT config of the merged adapter: one ``lora_alpha``, ranks in ``rank_pattern``, the exact module list.

    ``target_modules`` lists every merged module by its full name (PEFT matches a list entry by equality or by a
    ``.name`` suffix), so modules present in only some inputs are created and nothing else is;
    ``layers_to_transform`` / ``layers_pattern`` are dropped for the same reason. MoE expert stacks are not
    modules: they are matched by the inputs' ``target_parameters`` (kept, their union) and get one rank per
    stacked parameter in ``rank_pattern``, keyed by the parameter (:func:`gradience.compress.experts.rank_pattern`).
    """
    from collections import Counter

    from gradience.audit.suggest import unique_pattern_key
    from gradience.compress.experts import parameter_name, stacked_groups
    from gradience.compress.experts import rank_pattern as stack_pattern

    templates = [g.template for g in groups]
    firsts = {idx[0] for idx in stacked_groups(templates).values()}
    # one rank per PEFT module or stacked MoE parameter (its experts share one r)
    counts = Counter(k for i, (t, k) in enumerate(zip(templates, ranks, strict=True))
                     if t.expert is None or i in firsts)
    top = max(counts.values())
    default_r = max(r for r, c in counts.items() if c == top)
    names = [g.name for g in groups if g.template.expert is None]
    pattern_names = names + list(dict.fromkeys(parameter_name(t) for t in templates if t.expert is not None))
    pattern = {unique_pattern_key(g.name, pattern_names): k for g, k in zip(groups, ranks, strict=True)
               if k != default_r and g.template.expert is None}
    pattern.update(stack_pattern(templates, ranks, default_r, assumed or set(), unique_pattern_key, pattern_names))
    config = dict(first)
    config.update({
        "r": default_r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_pattern": pattern,
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "target_modules": names,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
    })
    for key in ("exclude_modules",):
        config.pop(key, None)
    if target_parameters:  # PEFT target_parameters of every input (the stacks are matched by these entries)
        config["target_parameters"] = list(target_parameters)
    return config
