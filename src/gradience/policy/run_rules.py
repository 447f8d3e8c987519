"""Recommendation rules of ``gradience monitor`` (SPEC §6), applied to the analysed run.

Inputs are the plain ``signals`` / ``training`` / ``audit`` blocks built by ``gradience.monitor.analysis``
(so a rule can be tested with a hand-written dict) and the run's ConfigSnapshot. Every threshold comes from
``gradience.policy.thresholds``. The rules are conservative: they describe what the logs show and suggest
the next experiment; none predicts accuracy.
"""

from __future__ import annotations

import shlex
from typing import Any

from gradience.bench.command import VERIFY_CONFIG, verify_command
from gradience.policy import sources as S
from gradience.policy import thresholds as T
from gradience.policy.guard_rules import GUARD_ACTIONS, guard_recommendations
from gradience.policy.signature_rules import SIGNATURE_ACTIONS, signature_recommendations
from gradience.telemetry.types import ConfigSnapshot, Recommendation
from gradience.textfmt import finite, human_count

RUN_ACTIONS: tuple[str, ...] = (
    "memorization_detected", "lower_lr", "log_train_test_ppl", "possible_underfitting", "low_utilization",
    "compress_rank", "compress_mlp_targets", "nan_loss", "grad_explosion", "loss_spikes", "early_stop_at",
    *GUARD_ACTIONS, *SIGNATURE_ACTIONS,
)


def _steps(findings: dict[str, Any], limit: int = 10) -> list[Any]:
    return [item.get("step") for item in findings.get("listed", [])][:limit]


def _run_lr(config: ConfigSnapshot | None, training: dict[str, Any]) -> float | None:
    """The run's learning rate: configured, else the peak of the logged schedule."""
    if config is not None and finite(config.optimizer.lr) is not None:
        return config.optimizer.lr
    schedule = training.get("lr_schedule") or {}
    return finite(schedule.get("peak"))


def _adapter_r(audit: dict[str, Any] | None, config: ConfigSnapshot | None) -> float | None:
    r = finite((audit or {}).get("r"))
    if r is None and config is not None:
        r = finite(config.lora.r)
    return r


def gap_rules(signals: dict[str, Any], lr: float | None, gap_threshold: float) -> list[Recommendation]:
    gap = finite(signals.get("gap"))
    if gap is None:
        missing = [name for name, key in (("train", "train_ppl"), ("test", "test_ppl"))
                   if finite(signals.get(key)) is None]
        return [Recommendation(
            "info", "log_train_test_ppl",
            f"No train/test gap: the run has no usable {' or '.join(missing)} eval loss/perplexity. Evaluate "
            "the same metric on a train subset and on held-out data at each eval step.",
            rationale="The train/test perplexity gap is the cheapest memorization signal; it needs both evals "
                      "(the HF callback's train_eval_samples option logs the train side).",
            confidence=0.9, evidence={"missing_splits": missing, "eval_splits": signals.get("eval_splits", [])})]
    if gap < gap_threshold:
        return []
    recs = [Recommendation(
        "warning", "memorization_detected",
        f"Test perplexity is {gap:.2f}x train perplexity (threshold {gap_threshold:.2f}x): the adapter is "
        "probably memorizing the training set.",
        rationale="A large held-out/train perplexity ratio means training loss keeps improving on examples the "
                  "model has seen without transferring; common with too many epochs, high lr or high rank.",
        confidence=0.7,
        evidence={"gap": gap, "train_ppl": signals.get("train_ppl"), "test_ppl": signals.get("test_ppl"),
                  "threshold": gap_threshold, "test_split": signals.get("test_split")})]
    if lr is not None and lr > T.LR_CONSERVATIVE:
        # Halve it, not drop it to a full-fine-tuning value: LoRA's best lr is ~10x full FT's (Schulman 2025).
        suggested = lr / 2
        recs.append(Recommendation(
            "warning", "lower_lr",
            f"Lower the learning rate (run used {lr:g}; try {suggested:g}) and compare the gap; below "
            f"{T.LR_LORA_BAND[0]:g} LoRA usually learns too slowly rather than memorizing less.",
            rationale="With a memorization gap, a lower lr is the least invasive first change; verify on held-out "
                      "data.",
            confidence=0.6, scope="optimizer",
            evidence={"lr": lr, "suggested_lr": suggested, "gap": gap}, source=S.LORA_LR))
    return recs


