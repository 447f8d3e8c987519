"""Pre-flight rules of ``gradience check`` (SPEC §7): advice on a LoRA training config before compute is
spent. Conservative by design: every recommendation says what it saw (``evidence``) and how sure it is
(``confidence``); nothing here predicts accuracy.

Stable action ids (scripts match on these; never rename one):

every profile
  ``fix_weight_decay``        error    weight decay is negative
  ``fix_lr_units``            error    lr <= 0 or lr > 1e-2 (almost surely a units mistake)
  ``fix_dropout``             error    lora_dropout outside [0, 1)
  ``fix_rank``                error    r is not a positive integer
  ``set_alpha``               warning  lora_alpha missing: PEFT's default (8) silently sets the scale
  ``review_rslora``           info     rsLoRA with r <= 8, where alpha/sqrt(r) barely differs from alpha/r
  ``review_targets``          info     target names the module classifier does not recognize
  ``fix_alpha_scale``         warning  update scale alpha/r (alpha/sqrt(r) with rsLoRA) <= 0.25 or >= 16
  ``fix_config_key``          warning  an unknown key that looks like a misspelt known one (kept, but ignored)
  ``export_training_args``    info     only a pickled training_args.bin: what trainer_state.json gave, and how
                                       to write training_args.json (added by the CLI, ``extra=``)
hard_reasoning
  ``set_lr``                  warning  lr unset (suggest 5e-5)
  ``lower_lr``                warning  lr > 1e-4
  ``consider_lower_lr``       info     5e-5 < lr <= 1e-4
  ``add_targets``             warning  no target modules (suggest the attention projections)
  ``prefer_attention_only``   info     MLP targets next to attention targets
  ``add_attention_targets``   warning  MLP targets without any attention target
  ``set_rank``                info     r unset (suggest 8)
  ``consider_reduce_rank``    info     r >= 32 (stronger) or 16 < r < 32 (softer)
  ``reduce_alpha_or_lr``      info     alpha/r >= 1 at lr > 1e-4
easy_classification
  ``reduce_rank``             info     r > 16 (suggest 4-8)
  ``prefer_attention_only``   info     MLP targets
  ``lower_lr``                warning  lr > 5e-4
generation
  ``lower_lr``                warning  lr > 3e-4
  ``calibration_probe``       info     always: a short probe judged on held-out perplexity
unknown
  ``lower_lr``                warning  lr > 5e-4 (high whatever the task)
  ``calibration_probe``       info     always: attention-only, r=8, lr=5e-5 probe; name the task
any
  ``config_ok``               info     only when no other rule fired
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gradience.config.coerce import looks_like_regex, split_targets
from gradience.config.normalize import misspelt_keys
from gradience.modules import classify_module
from gradience.policy import thresholds as T
from gradience.policy.profiles import infer_task_profile
from gradience.policy.recommendations import dedupe_and_sort
from gradience.telemetry.types import TASK_PROFILES, ConfigSnapshot, Recommendation

CHECK_SCHEMA = "gradience.check/v1"
ACTIONS: tuple[str, ...] = (
    "fix_weight_decay", "fix_lr_units", "fix_dropout", "fix_rank", "set_alpha", "review_rslora",
    "review_targets", "set_lr", "lower_lr", "consider_lower_lr", "add_targets", "prefer_attention_only",
    "add_attention_targets", "set_rank", "consider_reduce_rank", "reduce_alpha_or_lr", "reduce_rank",
    "calibration_probe", "fix_alpha_scale", "fix_config_key", "export_training_args", "config_ok",
)
# PEFT's special value meaning every linear layer except the output head.
ALL_LINEAR = "all-linear"
ATTENTION_EXAMPLES = "q_proj,k_proj,v_proj,o_proj (Llama-style), c_attn (GPT-2), query,value (BERT)"


@dataclass
class TargetAnalysis:
    """What the target modules cover, by the one module classifier of SPEC §2."""

    targets: list[str] | None
    types: dict[str, str] = field(default_factory=dict)  # target -> attn|mlp|embed|other|attn+mlp
    unrecognized: list[str] = field(default_factory=list)

    @property
    def has_attn(self) -> bool:
        return any("attn" in t for t in self.types.values())

    @property
    def has_mlp(self) -> bool:
        return any("mlp" in t for t in self.types.values())

    @property
    def empty(self) -> bool:
        return not self.targets


# Bare names PEFT matches in both blocks (it matches any module path ending in the name): GPT-2's
# ``attn.c_proj`` and ``mlp.c_proj``; BERT's ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.
AMBIGUOUS_BARE_TARGETS: dict[str, str] = {"c_proj": "attn+mlp", "dense": "attn+mlp"}
# ... except in architectures whose only bare ``dense`` is the attention output (Falcon, Bloom, GPT-NeoX, Phi).
_DENSE_IS_ATTENTION_MODELS = ("falcon", "bloom", "neox", "pythia", "phi")


def _classify_target(target: str, model_name: str | None = None) -> str:
    bare = target.strip().lower()
    if bare == ALL_LINEAR:
        return "attn+mlp"
    if bare == "dense" and model_name and any(m in model_name.lower() for m in _DENSE_IS_ATTENTION_MODELS):
        return "attn"
    if bare in AMBIGUOUS_BARE_TARGETS:
        return AMBIGUOUS_BARE_TARGETS[bare]
    if looks_like_regex(target):
        return _classify_regex(target)
    return classify_module(target)


def _expand_alternations(pattern: str, limit: int = 64) -> list[str]:
    """``mlp\\.(up|down)_proj`` -> ``mlp\\.up_proj``, ``mlp\\.down_proj`` (simple groups only, bounded)."""
    out = [pattern]
    group = re.compile(r"\(\??:?([A-Za-z0-9_|]+)\)")
    for _ in range(8):
        expanded = []
        for text in out:
            m = group.search(text)
            if m is None:
                expanded.append(text)
                continue
            expanded += [text[:m.start()] + alt + text[m.end():] for alt in m.group(1).split("|")]
        if expanded == out:
            break
        out = expanded[:limit]
    return out


def _classify_regex(pattern: str) -> str:
    """A PEFT regex target: classify the module names and containers it mentions, by the one classifier
    (``.*(q_proj|v_proj)$`` -> attn, ``.*mlp\\.(up|down)_proj`` -> mlp)."""
    kinds: set[str] = set()
    for candidate in _expand_alternations(pattern):
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", candidate):
            # A word is either a leaf (q_proj) or a container (mlp, self_attn): probe both readings.
            kinds |= {classify_module(word), classify_module(f"{word}.child")}
    found = sorted(kinds & {"attn", "mlp", "embed"})
    return "+".join(found) if found else "other"


def analyze_targets(targets: list[str] | None, model_name: str | None = None) -> TargetAnalysis:
    """Classify each target (bare name, module path, PEFT regex or ``all-linear``)."""
    analysis = TargetAnalysis(targets=None if targets is None else list(targets))
    for target in targets or []:
        kind = _classify_target(target, model_name)
        analysis.types[target] = kind
        if kind == "other":
            analysis.unrecognized.append(target)
    return analysis


@dataclass
class CheckReport:
    config: ConfigSnapshot
    task_profile: str
    task_profile_inferred: bool
    recommendations: list[Recommendation] = field(default_factory=list)
    target_types: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "config": self.config.to_dict(),
            "task_profile": {"name": self.task_profile, "inferred": self.task_profile_inferred},
            "target_types": dict(self.target_types),
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

    def __init__(self, snapshot: ConfigSnapshot, profile: str) -> None:
        self.s = snapshot
        self.profile = profile
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
                                        evidence={"task_profile": self.profile, **evidence}))

    # --- every profile -------------------------------------------------------------------------
    def universal(self) -> None:
        s, lr = self.s, self.lr
        wd = _number(s.optimizer.weight_decay)
        if wd is not None and wd < 0:
            self.add("error", "fix_weight_decay", f"weight_decay={wd:g} is negative; use 0 or a small positive value",
                     "Negative weight decay pushes weights away from zero every step: it is a sign error, "
                     "not a regularizer.", 0.95, "optimizer.weight_decay", weight_decay=wd)
        if lr is not None and not self.lr_valid:
            problem = "is not positive" if lr <= 0 else f"is above {T.LR_MAX_SANE:g}"
            self.add("error", "fix_lr_units",
                     f"learning rate {lr:g} {problem}: check its units (LoRA lrs are typically 1e-5 to 5e-4)",
                     "A non-positive lr trains nothing or in reverse; an lr above 1e-2 is almost always a "
                     "units mistake (e.g. 5 or 0.05 meant as 5e-5) and diverges within a few steps.",
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
                     f"update scale{scale_text}; set it explicitly",
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
        self.alpha_scale()
        self.key_typos()
        if self.targets.unrecognized:
            self.add("info", "review_targets",
                     f"target modules not recognized as attention or MLP: {', '.join(self.targets.unrecognized)}",
                     "Unrecognized names may be fine (custom models) but are often typos or heads; PEFT only "
                     "errors when no module at all matches.", 0.5, "lora.target_modules",
                     unrecognized=list(self.targets.unrecognized), target_types=dict(self.targets.types))

    def alpha_scale(self) -> None:
        """The update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA) whatever the lr: an extreme scale is a
        mistake at any lr (PEFT's default alpha=8 at r=32 quarters the update; alpha=512 at r=8 multiplies it)."""
        r, alpha = self.r, self.alpha
        if alpha is None or not self.r_valid or not isinstance(r, int) or not math.isfinite(alpha) or alpha <= 0:
            return
        rslora = bool(self.s.lora.use_rslora)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        low, high = T.ALPHA_SCALE_EXTREME_LOW, T.ALPHA_SCALE_EXTREME_HIGH
        if low < scale < high:
            return
        form = "alpha/sqrt(r)" if rslora else "alpha/r"
        if scale <= low:
            why = (f"the LoRA update is scaled by {form} = {scale:g}: it is shrunk {1 / scale:g}x, so the adapter "
                   "learns far slower than the lr suggests (often PEFT's default alpha=8 left at a large r)")
        else:
            why = (f"the LoRA update is scaled by {form} = {scale:g}: every step is multiplied {scale:g}x, as if "
                   "the lr were that much higher (often alpha typed for a different r)")
        suggested = 2 * r if not rslora else round(2 * math.sqrt(r), 3)
        self.add("warning", "fix_alpha_scale",
                 f"lora_alpha={alpha:g} with r={r}: {why}; alpha = r to 2r (scale 1-2) is the usual choice, "
                 f"e.g. lora_alpha={suggested:g}",
                 "The effective step of a LoRA update is lr times the alpha scale; outside "
                 f"{low:g}..{high:g} the scale, not the lr, decides how fast the adapter moves.",
                 0.7, "lora.alpha", alpha=alpha, r=r, use_rslora=rslora, scale=scale,
                 thresholds={"low": low, "high": high}, suggested_alpha=suggested)

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
        lr, r = self.lr, self.r
        if lr is None:
            self.add("warning", "set_lr", f"learning rate is not set; start at lr={T.LR_CONSERVATIVE:g} for reasoning",
                     "Multi-step reasoning fine-tunes are sensitive to lr; a library default may not suit LoRA.",
                     0.6, "optimizer.lr", lr=None, suggested_lr=T.LR_CONSERVATIVE)
        elif self.lr_valid and lr > T.LR_HIGH:
            self.add("warning", "lower_lr", f"lr={lr:g} is high for a reasoning task; try {T.LR_CONSERVATIVE:g}",
                     "High LoRA learning rates on reasoning data tend to overfit the answer format and lose "
                     "the base model's reasoning.", 0.7, "optimizer.lr", lr=lr, threshold=T.LR_HIGH,
                     suggested_lr=T.LR_CONSERVATIVE)
        elif self.lr_valid and lr > T.LR_CONSERVATIVE:
            self.add("info", "consider_lower_lr",
                     f"lr={lr:g} is workable for reasoning; {T.LR_CONSERVATIVE:g} is the conservative choice",
                     "Between 5e-5 and 1e-4 runs usually converge; lower is safer when eval is noisy.",
                     0.4, "optimizer.lr", lr=lr, threshold=T.LR_CONSERVATIVE, suggested_lr=T.LR_CONSERVATIVE)
        t = self.targets
        if t.empty:
            state = "not set (PEFT falls back to its per-architecture default)" if t.targets is None else "empty"
            self.add("warning", "add_targets", f"target modules are {state}; target the attention projections "
                     f"(e.g. {ATTENTION_EXAMPLES})",
                     "Which modules get adapters is the main capacity decision; state it explicitly.",
                     0.7, "lora.target_modules", target_modules=t.targets)
        elif t.has_mlp and t.has_attn:
            self.add("info", "prefer_attention_only", "MLP modules are targeted too; attention-only is usually "
                     "enough for reasoning and makes the adapter much smaller", "MLP adapters add many parameters and "
                     "tend to memorize; start attention-only and add MLP only if eval asks for it.",
                     0.5, "lora.target_modules", target_types=dict(t.types))
        elif t.has_mlp:
            self.add("warning", "add_attention_targets", "only MLP modules are targeted; add the attention "
                     f"projections (e.g. {ATTENTION_EXAMPLES})", "Attention projections carry most of the "
                     "adaptation in LoRA fine-tunes; an MLP-only adapter is an unusual choice.",
                     0.6, "lora.target_modules", target_types=dict(t.types))
        if r is None:
            self.add("info", "set_rank", f"LoRA rank is not set; r={T.R_DEFAULT_SUGGESTION} is a good start",
                     "State the rank explicitly so runs are comparable.", 0.5, "lora.r",
                     r=None, suggested_r=T.R_DEFAULT_SUGGESTION)
        elif self.r_valid and isinstance(r, int) and r > T.R_MEDIUM:
            strong = r >= T.R_LARGE
            self.add("info", "consider_reduce_rank",
                     f"r={r} is large; most LoRA updates use far fewer directions — try r={T.R_MEDIUM} or lower "
                     "and check the audit's utilization", "Unused rank costs memory and can overfit; "
                     "`gradience audit` measures how much of it a trained adapter uses.",
                     0.6 if strong else 0.4, "lora.r", r=r,
                     threshold=T.R_LARGE if strong else T.R_MEDIUM, suggested_r=T.R_MEDIUM)
        if (self.alpha_over_r is not None and self.alpha_over_r >= T.ALPHA_OVER_R_HIGH and self.lr_valid
                and lr is not None and lr > T.LR_HIGH):
            self.add("info", "reduce_alpha_or_lr",
                     f"alpha/r={self.alpha_over_r:g} together with lr={lr:g}: the effective step is large; "
                     "lower one of them", "The update size scales with alpha/r times lr; both high compounds.",
                     0.4, "lora.alpha", alpha=self.alpha, r=r, alpha_over_r=self.alpha_over_r, lr=lr,
                     alpha_over_r_threshold=T.ALPHA_OVER_R_HIGH, lr_threshold=T.LR_HIGH)

    def easy_classification(self) -> None:
        lr, r = self.lr, self.r
        low, high = T.R_EASY_CLASSIFICATION_SUGGESTED
        if self.r_valid and isinstance(r, int) and r > T.R_EASY_CLASSIFICATION_MAX:
            self.add("info", "reduce_rank", f"r={r} is more than a classification task needs; try r={low}-{high}",
                     "Classification adapters are typically very low-rank; extra rank mostly adds overfitting "
                     "room.", 0.6, "lora.r", r=r, threshold=T.R_EASY_CLASSIFICATION_MAX,
                     suggested_r=list(T.R_EASY_CLASSIFICATION_SUGGESTED))
        if self.targets.has_mlp:
            self.add("info", "prefer_attention_only", "MLP modules are targeted; attention-only is usually enough "
                     "for classification", "Fewer adapter parameters, same accuracy in most classification "
                     "fine-tunes.", 0.5, "lora.target_modules", target_types=dict(self.targets.types))
        if self.lr_valid and lr is not None and lr > T.LR_EASY_CLASSIFICATION_MAX:
            self.add("warning", "lower_lr", f"lr={lr:g} is high even for classification; stay at or below "
                     f"{T.LR_EASY_CLASSIFICATION_MAX:g}", "Very high LoRA learning rates make classification "
                     "training unstable.", 0.6, "optimizer.lr", lr=lr, threshold=T.LR_EASY_CLASSIFICATION_MAX)

    def generation(self) -> None:
        lr = self.lr
        if self.lr_valid and lr is not None and lr > T.LR_GENERATION_HIGH:
            self.add("warning", "lower_lr", f"lr={lr:g} is high for generation fine-tuning; try "
                     f"{T.LR_GENERATION_SUGGESTED:g}", "Above ~3e-4, LoRA generation runs often diverge or "
                     "forget the base model's fluency.", 0.6, "optimizer.lr", lr=lr,
                     threshold=T.LR_GENERATION_HIGH, suggested_lr=T.LR_GENERATION_SUGGESTED)
        steps_lo, steps_hi = T.CALIBRATION_PROBE_STEPS
        self.add("info", "calibration_probe",
                 f"generation quality is not visible in train loss: run a {steps_lo}-{steps_hi} step probe "
                 f"(lr={T.LR_GENERATION_SUGGESTED:g}, r={T.R_GENERATION_SUGGESTED}, attention+MLP targets) and "
                 "compare held-out perplexity with the base model before the full run",
                 "Generation fine-tunes fail by memorizing the training text; held-out perplexity against "
                 "the base model is the cheapest early signal.", 0.5, "run",
                 suggested_lr=T.LR_GENERATION_SUGGESTED, suggested_r=T.R_GENERATION_SUGGESTED,
                 suggested_targets="attention+mlp", probe_steps=list(T.CALIBRATION_PROBE_STEPS),
                 lr=lr, r=self.r, target_types=dict(self.targets.types))

    def unknown(self) -> None:
        lr = self.lr
        if self.lr_valid and lr is not None and lr > T.LR_UNKNOWN_PROFILE_HIGH:
            self.add("warning", "lower_lr", f"lr={lr:g} is high for LoRA whatever the task; stay at or below "
                     f"{T.LR_UNKNOWN_PROFILE_HIGH:g} (pass --task-profile or --dataset for task-specific advice)",
                     "Above 5e-4 LoRA runs are unstable for classification and diverge or forget for reasoning "
                     "and generation; no task profile makes it safe.", 0.6, "optimizer.lr", lr=lr,
                     threshold=T.LR_UNKNOWN_PROFILE_HIGH, suggested_lr=T.LR_CONSERVATIVE)
        steps_lo, steps_hi = T.CALIBRATION_PROBE_STEPS
        self.add("info", "calibration_probe",
                 "task profile unknown: run a short calibration probe (attention-only targets, "
                 f"r={T.R_DEFAULT_SUGGESTION}, lr={T.LR_CONSERVATIVE:g}, {steps_lo}-{steps_hi} steps) and compare "
                 "train vs held-out metrics; pass --task-profile or --dataset for task-specific advice",
                 "Without knowing the task, a conservative probe is the cheapest way to find a working "
                 "regime.", 0.5, "run", dataset_name=self.s.dataset_name, suggested_r=T.R_DEFAULT_SUGGESTION,
                 suggested_lr=T.LR_CONSERVATIVE, suggested_targets="attention-only",
                 probe_steps=list(T.CALIBRATION_PROBE_STEPS))


def check_config(snapshot: ConfigSnapshot, extra: Iterable[Recommendation] = ()) -> CheckReport:
    """Run every pre-flight rule of SPEC §7 on a merged config; recommendations deduplicated and ordered
    (most severe first, then action id) exactly as text and JSON show them. ``extra`` holds findings about
    the sources themselves (e.g. ``export_training_args``), ranked with the rest."""
    profile, inferred = resolve_task_profile(snapshot)
    rules = _Rules(snapshot, profile)
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
                      "alpha": snapshot.lora.alpha, "target_types": dict(rules.targets.types)})]
    return CheckReport(config=snapshot, task_profile=profile, task_profile_inferred=inferred,
                       recommendations=recs, target_types=dict(rules.targets.types))
