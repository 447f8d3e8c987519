"""Pre-flight rules of ``gradience check`` (SPEC §7): advice on a LoRA training config before compute is
spent. Conservative by design: every recommendation says what it saw (``evidence``), how sure it is
(``confidence``) and where the rule comes from (``source``: a paper, the PEFT docs, or "sanity rule");
nothing here predicts accuracy. The evidence-based rules (learning rate, targets, rsLoRA, MoE, recurrent
models, compressed adapters) live in :mod:`gradience.policy.evidence_rules`; README "check rules" lists all.

Stable action ids (scripts match on these; never rename one, never reuse a retired one):

every profile
  ``fix_weight_decay``        error    weight decay is negative
  ``fix_lr_units``            error    lr <= 0 or lr > 1e-2 (almost surely a units mistake)
  ``fix_dropout``             error    lora_dropout outside [0, 1)
  ``fix_rank``                error    r is not a positive integer
  ``set_alpha``               warning  lora_alpha missing: PEFT's default (8) silently sets the scale
  ``review_rslora``           info     rsLoRA with r <= 8, where alpha/sqrt(r) barely differs from alpha/r
  ``consider_rslora``         info     r >= 64 without rsLoRA (Kalajdzievski 2023)
  ``review_targets``          info     target names the module classifier does not recognize
  ``fix_alpha_scale``         warning  update scale alpha/r (alpha/sqrt(r) with rsLoRA) <= 0.25 or >= 16 —
                                       never on an adapter `gradience compress` wrote
  ``alpha_is_serving_scale``  info     that adapter's extreme alpha/r is the scale compress chose for serving
  ``fix_config_key``          warning  an unknown key that looks like a misspelt known one (kept, but ignored)
  ``lower_lr``                warning  lr > 1e-3 (models >= 1B or of unknown size) / > 3e-3 (known < 1B)
  ``raise_lr``                warning  lr <= 1e-5: probably a full-fine-tuning lr (LoRA wants ~10x)
  ``add_mlp_targets``         info     attention-only targets: all linear layers recommended
  ``avoid_ssm_targets``       warning  recurrent / state-space model with its recurrence projections targeted
  ``reduce_expert_rank``      info     MoE experts targeted at the full r: r // num_experts per expert
  ``export_training_args``    info     only a pickled training_args.bin: what trainer_state.json gave, and how
                                       to write training_args.json (added by the CLI, ``extra=``)
hard_reasoning
  ``set_lr``                  warning  lr unset (suggest 2e-4)
  ``add_targets``             warning  no target modules (suggest all linear layers)
  ``set_rank``                info     r unset (suggest 8)
  ``consider_reduce_rank``    info     r >= 32 (stronger) or 16 < r < 32 (softer)
easy_classification
  ``reduce_rank``             info     r > 16 (suggest 4-8)
generation
  ``calibration_probe``       info     always: a short probe judged on held-out perplexity
unknown
  ``calibration_probe``       info     always: all-linear, r=8, lr=2e-4 probe; name the task
any
  ``config_ok``               info     only when no other rule fired

Retired (they no longer fire; ``--fail-on`` still accepts them, and they are never reused):
  ``prefer_attention_only``, ``add_attention_targets`` (attention-first targets: the evidence favours all linear
  layers), ``consider_lower_lr`` and the per-profile ``lower_lr`` bands at 1e-4 / 3e-4 / 5e-4, and
  ``reduce_alpha_or_lr`` (alpha = 2r at lr 2e-4 is the recommended recipe, not a risk) — issue 18.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gradience.config.coerce import split_targets
from gradience.config.normalize import misspelt_keys
from gradience.policy import sources as S
from gradience.policy import thresholds as T
from gradience.policy.model_facts import ModelFacts, model_facts
from gradience.policy.profiles import infer_task_profile
from gradience.policy.recommendations import dedupe_and_sort
from gradience.policy.targets import (  # noqa: F401  (re-exported: public names of this module before the split)
    ALL_LINEAR,
    ATTENTION_EXAMPLES,
    MLP_EXAMPLES,
    TargetAnalysis,
    analyze_targets,
)
from gradience.telemetry.types import TASK_PROFILES, ConfigSnapshot, Recommendation

CHECK_SCHEMA = "gradience.check/v1"
ACTIONS: tuple[str, ...] = (
    "fix_weight_decay", "fix_lr_units", "fix_dropout", "fix_rank", "set_alpha", "review_rslora",
    "review_targets", "set_lr", "lower_lr", "consider_lower_lr", "add_targets", "prefer_attention_only",
    "add_attention_targets", "set_rank", "consider_reduce_rank", "reduce_alpha_or_lr", "reduce_rank",
    "calibration_probe", "fix_alpha_scale", "fix_config_key", "export_training_args", "config_ok",
    "raise_lr", "add_mlp_targets", "avoid_ssm_targets", "reduce_expert_rank", "consider_rslora",
    "alpha_is_serving_scale",
)
RETIRED_ACTIONS: tuple[str, ...] = (
    "prefer_attention_only", "add_attention_targets", "consider_lower_lr", "reduce_alpha_or_lr",
)
# Where each rule comes from (``Recommendation.source``; README "check rules" prints the same table).
ACTION_SOURCES: dict[str, str] = {
    "fix_weight_decay": S.HEURISTIC, "fix_lr_units": S.HEURISTIC, "fix_dropout": S.HEURISTIC,
    "fix_rank": S.PEFT_LORA_CONFIG, "set_alpha": S.PEFT_LORA_CONFIG, "review_rslora": S.KALAJDZIEVSKI_2023,
    "consider_rslora": S.KALAJDZIEVSKI_2023, "review_targets": S.PEFT_LORA_CONFIG,
    "fix_alpha_scale": f"{S.HU_2021}; {S.DETTMERS_2023} (alpha = 2r)",
    "alpha_is_serving_scale": "gradience compress (compress/factors.py rescaled_factors: alpha/k_i reproduces ΔW_k)",
    "fix_config_key": S.HEURISTIC, "lower_lr": S.LORA_LR, "raise_lr": S.LORA_LR, "set_lr": S.LORA_LR,
    "add_mlp_targets": S.ALL_LINEAR_TARGETS, "add_targets": S.ALL_LINEAR_TARGETS,
    "avoid_ssm_targets": S.GALIM_2024, "reduce_expert_rank": S.PEFT_MOE_DOCS,
    "set_rank": S.HU_2021, "consider_reduce_rank": f"{S.HU_2021}; {S.SCHULMAN_2025}",
    "reduce_rank": S.HU_2021, "calibration_probe": S.LORA_LR,
    "export_training_args": "transformers, training_args.py TrainingArguments.to_json_string",
    "config_ok": S.HEURISTIC,
}


@dataclass
class CheckContext:
    """Facts from outside the config that switch rules: the base model (size, recurrent, experts) and whether
    the adapter was written by ``gradience compress`` (``{"by": "compress.json" | "safetensors metadata",
    "path": ...}``)."""

    model: ModelFacts | None = None
    compressed: dict[str, Any] | None = None


@dataclass
class CheckReport:
    config: ConfigSnapshot
    task_profile: str
    task_profile_inferred: bool
    recommendations: list[Recommendation] = field(default_factory=list)
    target_types: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] | None = None          # ModelFacts.to_dict(): size, recurrent, experts, and why
    compressed: dict[str, Any] | None = None     # set when `gradience compress` wrote the adapter

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "config": self.config.to_dict(),
            "task_profile": {"name": self.task_profile, "inferred": self.task_profile_inferred},
            "target_types": dict(self.target_types),
            "model": self.model,
            "compressed_adapter": self.compressed,
            "recommendations": [r.to_dict() for r in self.recommendations],
        }


def resolve_task_profile(snapshot: ConfigSnapshot) -> tuple[str, bool]:
    """(profile, inferred): the explicit profile if valid, else inferred from the dataset / task name, else
    ``unknown`` (also marked inferred: nobody chose it)."""
    explicit = (snapshot.task_profile or "").strip().lower()
    if explicit in TASK_PROFILES:
        return explicit, False
    task = snapshot.extras.get("task")
    inferred = infer_task_profile(snapshot.dataset_name, task if isinstance(task, str) else None)
    return inferred or "unknown", True


def _number(value: Any) -> float | int | None:
    """Snapshots built by ``gradience.config`` hold numbers already; ones read back from other tools' logs
    may hold numeric strings. Anything that is not a finite number counts as unset here."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


