"""``check`` rules whose thresholds come from published results (issue 18), one function per rule group.

Each takes the rule collector of :mod:`gradience.policy.check_rules` (``rules.add`` attaches the action's
``source``); thresholds live in :mod:`gradience.policy.thresholds` beside their citation.

- learning rate: Schulman et al. 2025 — LoRA's best lr is ~10x the full-fine-tuning lr and nearly rank
  independent; 1e-4 ... 5e-4 is the common band for 1-10B models. Only clearly harmful values warn.
- targets: Dettmers et al. 2023 (QLoRA), Biderman et al. 2024, Schulman et al. 2025 — all linear layers, MLP
  included, beat attention-only; recurrent / state-space models are the exception for their recurrence
  projections (Galim et al. 2024: LoRA works on the linear projections, fails on the SSM modules).
- alpha: alpha = 2r is common practice; rsLoRA (Kalajdzievski 2023) at high rank; an extreme alpha/r is a
  mistake, except on an adapter ``gradience compress`` wrote, where alpha is a serving scale.
- MoE: expert rank ~ r // num_experts (PEFT docs, "MoE expert parameters and vLLM").
"""

from __future__ import annotations

import math
from typing import Any

from gradience.policy import thresholds as T
from gradience.policy.model_facts import ssm_targets
from gradience.policy.targets import ALL_LINEAR, MLP_EXAMPLES


def params_text(params: float | None) -> str:
    if params is None:
        return "unknown size"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{unit} parameters"
    return f"{params:.0f} parameters"


def learning_rate(rules: Any) -> None:
    """``lower_lr`` above the size-scaled harmful bound, ``raise_lr`` at a full-fine-tuning lr."""
    lr, facts = rules.lr, rules.facts
    if not rules.lr_valid or lr is None:
        return
    small = facts.params is not None and facts.params < T.LR_LORA_SMALL_MODEL_PARAMS
    high = T.LR_LORA_HARMFUL_HIGH_SMALL if small else T.LR_LORA_HARMFUL_HIGH
    lo, hi = T.LR_LORA_BAND
    size = params_text(facts.params)
    where = f"{size}, from {facts.params_source}" if facts.params is not None else \
        "unknown size: pass --model-size, e.g. --model-size 7B"
    evidence = {"lr": lr, "threshold": high, "band": list(T.LR_LORA_BAND), "model_params": facts.params,
                "model_params_source": facts.params_source}
    if lr > high:
        self_hint = "" if facts.params is not None else " (a model known to be < 1B may go to 3e-3)"
        rules.add("warning", "lower_lr",
                  f"lr={lr:g} is above {high:g}, where LoRA runs diverge or forget the base model ({where}); the "
                  f"common LoRA band is {lo:g}-{hi:g}{self_hint}",
                  "LoRA's best lr is about 10x a full fine-tune's (so 1e-4 to 5e-4 for 1-10B models), but well "
                  "beyond that band the loss becomes unstable; smaller models tolerate somewhat larger steps.",
                  0.6, "optimizer.lr", **evidence)
    elif lr <= T.LR_FULL_FT_MAX:
        rules.add("warning", "raise_lr",
                  f"lr={lr:g} looks like a full-fine-tuning lr; LoRA's best lr is about 10x higher — try "
                  f"{T.LR_LORA_SUGGESTED:g} (common band {lo:g}-{hi:g})",
                  "At a full-fine-tuning lr a LoRA adapter learns several times slower than it could: the best "
                  "LoRA lr sat about 10x above the full-FT optimum across model sizes and ranks.",
                  0.6, "optimizer.lr", suggested_lr=T.LR_LORA_SUGGESTED, **{**evidence, "threshold": T.LR_FULL_FT_MAX})


def targets(rules: Any) -> None:
    """Attention-only targets -> ``add_mlp_targets`` (info), whatever the task profile."""
    t = rules.targets
    if t.empty or not t.has_attn or t.has_mlp:
        return
    rules.add("info", "add_mlp_targets",
              "only attention projections are targeted; adapting all linear layers, MLP included "
              f"(target_modules='{ALL_LINEAR}', or add {MLP_EXAMPLES}), learns more per step and matches full "
              "fine-tuning more closely",
              "Attention-only LoRA underperformed all-linear LoRA in QLoRA's ablations, in Biderman et al.'s "
              "code/math runs and in Schulman et al.'s sweeps, even at a matched parameter count.",
              0.6, "lora.target_modules", target_types=dict(t.types), suggested_targets=ALL_LINEAR)


def recurrent_targets(rules: Any) -> None:
    """Recurrent / state-space models: targets reaching the recurrence projections -> ``avoid_ssm_targets``."""
    facts = rules.facts
    if not facts.recurrent:
        return
    extra = rules.s.lora.extras.get("target_parameters")
    params = [str(p) for p in extra] if isinstance(extra, list) else []
    hits = ssm_targets(rules.targets.targets, params)
    if not hits:
        return
    rules.add("warning", "avoid_ssm_targets",
              f"this is a recurrent / state-space model ({facts.recurrent_reason}) and the targets {', '.join(hits)} "
              "reach its recurrence projections (x_proj, dt_proj, conv1d, A_log, D and the like); target the "
              "linear in/out projections (in_proj, out_proj), attention and MLP layers instead",
              "LoRA is effective on the linear projections of Mamba and Jamba but fails on the SSM modules "
              "themselves; all-linear also wraps x_proj and dt_proj, which are nn.Linear.",
              0.6, "lora.target_modules", targets=hits, recurrent_reason=facts.recurrent_reason,
              model_type=facts.model_type)


