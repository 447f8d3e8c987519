"""Each monitor rule (SPEC §6) on both sides of its threshold, from hand-made telemetry logs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gradience.monitor import monitor_run
from gradience.policy import thresholds as T
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig


def make_log(path: Path, *, lr: float | None = 5e-5, r: int | None = 8, train_ppl: float | None = None,
             test_ppl: float | None = None, test_acc: float | None = None, audit: dict[str, Any] | None = None,
             losses: list[float] | None = None, grads: list[float] | None = None,
             evals: list[tuple[int, str, float]] | None = None) -> Path:
    config = ConfigSnapshot(model_name="m", dataset_name="d", task_profile="generation",
                            optimizer=OptimizerConfig(name="adamw", lr=lr),
                            lora=LoraConfig(r=r, alpha=None if r is None else 2 * r,
                                            target_modules=["q_proj", "v_proj"]))
    with TelemetryWriter(path) as tw:
        tw.run_start(config)
        for i, loss in enumerate(losses or [], start=1):
            grad = grads[i - 1] if grads else None
            tw.train_step(i, loss=loss, grad_norm=grad, lr=lr)
        for step, split, loss in evals or []:
            tw.eval(step, split, {"loss": loss})
        if train_ppl is not None:
            tw.eval(100, "train", {"loss": math.log(train_ppl)})
        if test_ppl is not None:
            metrics: dict[str, Any] = {"loss": math.log(test_ppl)}
            if test_acc is not None:
                metrics["accuracy"] = test_acc
            tw.eval(100, "test", metrics)
        if audit is not None:
            tw.metrics("lora_audit", audit, step=100)
    return path


def actions(path: Path, **kwargs: Any) -> dict[str, Any]:
    return {r.action: r for r in monitor_run(path, **kwargs).recommendations}


# -- gap ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("test_ppl,fires", [(3.0, True), (2.98, False), (3.3, True)])
def test_memorization_gap_threshold_inclusive(tmp_path: Path, test_ppl: float, fires: bool) -> None:
    acts = actions(make_log(tmp_path / "r.jsonl", train_ppl=2.0, test_ppl=test_ppl))
    assert ("memorization_detected" in acts) == fires
    if fires:
        ev = acts["memorization_detected"].evidence
        assert ev["gap"] == pytest.approx(test_ppl / 2.0) and ev["threshold"] == T.GAP_THRESHOLD
        assert acts["memorization_detected"].severity == "warning"


def test_gap_threshold_option(tmp_path: Path) -> None:
    path = make_log(tmp_path / "r.jsonl", train_ppl=2.0, test_ppl=2.6)  # gap 1.3
    assert "memorization_detected" not in actions(path)
    assert "memorization_detected" in actions(path, gap_threshold=1.25)


@pytest.mark.parametrize("lr,fires", [(1e-4, True), (5e-5, False), (None, False)])
def test_lower_lr_only_with_a_gap_and_lr_above_conservative(tmp_path: Path, lr: float | None, fires: bool) -> None:
    acts = actions(make_log(tmp_path / "r.jsonl", lr=lr, train_ppl=2.0, test_ppl=4.0))
    assert ("lower_lr" in acts) == fires
    if fires:
        assert acts["lower_lr"].evidence == {"lr": lr, "suggested_lr": lr / 2, "gap": 2.0}  # halved (issue 18)
    no_gap = actions(make_log(tmp_path / "n.jsonl", lr=1e-4, train_ppl=2.0, test_ppl=2.0))
    assert "lower_lr" not in no_gap


@pytest.mark.parametrize("train,test,fires,missing", [
    (None, 2.0, True, ["train"]), (2.0, None, True, ["test"]), (None, None, True, ["train", "test"]),
    (2.0, 2.1, False, None)])
def test_gap_unavailable_asks_to_log_train_and_test(tmp_path: Path, train: float | None, test: float | None,
                                                    fires: bool, missing: list[str] | None) -> None:
    acts = actions(make_log(tmp_path / "r.jsonl", train_ppl=train, test_ppl=test))
    assert ("log_train_test_ppl" in acts) == fires
    if fires:
        assert acts["log_train_test_ppl"].severity == "info"
        assert acts["log_train_test_ppl"].evidence["missing_splits"] == missing


# -- underfitting ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("test_ppl,acc,sr,fires", [
    (2.2, 0.15, 1.5, True),    # gap 1.1 < 1.2, acc < 0.2, sr < 2
    (2.42, 0.15, 1.5, False),  # gap 1.21
    (2.2, 0.20, 1.5, False),   # acc at threshold
    (2.2, 0.15, 2.0, False),   # stable rank at threshold
])
def test_possible_underfitting(tmp_path: Path, test_ppl: float, acc: float, sr: float, fires: bool) -> None:
    audit = {"stable_rank_mean": sr, "utilization_mean": 0.5, "adapter": {"r": 4}}
    acts = actions(make_log(tmp_path / "r.jsonl", train_ppl=2.0, test_ppl=test_ppl, test_acc=acc, audit=audit))
    assert ("possible_underfitting" in acts) == fires


# -- audit-driven --------------------------------------------------------------------------------------------
def audit_summary(*, r: int = 16, util: float = 0.5, k90_p90: float = 12, sugg_med: int = 4, sugg_90: int = 8,
                  total: int = 1_000_000, by_type: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"stable_rank_mean": util * r, "utilization_mean": util, "energy_rank_90_p50": k90_p90 / 2,
            "energy_rank_90_p90": k90_p90, "suggested_r_global_median": sugg_med, "suggested_r_global_90": sugg_90,
            "total_lora_params": total, "n_layers": 10, "adapter": {"r": r}, "by_type": by_type or {}}


@pytest.mark.parametrize("util,r,fires", [(0.24, 16, True), (0.25, 16, False), (0.10, 8, False),
                                          (0.10, 32, True)])
def test_low_utilization(tmp_path: Path, util: float, r: int, fires: bool) -> None:
    acts = actions(make_log(tmp_path / "x.jsonl", audit=audit_summary(r=r, util=util, k90_p90=r)))
    assert ("low_utilization" in acts) == fires


@pytest.mark.parametrize("util,k90,r,fires", [
    (0.5, 8, 16, True),     # k90_p90 <= r/2
    (0.5, 9, 16, False),    # k90_p90 > r/2 and util ok
    (0.2, 16, 16, True),    # util < 0.25
    (0.2, 4, 8, False),     # r < 16
])
def test_compress_rank(tmp_path: Path, util: float, k90: float, r: int, fires: bool) -> None:
    audit = audit_summary(r=r, util=util, k90_p90=k90, sugg_med=4, sugg_90=min(8, r), total=1_000_000)
    acts = actions(make_log(tmp_path / "x.jsonl", audit=audit))
    assert ("compress_rank" in acts) == fires
    if fires:
        rec = acts["compress_rank"]
        # params scale linearly with r: at r=8 of 16 the saving is half of the 1M LoRA params
        assert rec.evidence["suggested_r_global_90"] == 8 and rec.evidence["params_saved"] == 500_000
        assert rec.evidence["reduction_ratio"] == pytest.approx(0.5)
        assert "r=8" in rec.message and "500.0K" in rec.message


def test_compress_rank_prefers_the_audits_own_figures(tmp_path: Path) -> None:
    audit = audit_summary(r=16, util=0.1, k90_p90=4, sugg_90=4)
    audit["global_rank_suggestions"] = {"p90": {"r": 4, "params_at_suggested": 300_000, "params_saved": 700_000,
                                                "reduction_ratio": 0.7}}
    rec = actions(make_log(tmp_path / "x.jsonl", audit=audit))["compress_rank"]
    assert rec.evidence["params_saved"] == 700_000 and rec.evidence["reduction_ratio"] == 0.7


def test_compress_rank_not_when_suggestion_is_not_smaller(tmp_path: Path) -> None:
    audit = audit_summary(r=16, util=0.1, k90_p90=16, sugg_90=16)
    assert "compress_rank" not in actions(make_log(tmp_path / "x.jsonl", audit=audit))


@pytest.mark.parametrize("mlp,attn,fires", [(0.05, 0.10, True), (0.05, 0.099, False), (0.10, 0.5, False),
                                            (0.0999, 0.3, True)])
def test_compress_mlp_targets(tmp_path: Path, mlp: float, attn: float, fires: bool) -> None:
    by_type = {"attn": {"utilization_mean": attn, "n_layers": 4}, "mlp": {"utilization_mean": mlp, "n_layers": 4}}
    acts = actions(make_log(tmp_path / "x.jsonl", audit=audit_summary(r=8, by_type=by_type)))
    assert ("compress_mlp_targets" in acts) == fires


# -- instability -----------------------------------------------------------------------------------------------
def test_nan_loss(tmp_path: Path) -> None:
    losses = [1.0] * 10 + [float("nan"), float("inf")] + [1.0] * 3
    rec = actions(make_log(tmp_path / "a.jsonl", losses=losses))["nan_loss"]
    assert rec.severity == "error" and rec.evidence == {"count": 2, "steps": [11, 12]}
    assert "nan_loss" not in actions(make_log(tmp_path / "b.jsonl", losses=[1.0] * 15))


@pytest.mark.parametrize("factor,fires", [(T.LOSS_SPIKE_FACTOR * 1.05, True), (T.LOSS_SPIKE_FACTOR * 0.95, False)])
def test_loss_spikes(tmp_path: Path, factor: float, fires: bool) -> None:
    losses = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.05, 0.95] + [factor * 1.0] + [1.0] * 5  # median before = 1.0
    acts = actions(make_log(tmp_path / "a.jsonl", losses=losses))
    assert ("loss_spikes" in acts) == fires
    if fires:
        assert acts["loss_spikes"].evidence["steps"] == [9]


@pytest.mark.parametrize("factor,fires", [(T.GRAD_EXPLOSION_FACTOR * 1.05, True),
                                          (T.GRAD_EXPLOSION_FACTOR * 0.95, False)])
def test_grad_explosion(tmp_path: Path, factor: float, fires: bool) -> None:
    grads = [2.0] * 10 + [2.0 * factor] + [2.0] * 3
    acts = actions(make_log(tmp_path / "a.jsonl", losses=[1.0] * 14, grads=grads))
    assert ("grad_explosion" in acts) == fires
    if fires:
        assert acts["grad_explosion"].evidence["steps"] == [11]
        # the loss stayed flat: a benign jump is reported at info level
        assert acts["grad_explosion"].severity == "info"


@pytest.mark.parametrize("losses,severity", [
    ([1.0] * 11 + [float("nan")] * 3, "warning"),          # followed by NaN losses
    ([1.0] * 11 + [5.0] + [1.0] * 2, "warning"),           # with a loss spike
    ([1.0 + 0.05 * i for i in range(14)], "warning"),      # loss rising
    ([1.0 - 0.03 * i for i in range(14)], "info"),         # loss improving: likely benign
])
def test_grad_explosion_severity_follows_the_loss(tmp_path: Path, losses: list[float], severity: str) -> None:
    grads = [1.0] * 10 + [50.0] + [1.0] * 3
    rec = actions(make_log(tmp_path / "a.jsonl", losses=losses, grads=grads))["grad_explosion"]
    assert rec.severity == severity and rec.evidence["loss_degraded"] == (severity == "warning")


def test_spike_needs_history(tmp_path: Path) -> None:
    # a huge loss at step 3 has fewer than RUNNING_MEDIAN_MIN_HISTORY earlier values: not judged
    losses = [1.0, 1.0, 50.0] + [1.0] * 10
    assert T.RUNNING_MEDIAN_MIN_HISTORY > 2
    assert "loss_spikes" not in actions(make_log(tmp_path / "a.jsonl", losses=losses))


# -- overfitting onset -----------------------------------------------------------------------------------------
def test_early_stop_at_when_test_rises_while_train_falls(tmp_path: Path) -> None:
    evals = []
    for step, (tr, te) in zip(range(10, 70, 10), [(1.0, 1.2), (0.8, 1.0), (0.6, 0.9), (0.5, 0.95), (0.4, 1.0),
                                                  (0.3, 1.1)], strict=True):
        evals += [(step, "train", tr), (step, "test", te)]
    rec = actions(make_log(tmp_path / "a.jsonl", evals=evals))["early_stop_at"]
    assert rec.evidence["best_step"] == 30 and rec.evidence["onset_step"] == 40
    assert rec.evidence["train_basis"] == "train_eval"


def test_no_early_stop_when_train_rises_too_or_test_recovers(tmp_path: Path) -> None:
    both_rise = [(10, "train", 0.5), (10, "test", 0.9), (20, "train", 0.6), (20, "test", 1.0),
                 (30, "train", 0.7), (30, "test", 1.1)]
    assert "early_stop_at" not in actions(make_log(tmp_path / "a.jsonl", evals=both_rise))
    recovered = [(10, "train", 0.9), (10, "test", 1.0), (20, "train", 0.8), (20, "test", 1.1),
                 (30, "train", 0.7), (30, "test", 0.95)]
    assert "early_stop_at" not in actions(make_log(tmp_path / "b.jsonl", evals=recovered))
    small_rise = [(10, "train", 0.9), (10, "test", 1.0), (20, "train", 0.8), (20, "test", 1.005),
                  (30, "train", 0.7), (30, "test", 1.009)]  # below OVERFIT_MIN_RISE
    assert "early_stop_at" not in actions(make_log(tmp_path / "c.jsonl", evals=small_rise))


def test_early_stop_with_only_test_evals_uses_train_step_losses(tmp_path: Path) -> None:
    losses = [2.0 - 0.015 * i for i in range(100)]  # train loss falls steadily
    evals = [(20, "test", 1.5), (40, "test", 1.2), (60, "test", 1.3), (80, "test", 1.4), (100, "test", 1.5)]
    rec = actions(make_log(tmp_path / "a.jsonl", losses=losses, evals=evals))["early_stop_at"]
    assert (rec.evidence["best_step"], rec.evidence["onset_step"]) == (40, 60)
    assert rec.evidence["train_basis"] == "train_step"
    flat = [1.0] * 100
    assert "early_stop_at" not in actions(make_log(tmp_path / "b.jsonl", losses=flat, evals=evals))


def test_recommendations_are_deduped_and_sorted_by_severity_then_action(tmp_path: Path) -> None:
    losses = [1.0] * 10 + [float("nan")] + [1.0] * 10 + [10.0]
    report = monitor_run(make_log(tmp_path / "a.jsonl", lr=3e-4, losses=losses, train_ppl=2.0, test_ppl=4.0,
                                  audit=audit_summary(r=32, util=0.1, k90_p90=4)))
    recs = [(r.severity, r.action) for r in report.recommendations]
    rank = {"critical": 3, "error": 2, "warning": 1, "info": 0}
    assert recs == sorted(recs, key=lambda x: (-rank[x[0]], x[1]))
    assert len({a for _, a in recs}) == len(recs)
    assert recs[0] == ("error", "nan_loss")
    assert {"memorization_detected", "lower_lr", "loss_spikes", "low_utilization", "compress_rank"} <= \
        {a for _, a in recs}


# -- run-failure signatures (issue 18 item 5), constructed logs ------------------------------------------------
def signature_log(path: Path, steps: list[dict[str, Any]], *, max_grad_norm: float | None = None,
                  framework: str | None = None, evals: list[tuple[int, str, float]] = ()) -> Path:
    extras = {} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}
    config = ConfigSnapshot(model_name="m", dataset_name="d", task_profile="generation",
                            optimizer=OptimizerConfig(name="adamw", lr=2e-4),
                            lora=LoraConfig(r=8, alpha=16, target_modules=["all-linear"]))
    config.training.extras.update(extras)
    with TelemetryWriter(path) as tw:
        tw.run_start(config, meta={"framework": framework} if framework else {})
        for i, fields in enumerate(steps, start=1):
            tw.train_step(i, **fields)
        for step, split, loss in evals:
            tw.eval(step, split, {"loss": loss})
    return path


def test_loss_exactly_zero_with_a_nonfinite_grad_norm(tmp_path: Path) -> None:
    steps = [{"loss": 0.7, "grad_norm": 1.0}] * 3 + [{"loss": 0.0, "grad_norm": math.nan},
                                                      {"loss": 0.0, "grad_norm": math.inf}]
    rec = actions(signature_log(tmp_path / "a.jsonl", steps))["nan_loss_logged_as_zero"]
    assert rec.severity == "error" and rec.evidence == {"count": 2, "steps": [4, 5]}
    assert "logging_nan_inf_filter" in (rec.source or "")
    # A real zero loss (finite gradient) and a NaN gradient beside a non-zero loss are not this signature.
    quiet = [{"loss": 0.0, "grad_norm": 0.5}, {"loss": 0.3, "grad_norm": math.nan}]
    assert "nan_loss_logged_as_zero" not in actions(signature_log(tmp_path / "b.jsonl", quiet))


@pytest.mark.parametrize(("run", "fires"), [(T.CLIP_SATURATED_WINDOW, True), (T.CLIP_SATURATED_WINDOW - 1, False)])
def test_clipping_saturated_needs_a_full_window(tmp_path: Path, run: int, fires: bool) -> None:
    # Pre-clip norms at or above the limit (HF logs those); one step below it breaks the run.
    grads = [0.5, 0.5] + [1.0 + 0.1 * i for i in range(run)] + [0.9]
    path = signature_log(tmp_path / "c.jsonl", [{"loss": 1.0, "grad_norm": g} for g in grads], max_grad_norm=1.0)
    acts = actions(path)
    assert ("clipping_saturated" in acts) == fires
    if fires:
        ev = acts["clipping_saturated"].evidence
        assert ev["first_window"] == {"from_step": 3, "to_step": 2 + run, "steps": run}
        assert ev["max_grad_norm"] == 1.0 and ev["max_grad_norm_source"] == "config"


def test_clipping_pinned_at_the_limit_and_the_hf_default(tmp_path: Path) -> None:
    # A post-clip logger: the norm sits at max_grad_norm (to rounding) on every step.
    pinned = [{"loss": 1.0, "grad_norm": 0.3 * (1 - 1e-9)}] * T.CLIP_SATURATED_WINDOW
    assert "clipping_saturated" in actions(signature_log(tmp_path / "p.jsonl", pinned, max_grad_norm=0.3))
    # No max_grad_norm logged: an HF run uses transformers' default 1.0; another loop's limit is unknown.
    over = [{"loss": 1.0, "grad_norm": 2.0}] * T.CLIP_SATURATED_WINDOW
    hf = actions(signature_log(tmp_path / "hf.jsonl", over, framework="transformers"))["clipping_saturated"]
    assert hf.evidence["max_grad_norm_source"] == "transformers default"
    assert "clipping_saturated" not in actions(signature_log(tmp_path / "x.jsonl", over))


@pytest.mark.parametrize(("run", "fires"), [(T.FROZEN_GRAD_WINDOW, True), (T.FROZEN_GRAD_WINDOW - 1, False)])
def test_frozen_adapter(tmp_path: Path, run: int, fires: bool) -> None:
    grads = [0.0] * run + [1e-12]   # a tiny non-zero norm is a gradient: it breaks the run
    acts = actions(signature_log(tmp_path / "f.jsonl", [{"loss": 0.69, "grad_norm": g} for g in grads]))
    assert ("frozen_adapter" in acts) == fires
    if fires:
        assert acts["frozen_adapter"].severity == "error"
        assert acts["frozen_adapter"].evidence["first_window"] == {"from_step": 1, "to_step": run, "steps": run}


def test_lr_zero_after_warmup(tmp_path: Path) -> None:
    warm = [{"loss": 1.0, "lr": lr} for lr in (0.0, 1e-4, 2e-4)]      # a warmup that starts at 0 is fine
    stuck = [*warm, *[{"loss": 1.0, "lr": 0.0}] * 3]
    rec = actions(signature_log(tmp_path / "s.jsonl", stuck))["lr_zero_after_warmup"]
    assert rec.severity == "warning" and rec.evidence == {"first_zero_step": 4, "steps_logged_after": 2}
    # A linear schedule reaching 0 at its last step, and a warmup from 0, are not the signature.
    ends = [*warm, {"loss": 1.0, "lr": 1e-4}, {"loss": 1.0, "lr": 0.0}]
    assert "lr_zero_after_warmup" not in actions(signature_log(tmp_path / "e.jsonl", ends))
    assert "lr_zero_after_warmup" not in actions(signature_log(tmp_path / "w.jsonl", warm))


def test_eval_loss_nan_while_train_loss_is_finite(tmp_path: Path) -> None:
    steps = [{"loss": 0.7}] * 4
    rec = actions(signature_log(tmp_path / "n.jsonl", steps, evals=[(2, "test", 0.6), (4, "test", math.nan)]))
    assert rec["eval_loss_nan"].severity == "error"
    assert rec["eval_loss_nan"].evidence == {"count": 1, "steps": [4], "split": "test"}
    # A NaN train-split eval, or a NaN eval of a run whose train loss was never finite, is another finding.
    assert "eval_loss_nan" not in actions(signature_log(tmp_path / "t.jsonl", steps, evals=[(4, "train", math.nan)]))
    nan_train = [{"loss": math.nan}] * 4
    assert "eval_loss_nan" not in actions(signature_log(tmp_path / "u.jsonl", nan_train,
                                                        evals=[(4, "test", math.nan)]))


def test_signatures_set_the_run_status(tmp_path: Path) -> None:
    report = monitor_run(signature_log(tmp_path / "z.jsonl", [{"loss": 0.7, "grad_norm": 0.0}] * 6))
    assert report.status["overall"] == "error"
    assert {"source": "analysis", "code": "frozen_adapter", "severity": "error"} in report.status["findings"]


# -- the same signatures from real Trainer runs (tiny DistilBERT + LoRA, CPU, a few steps each) ---------------
def _trainer_run(tmp_path: Path, case: str) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from test_integration_callback import build_parts, make_trainer  # the shared tiny Trainer setup

    parts = build_parts()
    cb = GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))
    kw: dict[str, Any] = {"logging_steps": 1, "eval_strategy": "no", "max_steps": 6}
    if case == "clipping_saturated":
        kw.update(max_steps=T.CLIP_SATURATED_WINDOW + 2, max_grad_norm=1e-6)   # every step is clipped
    if case == "eval_loss_nan":   # every eval label masked: CrossEntropyLoss averages over no items
        kw.update(eval_strategy="steps", eval_steps=3,
                  eval_dataset=[{**row, "labels": -100} for row in parts["test"]])
    trainer = make_trainer(parts, tmp_path, [cb], **kw)
    model = trainer.model
    if case == "nan_loss_logged_as_zero":   # NaN activations: every step's loss is NaN, the filter logs 0
        model.base_model.model.distilbert.embeddings.register_forward_hook(
            lambda mod, inp, out: out * float("nan") if mod.training else None)
    if case == "frozen_adapter":   # only the LoRA factors train, and A = B = 0: no gradient reaches them
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_A" in name:
                torch.nn.init.zeros_(param)
    if case == "lr_zero_after_warmup":   # a schedule built for 3 steps in a 6-step run
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / 3))
        trainer.optimizer, trainer.lr_scheduler = opt, sched
    trainer.train()
    return tmp_path / "run.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan_loss_logged_as_zero", "clipping_saturated", "frozen_adapter",
                                  "lr_zero_after_warmup", "eval_loss_nan"])
def test_signature_reproduced_by_a_real_trainer_run(tmp_path: Path, case: str) -> None:
    report = monitor_run(_trainer_run(tmp_path, case))
    found = {r.action: r for r in report.recommendations}
    assert case in found, sorted(found)
    assert found[case].severity in ("warning", "error") and report.status["overall"] != "ok"
    others = set(found) & {"nan_loss_logged_as_zero", "clipping_saturated", "frozen_adapter",
                           "lr_zero_after_warmup", "eval_loss_nan"}
    assert others == {case}, others   # each run shows its own signature only


def test_signature_ids_work_as_fail_on_gates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.cli.main import main

    frozen = signature_log(tmp_path / "g.jsonl", [{"loss": 0.7, "grad_norm": 0.0}] * 6)
    assert main(["monitor", str(frozen), "--fail-on", "frozen_adapter"]) == 1
    assert main(["monitor", str(frozen), "--fail-on", "clipping_saturated,eval_loss_nan"]) == 0
    _, err = capsys.readouterr()
    assert "frozen_adapter" in err


def test_verbose_text_cites_the_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.cli.main import main
    from gradience.policy import sources as S

    zero = signature_log(tmp_path / "v.jsonl", [{"loss": 0.0, "grad_norm": math.nan}] * 2)
    main(["monitor", str(zero), "--verbose"])
    out = capsys.readouterr().out
    block = out[out.index("nan_loss_logged_as_zero:"):]
    assert f"      source: {S.HF_TRAINER}" in block.splitlines()[:4]