class _Rules:
    """Collects recommendations for one snapshot; one method per rule group."""

    def __init__(self, snapshot: ConfigSnapshot, profile: str, context: CheckContext) -> None:
        self.s = snapshot
        self.profile = profile
        self.context = context
        self.facts = context.model or ModelFacts()
        self.recs: list[Recommendation] = []
        self.lr = _number(snapshot.optimizer.lr)
        r = _number(snapshot.lora.r)
        if isinstance(r, float) and r.is_integer():
            r = int(r)
        self.r = r
        self.r_valid = isinstance(r, int) and not isinstance(r, bool) and r > 0
        self.lr_valid = self.lr is not None and 0 < self.lr <= T.LR_MAX_SANE
        self.alpha = _number(snapshot.lora.alpha)
        self.alpha_over_r = (self.alpha / r) if (self.alpha is not None and self.r_valid and r) else None
        targets = snapshot.lora.target_modules
        if isinstance(targets, str):  # a snapshot read from an older log may hold the raw string
            targets = split_targets(targets)
        self.targets = analyze_targets(targets, snapshot.model_name)

    def add(self, severity: str, action: str, message: str, rationale: str, confidence: float, scope: str,
            **evidence: Any) -> None:
        self.recs.append(Recommendation(severity=severity, action=action, message=message, rationale=rationale,
                                        confidence=confidence, scope=scope,
                                        evidence={"task_profile": self.profile, **evidence},
                                        source=ACTION_SOURCES.get(action)))

    # --- every profile -------------------------------------------------------------------------
    def universal(self) -> None:
        from gradience.policy import evidence_rules

        s, lr = self.s, self.lr
        wd = _number(s.optimizer.weight_decay)
        if wd is not None and wd < 0:
            self.add("error", "fix_weight_decay", f"weight_decay={wd:g} is negative; use 0 or a small positive value",
                     "Negative weight decay pushes weights away from zero every step: it is a sign error, "
                     "not a regularizer.", 0.95, "optimizer.weight_decay", weight_decay=wd)
        if lr is not None and not self.lr_valid:
            problem = "is not positive" if lr <= 0 else f"is above {T.LR_MAX_SANE:g}"
            self.add("error", "fix_lr_units",
                     f"learning rate {lr:g} {problem}: check its units (LoRA lrs are typically 1e-4 to 5e-4)",
                     "A non-positive lr trains nothing or in reverse; an lr above 1e-2 is almost always a "
                     "units mistake (e.g. 2 or 0.02 meant as 2e-4) and diverges within a few steps.",
                     0.9, "optimizer.lr", lr=lr, max_sane=T.LR_MAX_SANE)
        r = self.r
        if r is not None and not self.r_valid:
            self.add("error", "fix_rank", f"LoRA rank r={r!r} is not a positive integer",
                     "The rank is the number of columns of the LoRA factors; PEFT rejects anything else.",
                     0.95, "lora.r", r=r)
        if self.alpha is None:
            implied = T.PEFT_DEFAULT_LORA_ALPHA / r if self.r_valid and r else None
            scale_text = f" (alpha/r = {implied:g} at r={r})" if implied is not None else ""
            self.add("warning", "set_alpha",
                     f"lora_alpha is not set: PEFT's default alpha={T.PEFT_DEFAULT_LORA_ALPHA:g} decides the "
                     f"update scale{scale_text}; set it explicitly (alpha = 2r is common practice)",
                     "The LoRA update is scaled by alpha/r; leaving alpha to a library default makes the "
                     "effective step size change silently whenever r changes.", 0.7, "lora.alpha",
                     r=r, default_alpha=T.PEFT_DEFAULT_LORA_ALPHA, implied_alpha_over_r=implied)
        dropout = _number(s.lora.dropout)
        if dropout is not None and not (0.0 <= dropout < 1.0):
            self.add("error", "fix_dropout", f"lora_dropout={dropout:g} is outside [0, 1)",
                     "Dropout is a probability of dropping an input; 1 or more drops everything, a negative "
                     "value is meaningless.", 0.95, "lora.dropout", dropout=dropout)
        if s.lora.use_rslora and self.r_valid and isinstance(r, int) and r <= T.RSLORA_SMALL_R:
            alpha = self.alpha if self.alpha is not None else T.PEFT_DEFAULT_LORA_ALPHA
            self.add("info", "review_rslora",
                     f"rsLoRA at r={r}: scale alpha/sqrt(r) = {alpha / math.sqrt(r):.3g} vs alpha/r = "
                     f"{alpha / r:.3g}; rsLoRA mainly helps at large ranks — make sure alpha was chosen for it",
                     "rsLoRA's sqrt(r) scaling keeps updates from shrinking as r grows; at small ranks it "
                     "mostly just multiplies the scale by sqrt(r).", 0.6, "lora.use_rslora", r=r, alpha=alpha,
                     scale_rslora=alpha / math.sqrt(r), scale_plain=alpha / r)
        evidence_rules.alpha_scale(self)
        evidence_rules.rslora_at_high_rank(self)
        self.key_typos()
        if self.targets.unrecognized:
            self.add("info", "review_targets",
                     f"target modules not recognized as attention or MLP: {', '.join(self.targets.unrecognized)}",
                     "Unrecognized names may be fine (custom models) but are often typos or heads; PEFT only "
                     "errors when no module at all matches.", 0.5, "lora.target_modules",
                     unrecognized=list(self.targets.unrecognized), target_types=dict(self.targets.types))
        evidence_rules.learning_rate(self)
        evidence_rules.targets(self)
        evidence_rules.recurrent_targets(self)
        evidence_rules.expert_rank(self)

    def key_typos(self) -> None:
        """An unknown key is kept in extras and otherwise ignored: a misspelt one silently drops its value."""
        for found in misspelt_keys(self.s):
            self.add("warning", "fix_config_key",
                     f"unknown key '{found['key']}' (in {found['where']}) is ignored; did you mean "
                     f"'{found['closest']}'?",
                     "Unknown keys are kept but not read, so a misspelling silently leaves the setting at its "
                     "default.", 0.7, "config", key=found["key"], closest=found["closest"], where=found["where"])

    # --- profile-specific ----------------------------------------------------------------------
    def hard_reasoning(self) -> None:
        r = self.r
        if self.lr is None:
            lo, hi = T.LR_LORA_BAND
            self.add("warning", "set_lr", f"learning rate is not set; start at lr={T.LR_LORA_SUGGESTED:g} (the common "
                     f"LoRA band is {lo:g}-{hi:g}, about 10x a full fine-tune's lr)",
                     "Library defaults (transformers: 5e-5) are full-fine-tuning values; LoRA's best lr is about "
                     "10x higher and nearly independent of the rank.",
                     0.6, "optimizer.lr", lr=None, suggested_lr=T.LR_LORA_SUGGESTED, band=list(T.LR_LORA_BAND))
        t = self.targets
        if t.empty:
            state = "not set (PEFT falls back to its per-architecture default, usually attention only)" \
                if t.targets is None else "empty"
            self.add("warning", "add_targets", f"target modules are {state}; target all linear layers "
                     f"(target_modules='all-linear', or the attention and MLP projections: {ATTENTION_EXAMPLES}; "
                     f"{MLP_EXAMPLES})",
                     "Which modules get adapters is the main capacity decision; adapting every linear layer, MLP "
                     "included, matches full fine-tuning where attention-only falls short.",
                     0.7, "lora.target_modules", target_modules=t.targets)
        if r is None:
            self.add("info", "set_rank", f"LoRA rank is not set; r={T.R_DEFAULT_SUGGESTION} is a good start",
                     "State the rank explicitly so runs are comparable.", 0.5, "lora.r",
                     r=None, suggested_r=T.R_DEFAULT_SUGGESTION)
        elif self.r_valid and isinstance(r, int) and r > T.R_MEDIUM:
            strong = r >= T.R_LARGE
            self.add("info", "consider_reduce_rank",
                     f"r={r} is large; most LoRA updates use far fewer directions — try r={T.R_MEDIUM} or lower "
                     "and check the audit's utilization", "Unused rank costs memory; rank only limits learning "
                     "once the dataset outgrows the adapter's capacity, and `gradience audit` measures how much "
                     "of it a trained adapter uses.",
                     0.6 if strong else 0.4, "lora.r", r=r,
                     threshold=T.R_LARGE if strong else T.R_MEDIUM, suggested_r=T.R_MEDIUM)

    def easy_classification(self) -> None:
        r = self.r
        low, high = T.R_EASY_CLASSIFICATION_SUGGESTED
        if self.r_valid and isinstance(r, int) and r > T.R_EASY_CLASSIFICATION_MAX:
            self.add("info", "reduce_rank", f"r={r} is more than a classification task needs; try r={low}-{high}",
                     "Classification adapters are typically very low-rank; extra rank mostly adds overfitting "
                     "room.", 0.6, "lora.r", r=r, threshold=T.R_EASY_CLASSIFICATION_MAX,
                     suggested_r=list(T.R_EASY_CLASSIFICATION_SUGGESTED))

    def generation(self) -> None:
        steps_lo, steps_hi = T.CALIBRATION_PROBE_STEPS
        self.add("info", "calibration_probe",
                 f"generation quality is not visible in train loss: run a {steps_lo}-{steps_hi} step probe "
                 f"(lr={T.LR_GENERATION_SUGGESTED:g}, r={T.R_GENERATION_SUGGESTED}, attention+MLP targets) and "
                 "compare held-out perplexity with the base model before the full run",
                 "Generation fine-tunes fail by memorizing the training text; held-out perplexity against "
                 "the base model is the cheapest early signal.", 0.5, "run",
                 suggested_lr=T.LR_GENERATION_SUGGESTED, suggested_r=T.R_GENERATION_SUGGESTED,
                 suggested_targets="attention+mlp", probe_steps=list(T.CALIBRATION_PROBE_STEPS),
                 lr=self.lr, r=self.r, target_types=dict(self.targets.types))

    def unknown(self) -> None:
        steps_lo, steps_hi = T.CALIBRATION_PROBE_STEPS
        self.add("info", "calibration_probe",
                 "task profile unknown: run a short calibration probe (all linear layers as targets, "
                 f"r={T.R_DEFAULT_SUGGESTION}, lr={T.LR_LORA_SUGGESTED:g}, {steps_lo}-{steps_hi} steps) and compare "
                 "train vs held-out metrics; pass --task-profile or --dataset for task-specific advice",
                 "Without knowing the task, a short probe with the published LoRA defaults is the cheapest way "
                 "to find a working regime.", 0.5, "run", dataset_name=self.s.dataset_name,
                 suggested_r=T.R_DEFAULT_SUGGESTION, suggested_lr=T.LR_LORA_SUGGESTED,
                 suggested_targets="all-linear", probe_steps=list(T.CALIBRATION_PROBE_STEPS))


