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
        assert acts["lower_lr"].evidence == {"lr": lr, "suggested_lr": T.LR_CONSERVATIVE, "gap": 2.0}
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
