"""The Guard on real transformers Trainer runs (tiny DistilBERT + LoRA, CPU).

Faults are injected by a forward hook on the embeddings (NaN activations -> NaN loss and gradients) or on
the classifier logits (x200 -> a finite loss spike), switched on for chosen optimizer steps by a callback.
Restores are checked against an independent copy of the trainable parameters and Adam moments taken by a
test callback at the step the guard should restore.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import TrainerCallback  # noqa: E402

from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig  # noqa: E402
from gradience.telemetry.reader import read_events  # noqa: E402
from test_integration_callback import build_parts, make_trainer  # noqa: E402


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records with telemetry's "NaN"/"Infinity" strings decoded (through the product's reader)."""
    return [rec.data for rec in read_events(path)]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return build_parts()


class Fault(TrainerCallback):
    """Switches an injected fault on for the optimizer steps in ``steps`` (1-based, as global_step after it);
    records a copy of the trainable parameters and Adam moments at the end of every step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.on = False
        self.params_at: dict[int, list[Any]] = {}
        self.moments_at: dict[int, list[Any]] = {}
        self.params_after_log: dict[int, list[Any]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on = (state.global_step + 1) in self.steps

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)
        params = [p for g in opt.param_groups for p in g["params"]]
        self.params_at[state.global_step] = [p.detach().clone() for p in params]
        self.moments_at[state.global_step] = [opt.state[p]["exp_avg"].clone() if p in opt.state else None
                                              for p in params]

    def on_log(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # Runs after GradienceCallback.on_log (callbacks run in order): sees a restore done there.
        opt = getattr(optimizer, "optimizer", optimizer)
        self.params_after_log[state.global_step] = [p.detach().clone() for g in opt.param_groups
                                                    for p in g["params"]]


def inject(trainer: Any, fault: Fault, kind: str) -> None:
    inner = trainer.model.base_model.model
    if kind == "nan":
        module = inner.distilbert.embeddings

        def hook(mod: Any, inp: Any, out: Any) -> Any:
            return out * float("nan") if fault.on and mod.training else None
    else:
        module = inner.classifier

        def hook(mod: Any, inp: Any, out: Any) -> Any:
            return out * 200.0 if fault.on and mod.training else None
    module.register_forward_hook(hook)


def guarded_run(parts: dict[str, Any], out: Path, kind: str, steps: set[int], *, max_steps: int = 12,
                **cfg: Any) -> tuple[GradienceCallback, Fault, Any, list[dict[str, Any]]]:
    trainer_kw = {k[len("trainer_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("trainer_")}
    cb = GradienceCallback(GradienceCallbackConfig(guard=True, guard_snapshot_every=2, audit_on_train_end=False,
                                                   **cfg))
    fault = Fault(steps)
    trainer = make_trainer(parts, out, [cb, fault], max_steps=max_steps, logging_steps=1, eval_strategy="no",
                           **trainer_kw)
    inject(trainer, fault, kind)
    trainer.train()
    return cb, fault, trainer, read_jsonl(out / "run.jsonl")


def guard_events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["metrics"] for r in records if r["event"] == "metrics" and r["kind"] == "guard"]


def assert_restored(fault: Fault, step: int, restored: int) -> None:
    """After the rejected ``step`` the trainable state equals the copy taken at the end of ``restored``."""
    for got, want in zip(fault.params_at[step], fault.params_at[restored], strict=True):
        assert torch.equal(got, want)
    for got, want in zip(fault.moments_at[step], fault.moments_at[restored], strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


def saved_adapter_is_finite(trainer: Any, out: Path) -> bool:
    from safetensors.numpy import load_file

    trainer.save_model(str(out / "adapter"))
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    import numpy as np

    return bool(tensors) and all(bool(np.isfinite(t).all()) for t in tensors.values())


def test_injected_nan_is_rolled_back_and_training_finishes(parts: dict[str, Any], tmp_path: Path) -> None:
    _cb, fault, trainer, records = guarded_run(parts, tmp_path, "nan", {7})
    events = guard_events(records)
    assert len(events) == 1
    ev = events[0]
    # HF's default logging_nan_inf_filter replaced the NaN loss, so the guard sees the NaN gradients.
    assert (ev["action"], ev["trigger"], ev["step"], ev["restored_step"]) == (
        "rollback", "nonfinite_grad_norm", 7, 6)
    assert ev["loss"] is None and math.isnan(ev["grad_norm"])
    assert_restored(fault, 7, 6)
    # lr: the scheduler's value at step 7 halved, and the halving persists through later scheduler steps.
    steps = {r["step"]: r for r in records if r["event"] == "train_step"}
    linear = [3e-3 * (1 - s / 12) for s in range(12)]  # HF linear decay, no warmup: lr used for step s+1
    assert ev["new_lr"] == pytest.approx(linear[6] * 0.5)
    assert steps[8]["lr"] == pytest.approx(linear[7] * 0.5) and steps[12]["lr"] == pytest.approx(linear[11] * 0.5)
    alerts = [r for r in records if r["event"] == "alert"]
    assert [(a["code"], a["severity"], a["step"]) for a in alerts] == [("guard_rollback", "warning", 7)]
    # Training reached its last step with finite losses after the rollback, and the adapter is finite.
    assert trainer.state.global_step == 12 and records[-1]["event"] == "run_end"
    assert records[-1]["status"] == "ok"
    assert all(math.isfinite(steps[s]["loss"]) for s in range(8, 13))
    assert saved_adapter_is_finite(trainer, tmp_path)
    meta = records[0]["meta"]
    assert meta["guard"]["loss_source"] == "step" and meta["guard"]["snapshot_every"] == 2
    assert meta["logging_nan_inf_filter"] is True


def test_nan_loss_without_hf_filter_recovers_logging(parts: dict[str, Any], tmp_path: Path) -> None:
    """logging_nan_inf_filter=False: the step loss itself is NaN (trigger nonfinite_loss); HF would keep its
    loss accumulator NaN for the rest of the run, the guard repairs it so later logged losses are finite."""
    _cb, fault, trainer, records = guarded_run(parts, tmp_path, "nan", {5},
                                              trainer_logging_nan_inf_filter=False)
    (ev,) = guard_events(records)
    assert (ev["trigger"], ev["step"], ev["restored_step"]) == ("nonfinite_loss", 5, 4)
    assert math.isnan(ev["loss"])
    assert_restored(fault, 5, 4)
    losses = {r["step"]: r["loss"] for r in records if r["event"] == "train_step"}
    assert all(math.isfinite(losses[s]) for s in range(6, 13))
    assert trainer.state.global_step == 12 and records[-1]["status"] == "ok"


def test_injected_spike_is_rolled_back(parts: dict[str, Any], tmp_path: Path) -> None:
    _cb, fault, trainer, records = guarded_run(parts, tmp_path, "spike", {9})
    (ev,) = guard_events(records)
    assert (ev["action"], ev["trigger"], ev["step"], ev["restored_step"]) == ("rollback", "loss_spike", 9, 8)
    # Independent check of the trigger: the spike is > 5x the median of the 8 accepted per-step losses,
    # which are the Trainer's own logged losses (logging_steps=1).
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    median = sorted(logged[:8])[3:5]
    assert ev["running_median"] == pytest.approx(sum(median) / 2, rel=1e-5)
    assert ev["loss"] == pytest.approx(logged[8], rel=1e-5) and ev["loss"] > 5 * ev["running_median"]
    assert_restored(fault, 9, 8)
    assert trainer.state.global_step == 12 and records[-1]["status"] == "ok"
    assert math.isfinite(logged[-1]) and saved_adapter_is_finite(trainer, tmp_path)


def test_persistent_failure_stops_after_max_rollbacks(parts: dict[str, Any], tmp_path: Path) -> None:
    cb, fault, trainer, records = guarded_run(parts, tmp_path, "nan", set(range(5, 100)), max_steps=20,
                                              guard_max_rollbacks=2, guard_window=50)
    events = guard_events(records)
    assert [(e["action"], e["step"]) for e in events] == [("rollback", 5), ("rollback", 6), ("abort", 7)]
    # Ring of 2 (steps 2 and 4): the newest first; failing again before a new snapshot walks back to step 2.
    assert [e["restored_step"] for e in events] == [4, 2, 2]
    assert_restored(fault, 7, 2)
    assert trainer.state.global_step == 7  # stopped cleanly, well before max_steps
    end = records[-1]
    assert end["event"] == "run_end" and end["status"] == "aborted"
    assert "step 7" in end["reason"] and "2 rollback(s)" in end["reason"]
    codes = [r["code"] for r in records if r["event"] == "alert"]
    assert codes == ["guard_rollback", "guard_rollback", "guard_abort"]
    assert cb.rollback_guard.aborted and saved_adapter_is_finite(trainer, tmp_path)


def test_log_loss_source_judges_logged_losses(parts: dict[str, Any], tmp_path: Path) -> None:
    """guard_loss_source='log': the spike is seen in on_log, after the step was applied; the snapshot due at
    that step is never used (it was not yet confirmed)."""
    _cb, fault, trainer, records = guarded_run(parts, tmp_path, "spike", {8}, guard_loss_source="log")
    (ev,) = guard_events(records)
    assert (ev["trigger"], ev["step"], ev["restored_step"], ev["loss_source"]) == ("loss_spike", 8, 6, "log")
    # Restored in on_log of step 8 (after step 8 was applied): the state seen right after that log is step 6's.
    for got, want in zip(fault.params_after_log[8], fault.params_at[6], strict=True):
        assert torch.equal(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(fault.params_at[8], fault.params_at[6], strict=True))
    assert trainer.state.global_step == 12 and records[-1]["status"] == "ok"


def test_guard_off_registers_nothing(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))
    fault = Fault({3})
    trainer = make_trainer(parts, tmp_path, [cb, fault], max_steps=4, logging_steps=1, eval_strategy="no")
    inject(trainer, fault, "nan")
    trainer.train()
    records = read_jsonl(tmp_path / "run.jsonl")
    assert cb.rollback_guard is None and not guard_events(records)
    assert "guard" not in records[0]["meta"]
    # Without the guard the NaN step went through: the trainable weights are NaN from step 3 on.
    assert any(not bool(torch.isfinite(p).all()) for p in fault.params_at[4])


def test_bad_guard_option_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="guard_lr_factor"):
        GradienceCallback(GradienceCallbackConfig(guard=True, guard_lr_factor=2.0))