def underfitting_rule(signals: dict[str, Any], audit: dict[str, Any] | None) -> list[Recommendation]:
    gap = finite(signals.get("gap"))
    acc = finite(signals.get("test_accuracy"))
    sr = finite((audit or {}).get("stable_rank_mean"))
    if gap is None or acc is None or sr is None:
        return []
    if gap < T.UNDERFIT_GAP_MAX and acc < T.UNDERFIT_TEST_ACC_MAX and sr < T.UNDERFIT_STABLE_RANK_MAX:
        return [Recommendation(
            "warning", "possible_underfitting",
            f"Possible underfitting: test accuracy {acc:.1%} with no train/test gap ({gap:.2f}x) and a "
            f"near rank-1 update (stable rank {sr:.2f}). Check the task setup (labels, prompt format, metric) "
            "before tuning LoRA.",
            rationale="Low accuracy without a gap and with a tiny effective update means the adapter barely "
                      "learned; more steps, a higher lr or a data/label fix is more likely to help than rank.",
            confidence=0.4,
            evidence={"gap": gap, "test_accuracy": acc, "stable_rank_mean": sr,
                      "thresholds": {"gap": T.UNDERFIT_GAP_MAX, "test_accuracy": T.UNDERFIT_TEST_ACC_MAX,
                                     "stable_rank": T.UNDERFIT_STABLE_RANK_MAX}})]
    return []


def audit_rules(audit: dict[str, Any] | None, config: ConfigSnapshot | None,
                adapter_dir: str | None = None) -> list[Recommendation]:
    """``adapter_dir``: the run's saved adapter when monitor found it (its path goes into the commands)."""
    if not audit:
        return []
    recs: list[Recommendation] = []
    r = _adapter_r(audit, config)
    util = finite(audit.get("utilization_mean"))
    k90_p90 = finite(audit.get("energy_rank_90_p90"))
    big_r = r is not None and r >= T.LOW_UTILIZATION_MIN_R
    if big_r and util is not None and util < T.LOW_UTILIZATION:
        recs.append(Recommendation(
            "info", "low_utilization",
            f"Mean rank utilization is {util:.1%} at r={r:g}: most of the rank is unused.",
            rationale="Utilization = stable rank / r; a low value means the update concentrates in a few "
                      "directions, so a smaller r likely gives the same adapter for fewer parameters.",
            confidence=0.6, scope="lora",
            evidence={"utilization_mean": util, "r": r, "threshold": T.LOW_UTILIZATION}))
    wasteful = (util is not None and util < T.LOW_UTILIZATION) or \
        (k90_p90 is not None and r is not None and k90_p90 <= r * T.COMPRESS_K90_FRACTION)
    suggested = audit.get("suggested") or {}
    p90 = suggested.get("p90") or {}
    med = suggested.get("median") or {}
    r_new = finite(p90.get("r"))
    if big_r and wasteful and r_new is not None and r is not None and r_new < r:
        saved = finite(p90.get("params_saved"))
        ratio = finite(p90.get("reduction_ratio"))
        saving = (f", saving ~{human_count(saved)} LoRA params ({ratio:.0%})"
                  if saved is not None and ratio is not None else "")
        src = (adapter_dir or "ADAPTER").rstrip("/")
        out = f"{src}_r{r_new:g}"
        recs.append(Recommendation(
            "info", "compress_rank",
            f"Try r={r_new:g} (audit p90 of k@90%; median suggests r={med.get('r', '-')}) instead of "
            f"r={r:g}{saving}; retrain and verify on held-out data, or truncate the trained adapter without "
            f"retraining (`gradience compress --peft-dir {shlex.quote(src)} --out {shlex.quote(out)} "
            f"--rank {r_new:g}`) and verify it on your task ({VERIFY_CONFIG}: a bench config naming the task and "
            f"eval data): `{verify_command(out, src)}`.",
            rationale="90% of each layer's update energy fits in k@90% directions; the p90 across layers is "
                      "the conservative uniform rank.",
            confidence=0.55, scope="lora",
            evidence={"r": r, "utilization_mean": util, "energy_rank_90_p90": k90_p90,
                      "suggested_r_global_90": r_new, "suggested_r_global_median": med.get("r"),
                      "params_saved": saved, "reduction_ratio": ratio}))
    by_type = audit.get("by_type") or {}
    mlp_util = finite((by_type.get("mlp") or {}).get("utilization_mean"))
    attn_util = finite((by_type.get("attn") or {}).get("utilization_mean"))
    if mlp_util is not None and attn_util is not None and mlp_util < T.MLP_UTILIZATION_LOW \
            and attn_util >= T.ATTN_OVER_MLP_UTILIZATION * mlp_util:
        recs.append(Recommendation(
            "info", "compress_mlp_targets",
            f"MLP modules use {mlp_util:.1%} of their rank versus {attn_util:.1%} for attention: consider "
            "dropping MLP targets or giving them a lower rank (rank_pattern).",
            rationale="MLP adapters carry most LoRA parameters; when they barely use their rank while attention "
                      "does, attention-only (or a smaller MLP rank) usually keeps quality for less.",
            confidence=0.5, scope="lora",
            evidence={"mlp_utilization_mean": mlp_util, "attn_utilization_mean": attn_util,
                      "thresholds": {"mlp": T.MLP_UTILIZATION_LOW, "attn_over_mlp": T.ATTN_OVER_MLP_UTILIZATION}}))
    return recs