def _expert_targets(rules: Any) -> list[str]:
    extra = rules.s.lora.extras.get("target_parameters")
    names = [*(rules.targets.targets or []), *([str(p) for p in extra] if isinstance(extra, list) else [])]
    return [n for n in names if "expert" in n.lower() or n.strip().lower() == ALL_LINEAR
            or n.strip().lower() in ("w1", "w2", "w3")]


def expert_rank(rules: Any) -> None:
    """MoE experts targeted at the full r -> ``reduce_expert_rank`` with the PEFT-documented rank_pattern."""
    n, r = rules.facts.num_experts, rules.r
    if n is None or n < T.MOE_MIN_EXPERTS or not rules.r_valid or not isinstance(r, int):
        return
    hits = _expert_targets(rules)
    if not hits:
        return
    suggested = max(1, r // n)
    pattern = rules.s.lora.extras.get("rank_pattern")
    if isinstance(pattern, dict):
        lowered = [v for k, v in pattern.items() if "expert" in str(k).lower() and isinstance(v, int)]
        if lowered and max(lowered) <= suggested:
            return
    rules.add("info", "reduce_expert_rank",
              f"{n} experts are targeted at r={r} each (targets: {', '.join(hits)}): the experts alone carry "
              f"{n}x a dense layer's adapter; give them r // num_experts = {suggested}, e.g. "
              f"rank_pattern={{'experts': {suggested}}} (non-expert modules keep r={r})",
              "PEFT applies r to every expert; dividing it by the number of experts keeps the adapter's "
              "parameter budget close to a dense model's.", 0.5, "lora.r", r=r, num_experts=n,
              suggested_expert_r=suggested, expert_targets=hits)


def alpha_scale(rules: Any) -> None:
    """An extreme update scale alpha/r (alpha/sqrt(r) with rsLoRA) is a mistake at any lr — ``fix_alpha_scale``;
    on an adapter ``gradience compress`` wrote the same alpha is the serving scale it chose:
    ``alpha_is_serving_scale`` instead (retraining with the suggested alpha would shrink every update)."""
    r, alpha = rules.r, rules.alpha
    if alpha is None or not rules.r_valid or not isinstance(r, int) or not math.isfinite(alpha) or alpha <= 0:
        return
    rslora = bool(rules.s.lora.use_rslora)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    low, high = T.ALPHA_SCALE_EXTREME_LOW, T.ALPHA_SCALE_EXTREME_HIGH
    if low < scale < high:
        return
    form = "alpha/sqrt(r)" if rslora else "alpha/r"
    compressed = rules.context.compressed
    if compressed is not None:
        rules.add("info", "alpha_is_serving_scale",
                  f"lora_alpha={alpha:g} with r={r} ({form} = {scale:g}) is the serving scale `gradience compress` "
                  f"chose (found {compressed.get('by')}): its factors are scaled so PEFT's alpha/r reproduces the "
                  "truncated update. Do not change it; to retrain at this rank use alpha = 2r",
                  "compress keeps one lora_alpha and rescales each module's factors; changing alpha on the "
                  "compressed adapter would rescale every update.", 0.9, "lora.alpha", alpha=alpha, r=r,
                  scale=scale, compressed=dict(compressed))
        return
    if scale <= low:
        why = (f"the LoRA update is scaled by {form} = {scale:g}: it is shrunk {1 / scale:g}x, so the adapter "
               "learns far slower than the lr suggests (often PEFT's default alpha=8 left at a large r)")
    else:
        why = (f"the LoRA update is scaled by {form} = {scale:g}: every step is multiplied {scale:g}x, as if "
               "the lr were that much higher (often alpha typed for a different r)")
    suggested = int(T.ALPHA_OVER_R_COMMON * r) if not rslora else round(T.ALPHA_OVER_R_COMMON * math.sqrt(r), 3)
    rules.add("warning", "fix_alpha_scale",
              f"lora_alpha={alpha:g} with r={r}: {why}; alpha = 2r (scale 2) is common practice, "
              f"e.g. lora_alpha={suggested:g}",
              "The effective step of a LoRA update is lr times the alpha scale; outside "
              f"{low:g}..{high:g} the scale, not the lr, decides how fast the adapter moves.",
              0.7, "lora.alpha", alpha=alpha, r=r, use_rslora=rslora, scale=scale,
              thresholds={"low": low, "high": high}, suggested_alpha=suggested)


def rslora_at_high_rank(rules: Any) -> None:
    """r >= 64 with plain alpha/r scaling -> ``consider_rslora`` (info)."""
    r = rules.r
    if rules.s.lora.use_rslora or not rules.r_valid or not isinstance(r, int) or r < T.R_RSLORA_SUGGEST:
        return
    if rules.context.compressed is not None:
        return  # compress writes use_rslora: false on purpose (one alpha, per-module factor scales)
    rules.add("info", "consider_rslora",
              f"r={r} with alpha/r scaling: at high rank the update's scale shrinks with r; use_rslora=True "
              f"(scale alpha/sqrt(r)) lets the extra rank learn",
              "With alpha/r the gradient of a high-rank adapter collapses as r grows, so large ranks train no "
              "better than small ones; alpha/sqrt(r) keeps them stable and useful.", 0.5, "lora.use_rslora",
              r=r, threshold=T.R_RSLORA_SUGGEST)