def default_context(snapshot: ConfigSnapshot) -> CheckContext:
    """What the snapshot alone says about the model: its name, and a ``model_size`` key (flag or config)."""
    size = snapshot.extras.get("model_size")
    return CheckContext(model=model_facts(snapshot.model_name, size=size, size_source="model_size"))


def check_config(snapshot: ConfigSnapshot, extra: Iterable[Recommendation] = (),
                 context: CheckContext | None = None) -> CheckReport:
    """Run every pre-flight rule of SPEC §7 on a merged config; recommendations deduplicated and ordered
    (most severe first, then action id) exactly as text and JSON show them. ``extra`` holds findings about
    the sources themselves (e.g. ``export_training_args``), ranked with the rest; ``context`` the model facts
    and compress provenance the CLI found (default: what the snapshot's model name and ``model_size`` say)."""
    profile, inferred = resolve_task_profile(snapshot)
    ctx = context if context is not None else default_context(snapshot)
    rules = _Rules(snapshot, profile, ctx)
    rules.universal()
    getattr(rules, profile)()
    recs = dedupe_and_sort([*rules.recs, *extra])
    if not recs:
        recs = [Recommendation(
            severity="info", action="config_ok",
            message=f"no issues found for the {profile} profile (pre-flight checks only; verify with eval)",
            rationale="Every pre-flight rule passed; this says nothing about the accuracy the run will reach.",
            confidence=0.5, scope="run",
            evidence={"task_profile": profile, "lr": snapshot.optimizer.lr, "r": snapshot.lora.r,
                      "alpha": snapshot.lora.alpha, "target_types": dict(rules.targets.types)},
            source=ACTION_SOURCES["config_ok"])]
    model = ctx.model.to_dict() if ctx.model is not None else None
    return CheckReport(config=snapshot, task_profile=profile, task_profile_inferred=inferred,
                       recommendations=recs, target_types=dict(rules.targets.types), model=model,
                       compressed=ctx.compressed)