def instability_rules(training: dict[str, Any]) -> list[Recommendation]:
    recs: list[Recommendation] = []
    nan = training.get("nonfinite_loss") or {}
    if nan.get("count"):
        recs.append(Recommendation(
            "error", "nan_loss",
            f"{nan['count']} train step(s) logged a NaN/Inf loss (first at step {_steps(nan)[0]}): lower the lr, "
            "clip gradients (max_grad_norm=1.0), prefer bf16 over fp16, and check the data for empty or "
            "corrupt samples.",
            rationale="A non-finite loss poisons the optimizer state; results after it are not trustworthy.",
            confidence=0.9, scope="optimizer",
            evidence={"count": nan["count"], "steps": _steps(nan)}))
    exp = training.get("grad_explosions") or {}
    if exp.get("count"):
        # A jump in gradient norm is alarming when training degrades with it (non-finite losses, loss spikes,
        # a rising loss); when the loss kept improving it is usually the model starting to learn, so say so
        # at info level instead of raising a warning on a healthy run.
        trend = (training.get("loss_trend") or {}).get("direction")
        degraded = bool(nan.get("count") or (training.get("loss_spikes") or {}).get("count")
                        or trend == "increasing")
        gmax = finite(training.get("grad_norm_max"))
        factor = exp.get("factor", T.GRAD_EXPLOSION_FACTOR)
        tail = ("clip gradients (max_grad_norm) and/or lower the lr." if degraded else
                "the loss kept improving, so this is likely benign; clip gradients if it recurs with loss spikes.")
        recs.append(Recommendation(
            "warning" if degraded else "info", "grad_explosion",
            f"{exp['count']} gradient-norm explosion(s) (> {factor:g}x the running median; max "
            f"{'-' if gmax is None else format(gmax, '.3g')}): {tail}",
            rationale="Sudden gradient norms far above their recent level precede divergence when the loss "
                      "degrades with them.",
            confidence=0.7 if degraded else 0.4, scope="optimizer",
            evidence={"count": exp["count"], "steps": _steps(exp), "grad_norm_max": gmax, "factor": factor,
                      "loss_degraded": degraded}))
    spikes = training.get("loss_spikes") or {}
    if spikes.get("count"):
        recs.append(Recommendation(
            "warning", "loss_spikes",
            f"{spikes['count']} loss spike(s) (> {spikes.get('factor', T.LOSS_SPIKE_FACTOR):g}x the running "
            "median): check the data at those steps for outliers, and consider a lower lr or a longer warmup.",
            rationale="Isolated spikes usually come from bad batches; repeated spikes from a too-high lr.",
            confidence=0.6, scope="data",
            evidence={"count": spikes["count"], "steps": _steps(spikes), "factor": spikes.get("factor")}))
    return recs


def overfitting_rule(training: dict[str, Any]) -> list[Recommendation]:
    onset = training.get("overfitting_onset")
    if not onset:
        return []
    return [Recommendation(
        "warning", "early_stop_at",
        f"Test loss bottomed out at step {onset['best_step']} and rises from step {onset['onset_step']} while "
        f"train loss keeps falling: stop near step {onset['best_step']} (load_best_model_at_end or early "
        "stopping).",
        rationale="Falling train loss with rising held-out loss is the classic overfitting signature; later "
                  "checkpoints fit the training set at the expense of generalization.",
        confidence=0.6, scope="training",
        evidence=dict(onset))]


def run_recommendations(*, signals: dict[str, Any], training: dict[str, Any], audit: dict[str, Any] | None,
                        config: ConfigSnapshot | None, gap_threshold: float = T.GAP_THRESHOLD,
                        adapter_dir: str | None = None) -> list[Recommendation]:
    """All run rules, unsorted (the caller merges them with the check rules and dedupes/sorts)."""
    lr = _run_lr(config, training)
    return [
        *gap_rules(signals, lr, gap_threshold),
        *underfitting_rule(signals, audit),
        *audit_rules(audit, config, adapter_dir),
        *instability_rules(training),
        *overfitting_rule(training),
        *guard_recommendations(training.get("guard")),
        *signature_recommendations(training.get("failure_signatures")),
    ]
