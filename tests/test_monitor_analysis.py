"""Run analysis checked against independent computations (numpy fits, brute-force running medians)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.monitor import monitor_run
from gradience.monitor.analysis import RunAnalyzer, TrainStepAnalyzer, _Thinned, accuracy_from, ppl_from
from gradience.policy import thresholds as T
from gradience.telemetry import SCHEMA, TelemetryWriter


def feed_losses(losses: list[float], grads: list[float] | None = None,
                lrs: list[float] | None = None) -> TrainStepAnalyzer:
    an = TrainStepAnalyzer()
    for i, loss in enumerate(losses):
        data: dict[str, float] = {"loss": loss}
        if grads is not None:
            data["grad_norm"] = grads[i]
        if lrs is not None:
            data["lr"] = lrs[i]
        an.feed(i + 1, data)
    return an


def reference_outliers(values: list[float], factor: float) -> list[int]:
    """Brute force: value > factor x median of the previous WINDOW finite values (>= MIN_HISTORY of them)."""
    out, history = [], []
    for i, v in enumerate(values, start=1):
        if not math.isfinite(v):
            continue
        window = history[-T.LOSS_SPIKE_WINDOW:]
        if len(window) >= T.RUNNING_MEDIAN_MIN_HISTORY:
            med = statistics.median(window)
            if med > 0 and v > factor * med:
                out.append(i)
        history.append(v)
    return out


def test_spikes_and_explosions_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    losses = list(np.exp(rng.normal(0.0, 0.5, size=600)))
    grads = list(np.exp(rng.normal(0.0, 1.0, size=600)))
    for i in (50, 51, 300, 599):
        losses[i] *= 8.0
        grads[i] *= 40.0
    losses[100] = float("nan")
    an = feed_losses(losses, grads=grads)
    s = an.summary()
    ref_spikes = reference_outliers(losses, T.LOSS_SPIKE_FACTOR)
    ref_expl = reference_outliers(grads, T.GRAD_EXPLOSION_FACTOR)
    assert ref_spikes and ref_expl
    assert s["loss_spikes"]["count"] == len(ref_spikes)
    assert [x["step"] for x in s["loss_spikes"]["listed"]] == ref_spikes[:50]
    assert s["grad_explosions"]["count"] == len(ref_expl)
    assert [x["step"] for x in s["grad_explosions"]["listed"]] == ref_expl[:50]
    assert s["nonfinite_loss"] == {"count": 1, "listed": [{"step": 101, "value": "NaN"}]}
    finite = [x for x in losses if math.isfinite(x)]
    assert s["min_loss"] == min(finite) and s["min_loss_step"] == losses.index(min(finite)) + 1
    assert s["grad_norm_max"] == max(grads) and s["last_loss"] == losses[-1]
    assert (s["steps_logged"], s["first_step"], s["last_step"]) == (600, 1, 600)


def test_loss_trend_matches_least_squares_fit() -> None:
    rng = np.random.default_rng(1)
    steps = np.arange(1, 201)
    losses = 3.0 * np.exp(-steps / 80.0) + rng.normal(0, 0.01, size=steps.size)
    trend = feed_losses(list(losses)).trend()
    assert trend is not None
    xs, ys = steps[-T.LOSS_TREND_WINDOW:], losses[-T.LOSS_TREND_WINDOW:]
    slope = np.polyfit(xs, ys, 1)[0]
    assert trend["slope_per_step"] == pytest.approx(slope, rel=1e-9)
    assert trend["relative_change"] == pytest.approx(slope * (xs[-1] - xs[0]) / ys.mean(), rel=1e-9)
    assert trend["direction"] == "decreasing" and trend["from_step"] == 181 and trend["to_step"] == 200
    assert feed_losses([1.0] * 30).trend()["direction"] == "flat"  # type: ignore[index]
    assert feed_losses([1.0 + 0.01 * i for i in range(30)]).trend()["direction"] == "increasing"  # type: ignore[index]
    assert feed_losses([1.0, 2.0]).trend() is None


@pytest.mark.parametrize("lrs,shape", [
    ([1e-5 * min(i, 10) for i in range(1, 11)] + [1e-4 * (1 - i / 20) for i in range(20)], "warmup+decay"),
    ([5e-5] * 20, "constant"),
    ([1e-4 * (1 - i / 20) for i in range(20)], "decay"),
    ([1e-5 * i for i in range(1, 21)], "warmup"),
])
def test_lr_schedule_shapes(lrs: list[float], shape: str) -> None:
    sched = feed_losses([1.0] * len(lrs), lrs=lrs).lr_schedule()
    assert sched is not None and sched["shape"] == shape
    assert sched["peak"] == max(lrs) and sched["first"] == lrs[0] and sched["last"] == lrs[-1]
    assert sched["peak_step"] == lrs.index(max(lrs)) + 1


def test_thinned_history_stays_bounded_and_evenly_spaced() -> None:
    hist = _Thinned(capacity=64)
    for i in range(100_000):
        hist.add((i, float(i)))
    assert len(hist.items) < 64
    gaps = {b[0] - a[0] for a, b in zip(hist.items, hist.items[1:], strict=False)}
    assert len(gaps) == 1 and hist.items[0][0] == 0


def test_ppl_and_accuracy_helpers() -> None:
    assert ppl_from({"loss": 0.5}) == pytest.approx(math.exp(0.5))
    assert ppl_from({"loss": 0.5, "ppl": 7.0}) == 7.0
    assert ppl_from({"loss": 1e6}) == math.inf
    assert ppl_from({"accuracy": 0.5}) is None and ppl_from({"loss": float("nan")}) is None
    assert accuracy_from({"accuracy": 0.688}) == 0.688 and accuracy_from({"accuracy": 68.8}) == pytest.approx(0.688)
    assert accuracy_from({"acc": True}) is None and accuracy_from({}) is None


def test_signals_gap_and_test_split_fallback() -> None:
    an = RunAnalyzer("r")
    an.feed("eval", 10, {"split": "train", "metrics": {"loss": math.log(1.88), "accuracy": 0.688}})
    an.feed("eval", 10, {"split": "eval", "metrics": {"loss": math.log(2.04), "accuracy": 0.5}})
    s = an.signals(1.5)
    assert s["test_split"] == "eval" and s["test_split_fallback"] is True
    assert s["gap"] == pytest.approx(2.04 / 1.88) and s["train_ppl"] == pytest.approx(1.88)
    assert s["test"]["ppl_derived_from_loss"] is True
    an.feed("eval", 20, {"split": "validation", "metrics": {"loss": 1.0}})
    an.feed("eval", 20, {"split": "test", "metrics": {"loss": math.log(3.76), "ppl": 3.76}})
    s = an.signals(1.5)
    assert s["test_split"] == "test" and not s["test_split_fallback"] and s["gap"] == pytest.approx(2.0)
    only_val = RunAnalyzer(None)
    only_val.feed("eval", 1, {"split": "validation", "metrics": {"loss": 1.0}})
    assert only_val.signals(1.5)["test_split"] == "validation" and only_val.signals(1.5)["gap"] is None


def test_latest_eval_wins_and_alert_metadata_is_read() -> None:
    an = RunAnalyzer("r")
    an.feed("eval", 1, {"split": "test", "metrics": {"loss": 2.0}})
    an.feed("eval", 2, {"split": "test", "metrics": {"loss": 1.0}})
    assert an.signals(1.5)["test"]["step"] == 2
    an.feed("alert", 3, {"severity": "warning", "code": "guard_rollback", "message": "rolled back",
                         "metadata": {"reason": "nan"}})
    an.feed("alert", 4, {"severity": "warning", "code": "guard_rollback", "message": "again",
                         "context": {"reason": "inf"}})
    an.feed("alert", 5, {"severity": "critical", "code": "diverged", "message": "x"})
    alerts = an.alerts()
    assert alerts["total"] == 3
    assert [(g["severity"], g["code"], g["count"]) for g in alerts["groups"]] == [
        ("critical", "diverged", 1), ("warning", "guard_rollback", 2)]
    assert alerts["groups"][1]["first_step"] == 3 and alerts["groups"][1]["context"] == {"reason": "inf"}


def _write_runs(path: Path) -> tuple[str, str]:
    with TelemetryWriter(path) as a:
        a.run_start({"model_name": "first"})
        a.train_step(1, loss=5.0)
    with TelemetryWriter(path) as b:
        b.run_start({"model_name": "second"})
        b.train_step(1, loss=3.0)
        b.train_step(2, loss=2.0)
    return a.run_id, b.run_id


def test_multi_run_files_default_to_the_last_run(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    first, second = _write_runs(path)
    report = monitor_run(path)
    assert report.runs == [first, second] and report.run_id == second
    assert report.config is not None and report.config.model_name == "second"
    assert report.training["steps_logged"] == 2 and report.training["last_loss"] == 2.0
    chosen = monitor_run(path, run_id=first)
    assert chosen.run_id == first and chosen.training["last_loss"] == 5.0 and chosen.training["steps_logged"] == 1
    with pytest.raises(InputError, match="no run with id 'nope'"):
        monitor_run(path, run_id="nope")


def test_audit_appended_later_is_part_of_the_last_run(tmp_path: Path) -> None:
    from gradience.telemetry import append_metrics_event

    path = tmp_path / "runs.jsonl"
    _first, second = _write_runs(path)
    append_metrics_event(path, "lora_audit", {"stable_rank_mean": 2.0, "utilization_mean": 0.25,
                                              "adapter": {"r": 8}})
    report = monitor_run(path)
    assert report.run_id == second and report.audit is not None
    assert report.audit["stable_rank_mean"] == 2.0 and report.audit["step"] == 2 and report.audit["r"] == 8


def test_original_tool_log_by_hand(tmp_path: Path) -> None:
    """Lines as the original tool wrote them: bare NaN, eval split 'eval' without ppl, guard alerts."""
    lines = [
        '{"schema": "@S", "ts": 1.0, "run_id": "orig", "event": "run_start", "step": null, '
        '"config": {"model_name": "gpt2", "dataset_name": "wikitext", "task_profile": "generation", '
        '"optimizer": {"name": "adamw", "lr": 0.0001}, "lora": {"r": 8, "alpha": 16}}, "meta": {}}',
        '{"schema": "@S", "ts": 2.0, "run_id": "orig", "event": "train_step", "step": 1, "loss": 2.0}',
        '{"schema": "@S", "ts": 3.0, "run_id": "orig", "event": "train_step", "step": 2, "loss": NaN}',
        '{"schema": "@S", "ts": 4.0, "run_id": "orig", "event": "eval", "step": 2, "split": "eval", '
        '"metrics": {"loss": 1.5, "n": 32}}',
        '{"schema": "@S", "ts": 5.0, "run_id": "orig", "event": "alert", "step": 2, "severity": "warning", '
        '"code": "guard_nan", "message": "NaN loss", "metadata": {"action": "rollback"}}',
        '{"schema": "@S", "ts": 6.0, "run_id": "orig", "event": "run_end", "step": 2, "status": "ok"}',
    ]
    lines = [x.replace("@S", SCHEMA) for x in lines]
    path = tmp_path / "orig.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = monitor_run(path)
    assert report.telemetry_issues == []
    assert report.signals["test_split"] == "eval" and report.signals["test_ppl"] == pytest.approx(math.exp(1.5))
    assert report.training["nonfinite_loss"]["count"] == 1 and report.training["status"] == "ok"
    assert report.training["duration_s"] == 5.0
    assert report.alerts["groups"][0]["context"] == {"action": "rollback"}
    assert {r.action for r in report.recommendations} >= {"nan_loss", "log_train_test_ppl"}
