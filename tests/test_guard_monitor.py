"""``gradience monitor`` on guarded runs and on runs whose NaNs HF's logging filter hid (SPEC §16, §6)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["monitor", *args])
    out, _ = capsys.readouterr()
    return rc, out


def monitor_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    rc, out = run_cli(capsys, str(path), "--json")
    assert rc == 0
    return json.loads(out)


def recs(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["action"]: r for r in data["recommendations"]}


def hf_log(path: Path, *, nan_filter: bool | None, steps: dict[int, tuple[float, float]],
           n: int = 20, guard_events: list[dict[str, Any]] = (), end: tuple[str, str | None] = ("ok", None)) -> Path:
    """A callback-style log: ``steps`` overrides (loss, grad_norm) at some steps."""
    meta: dict[str, Any] = {"source": "gradience.integrations.hf"}
    if nan_filter is not None:
        meta["logging_nan_inf_filter"] = nan_filter
    if guard_events:
        meta["guard"] = {"snapshot_every": 2, "ring": 2, "spike_factor": 5.0, "lr_factor": 0.5,
                         "max_rollbacks": 3, "window": 100, "loss_source": "step"}
    by_step = {e["step"]: e for e in guard_events}
    with TelemetryWriter(path) as tw:
        tw.run_start(ConfigSnapshot(model_name="m"), meta)
        for s in range(1, n + 1):
            loss, grad = steps.get(s, (1.0 - 0.01 * s, 0.5))
            tw.train_step(s, loss=loss, grad_norm=grad, lr=1e-3)
            if s in by_step:
                e = by_step[s]
                tw.alert("critical" if e["action"] == "abort" else "warning",
                         "guard_abort" if e["action"] == "abort" else "guard_rollback", "guard acted",
                         context=e, step=s)
                tw.metrics("guard", e, step=s)
        tw.run_end(end[0], reason=end[1], step=n)
    return path


def test_nan_grad_with_finite_loss_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = hf_log(tmp_path / "run.jsonl", nan_filter=True, steps={5: (0.0, math.nan), 9: (0.7, math.inf)})
    data = monitor_json(capsys, path)
    g = data["training"]["guard"]
    assert g["nan_hidden"] == {"count": 2, "steps": [5, 9], "handled_by_guard": 0}
    assert g["logging_nan_inf_filter"] is True and g["enabled"] is False
    rec = recs(data)["nan_hidden_by_logging_filter"]
    assert rec["severity"] == "warning" and rec["evidence"]["steps"] == [5, 9]
    assert "logging_nan_inf_filter=False" in rec["message"] and "guard=True" in rec["message"]
    # The run's loss curve itself looks clean: no nan_loss finding.
    assert "nan_loss" not in recs(data)
    _rc, out = run_cli(capsys, str(path))
    lines = out.splitlines()
    i = lines.index("Guard:")
    assert lines[i + 1] == ("  NaN hidden by logging filter: 2 step(s) with a NaN/Inf grad norm and a finite "
                            "logged loss")
    assert "nan_hidden_by_logging_filter" in out
    assert run_cli(capsys, str(path), "--fail-on", "nan_hidden_by_logging_filter")[0] == 1


def test_filter_setting_alone_with_nan_grad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Loss and grad norm both NaN: nothing hidden in this log line, but the run says the filter was on.
    on = hf_log(tmp_path / "on.jsonl", nan_filter=True, steps={4: (math.nan, math.nan)})
    rec = recs(monitor_json(capsys, on))["nan_hidden_by_logging_filter"]
    assert rec["evidence"]["nonfinite_grad_norm_steps"] == 1 and rec["evidence"]["steps_with_hidden_nan"] == 0
    off = hf_log(tmp_path / "off.jsonl", nan_filter=False, steps={4: (math.nan, math.nan)})
    data = monitor_json(capsys, off)
    assert "nan_hidden_by_logging_filter" not in recs(data) and "nan_loss" in recs(data)
    clean = hf_log(tmp_path / "clean.jsonl", nan_filter=True, steps={})
    data = monitor_json(capsys, clean)
    assert "nan_hidden_by_logging_filter" not in recs(data)
    _rc, out = run_cli(capsys, str(clean))
    assert "Guard:" not in out  # no guard, nothing hidden: no block


def test_trainer_state_json_without_the_callback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = [{"step": s, "loss": 0.9, "grad_norm": float("nan") if s == 6 else 0.4, "learning_rate": 1e-4,
                "epoch": s / 10} for s in range(2, 12, 2)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))  # bare NaN, as HF writes
    data = monitor_json(capsys, tmp_path / "trainer_state.json")
    rec = recs(data)["nan_hidden_by_logging_filter"]
    assert rec["evidence"]["steps"] == [6] and "(on by default)" in rec["message"]


def test_guard_actions_block_and_abort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        {"action": "rollback", "step": 7, "trigger": "nonfinite_grad_norm", "restored_step": 6, "new_lr": 5e-4,
         "lr_scale": 0.5, "loss": None, "grad_norm": math.nan},
        {"action": "rollback", "step": 9, "trigger": "loss_spike", "restored_step": 8, "new_lr": 2.5e-4,
         "lr_scale": 0.25, "loss": 9.0, "grad_norm": 1.0},
        {"action": "abort", "step": 10, "trigger": "loss_spike", "restored_step": 8, "new_lr": None,
         "lr_scale": 0.25, "loss": 8.0, "grad_norm": 1.0},
    ]
    path = hf_log(tmp_path / "run.jsonl", nan_filter=True, n=10, steps={7: (0.0, math.nan)},
                  guard_events=events, end=("aborted", "guard: loss spike at step 10 after 2 rollback(s)"))
    data = monitor_json(capsys, path)
    g = data["training"]["guard"]
    assert g["enabled"] and g["rollbacks"] == 2 and g["aborted"] is True
    assert g["by_trigger"] == {"loss_spike": 2, "nonfinite_grad_norm": 1}
    assert [a["step"] for a in g["actions"]["listed"]] == [7, 9, 10] and g["lr_scale"] == 0.25
    assert g["nan_hidden"] == {"count": 1, "steps": [7], "handled_by_guard": 1}
    r = recs(data)
    assert r["guard_aborted"]["severity"] == "error" and "guard_rollbacks" not in r
    assert r["nan_hidden_by_logging_filter"]["severity"] == "info"  # the guard rolled that step back
    assert "guard rolled those steps back" in r["nan_hidden_by_logging_filter"]["message"]
    _rc, out = run_cli(capsys, str(path))
    lines = out.splitlines()
    i = lines.index("Guard:")
    assert lines[i + 1].startswith("  Settings: snapshot every 2 steps (ring 2), spike > 5x median, lr x0.5")
    assert lines[i + 2] == "  Rollbacks: 2; stopped training (aborted)"
    assert lines[i + 3:i + 6] == [
        "    step 7: rollback on nonfinite_grad_norm, restored step 6, lr -> 0.0005",
        "    step 9: rollback on loss_spike, restored step 8, lr -> 0.00025",
        "    step 10: abort on loss_spike, restored step 8"]
    assert "aborted (guard: loss spike at step 10 after 2 rollback(s))" in out
    assert (data["training"]["status"], data["training"]["reason"]) == (
        "aborted", "guard: loss spike at step 10 after 2 rollback(s)")


def test_rollbacks_that_recovered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = [{"action": "rollback", "step": 5, "trigger": "loss_spike", "restored_step": 4, "new_lr": 5e-4,
               "lr_scale": 0.5, "loss": 9.0, "grad_norm": 1.0}]
    data = monitor_json(capsys, hf_log(tmp_path / "run.jsonl", nan_filter=True, steps={}, guard_events=events))
    rec = recs(data)["guard_rollbacks"]
    assert rec["severity"] == "warning" and "0.5x its schedule" in rec["message"]
    assert rec["evidence"]["steps"] == [5]


@pytest.mark.slow
def test_monitor_on_a_real_guarded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from test_guard_trainer import build_parts, guarded_run

    guarded_run(build_parts(), tmp_path, "nan", {5})
    capsys.readouterr()  # the Trainer printed its logs
    data = monitor_json(capsys, tmp_path / "run.jsonl")
    g = data["training"]["guard"]
    assert g["rollbacks"] == 1 and g["actions"]["listed"][0]["restored_step"] == 4
    assert g["settings"]["loss_source"] == "step" and g["logging_nan_inf_filter"] is True
    # HF logged the rejected step with a NaN grad norm and its filtered (finite) loss; the guard handled it.
    assert g["nan_hidden"]["steps"] == [5] and g["nan_hidden"]["handled_by_guard"] == 1
    r = recs(data)
    assert r["nan_hidden_by_logging_filter"]["severity"] == "info" and "guard_rollbacks" in r
    _rc, out = run_cli(capsys, str(tmp_path / "run.jsonl"))
    assert "    step 5: rollback on nonfinite_grad_norm, restored step 4, lr -> " in out
