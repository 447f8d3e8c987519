"""``gradience check --fail-on``: a gate never passes by default (SPEC §3.4).

check's gates are severities (always decidable: the rules ran) and action ids. An action id whose rule reads
a config value that is not known cannot fire, so ``--fail-on lower_lr`` on a config without a learning rate
would pass silently: it is a usage error instead (exit 2), naming the rule and the value to provide. Actions
that fire *because* a value is missing (``set_lr``, ``set_rank``, ``set_alpha``, ``add_targets``) and the
config-level ones are always decidable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gradience.gates import Gate, require_available
from gradience.telemetry.types import ConfigSnapshot

_LR = ("learning rate", "--lr or a training config with learning_rate",
       lambda c: c.optimizer.lr)
_R = ("LoRA rank", "--r or a PEFT config with r", lambda c: c.lora.r)
_ALPHA = ("LoRA alpha", "--alpha or a PEFT config with lora_alpha", lambda c: c.lora.alpha)
_TARGETS = ("target modules", "--targets or a PEFT config with target_modules", lambda c: c.lora.target_modules)
_WD = ("weight decay", "--weight-decay or a training config with weight_decay", lambda c: c.optimizer.weight_decay)
_DROPOUT = ("LoRA dropout", "a PEFT config with lora_dropout", lambda c: c.lora.dropout)

Need = tuple[str, str, Callable[[ConfigSnapshot], object]]
# action id -> the config values its rule reads
ACTION_INPUTS: dict[str, tuple[Need, ...]] = {
    "lower_lr": (_LR,), "consider_lower_lr": (_LR,), "fix_lr_units": (_LR,), "reduce_alpha_or_lr": (_LR, _R, _ALPHA),
    "fix_rank": (_R,), "consider_reduce_rank": (_R,), "reduce_rank": (_R,), "review_rslora": (_R,),
    "fix_alpha_scale": (_R, _ALPHA), "prefer_attention_only": (_TARGETS,), "add_attention_targets": (_TARGETS,),
    "review_targets": (_TARGETS,), "fix_weight_decay": (_WD,), "fix_dropout": (_DROPOUT,),
    # issue 18's rules
    "raise_lr": (_LR,), "add_mlp_targets": (_TARGETS,), "avoid_ssm_targets": (_TARGETS,),
    "reduce_expert_rank": (_R,), "consider_rslora": (_R,), "alpha_is_serving_scale": (_R, _ALPHA),
}


def why_missing(gate: Gate, snapshot: ConfigSnapshot) -> str | None:
    """None when the rule can be decided on this config, else which value is missing and how to give it."""
    for label, how, get in ACTION_INPUTS.get(gate.metric, ()):
        value = get(snapshot)
        if value is None or value == []:
            return f"the config gives no {label}; pass {how}"
    return None


def require_inputs(gates: Sequence[Gate], snapshot: ConfigSnapshot) -> None:
    """Exit-2 error for the first action gate whose rule cannot fire on this config."""
    require_available(gates, lambda gate: why_missing(gate, snapshot))
