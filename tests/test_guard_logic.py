"""Guard decisions without a Trainer: triggers, running median, rollback budget, snapshot ring, settings;
and the torch parts (state capture/restore, lr scaling through a real scheduler) on a plain torch loop."""

from __future__ import annotations

import math
import statistics

import pytest

from gradience.integrations.guard import GuardPolicy, GuardSettings, SnapshotRing, alert_for
from gradience.policy import thresholds as T


def test_defaults_come_from_thresholds() -> None:
    s = GuardSettings()
    assert (s.snapshot_every, s.ring, s.spike_factor, s.lr_factor, s.max_rollbacks, s.window) == (
        T.GUARD_SNAPSHOT_EVERY, T.GUARD_RING, T.GUARD_SPIKE_FACTOR, T.GUARD_LR_FACTOR, T.GUARD_MAX_ROLLBACKS,
        T.GUARD_WINDOW)


@pytest.mark.parametrize("kwargs, field", [
    ({"snapshot_every": 0}, "snapshot_every"), ({"ring": 0}, "ring"), ({"spike_factor": 1.0}, "spike_factor"),
    ({"lr_factor": 0.0}, "lr_factor"), ({"lr_factor": 1.5}, "lr_factor"), ({"max_rollbacks": -1}, "max_rollbacks"),
    ({"window": 0}, "window"), ({"loss_source": "tensorboard"}, "loss_source"), ({"ring": True}, "ring"),
])
def test_bad_settings_name_the_option(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"guard_{field}"):
        GuardSettings(**kwargs)


def test_spike_is_judged_against_the_median_of_accepted_losses() -> None:
    policy = GuardPolicy(GuardSettings(spike_factor=3.0, spike_window=4, min_history=3))
    losses = [2.0, 1.0, 1.5]
    for i, x in enumerate(losses, start=1):
        assert policy.check(i, x, 0.1) is None
    assert policy.running_median() == statistics.median(losses)
    # 4.4 < 3 x 1.5 is not a spike; it joins the window (which then holds 4 values).
    assert policy.check(4, 4.4, 0.1) is None
    assert policy.running_median() == statistics.median([2.0, 1.0, 1.5, 4.4])
    v = policy.check(5, 5.3, 0.1)  # median 1.75 -> 5.3 > 5.25
    assert v is not None and (v.action, v.trigger, v.step) == ("rollback", "loss_spike", 5)
    assert v.running_median == pytest.approx(1.75)
    # The rejected loss never entered the window; the window slides (maxlen 4) on accepted values.
    assert policy.running_median() == pytest.approx(1.75)
    assert policy.check(6, 1.0, 0.1) is None
    assert policy.running_median() == statistics.median([1.0, 1.5, 4.4, 1.0])


def test_no_spike_before_min_history_and_nonfinite_first() -> None:
    policy = GuardPolicy(GuardSettings(min_history=5))
    assert policy.check(1, 1.0, 1.0) is None
    assert policy.check(2, 1000.0, 1.0) is None  # only 1 accepted loss so far: spikes not judged yet
    v = policy.check(3, math.nan, math.inf)
    assert v is not None and v.trigger == "nonfinite_loss"
    v = policy.check(4, 1.0, math.nan)
    assert v is not None and v.trigger == "nonfinite_grad_norm"
    assert policy.check(5, None, None) is None  # nothing known: nothing to judge


def test_rollback_budget_per_window_then_abort() -> None:
    policy = GuardPolicy(GuardSettings(max_rollbacks=2, window=10))
    actions = [(s, policy.check(s, math.nan, None)) for s in (3, 5)]
    assert [v.action for _, v in actions if v] == ["rollback", "rollback"]
    v = policy.check(9, math.nan, None)  # 2 rollbacks in (−1, 9]: the third trigger stops
    assert v is not None and v.action == "abort" and v.rollbacks_in_window == 2
    # Outside the window the budget is back: the window of step 15 holds steps > 5, so 3 and 5 are gone.
    policy2 = GuardPolicy(GuardSettings(max_rollbacks=2, window=10))
    for s in (3, 5):
        policy2.check(s, math.nan, None)
    v2 = policy2.check(15, math.nan, None)
    assert v2 is not None and v2.action == "rollback" and v2.rollbacks_in_window == 0
    assert policy2.rollbacks == 3
    zero = GuardPolicy(GuardSettings(max_rollbacks=0))
    v3 = zero.check(1, math.inf, None)
    assert v3 is not None and v3.action == "abort"


def test_snapshot_ring_eviction_reuse_and_walk_back() -> None:
    ring = SnapshotRing(2)
    handed: list[object] = []

    def make(tag: str):
        def _make(reuse: object) -> str:
            handed.append(reuse)
            return tag
        return _make

    ring.push(0, make("s0"))
    ring.push(10, make("s10"))
    ring.push(20, make("s20"))      # evicts s0, whose buffers are handed to the new snapshot
    assert ring.steps == [10, 20] and handed == [None, None, "s0"]
    assert ring.choose() == (20, "s20")
    # Failing again before a newer snapshot: s20 is suspect, the older one is used (and kept).
    assert ring.choose() == (10, "s10")
    assert ring.steps == [10]
    assert ring.choose() == (10, "s10")  # the last one is never dropped
    ring.push(30, make("s30"))
    assert ring.choose() == (30, "s30")
    ring.push(30, make("s30b"))  # same step again replaces it
    assert ring.steps == [10, 30] and handed[-1] == "s30"
    ring.clear()
    with pytest.raises(LookupError):
        ring.choose()


def test_alert_texts() -> None:
    sev, code, msg = alert_for({"action": "rollback", "trigger": "loss_spike", "step": 7, "restored_step": 6,
                                "new_lr": 2.5e-4, "loss": 9.0, "running_median": 1.5})
    assert (sev, code) == ("warning", "guard_rollback")
    assert "step 7" in msg and "6.0x" in msg and "step 6" in msg and "0.00025" in msg
    sev, code, msg = alert_for({"action": "abort", "trigger": "nonfinite_grad_norm", "step": 9,
                                "restored_step": 5, "rollbacks_in_window": 3, "window": 100})
    assert (sev, code) == ("critical", "guard_abort") and "3 rollback(s)" in msg and len(msg) < 256


# -- torch parts on a plain loop -----------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _model_and_opt() -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_capture_restore_roundtrip_params_and_adam_state() -> None:
    from gradience.integrations.guard import TrainableState

    model, opt, sched = _model_and_opt()
    for _ in range(3):
        _train_step(model, opt, sched)
    ts = TrainableState(opt)
    assert ts.numel == 4 * 3 + 3
    snap = ts.capture()
    want_w = model.weight.detach().clone()
    want_m = opt.state[model.weight]["exp_avg"].clone()
    want_step = float(opt.state[model.weight]["step"])
    for _ in range(2):
        _train_step(model, opt, sched)
    assert not torch.equal(model.weight, want_w)
    ts.restore(snap)
    assert torch.equal(model.weight, want_w)
    assert torch.equal(opt.state[model.weight]["exp_avg"], want_m)
    assert float(opt.state[model.weight]["step"]) == want_step
    # The snapshot is a copy: training after the restore does not change it.
    _train_step(model, opt, sched)
    assert torch.equal(snap.params[0], want_w)
    # Buffers are reused when the ring hands an evicted snapshot back.
    again = ts.capture(snap)
    assert again.params[0] is snap.params[0] and torch.equal(again.params[0], model.weight.detach())


def test_restore_of_a_pre_training_snapshot_clears_optimizer_state() -> None:
    from gradience.integrations.guard import TrainableState

    model, opt, sched = _model_and_opt()
    ts = TrainableState(opt)
    snap = ts.capture()  # before any step: Adam has no state yet
    w0 = model.weight.detach().clone()
    _train_step(model, opt, sched)
    assert model.weight in opt.state
    ts.restore(snap)
    assert torch.equal(model.weight, w0) and model.weight not in opt.state
    _train_step(model, opt, sched)  # and the optimizer still works from a clean state
    assert float(opt.state[model.weight]["step"]) == 1.0


def test_scale_lr_survives_the_scheduler() -> None:
    from gradience.integrations.guard import scale_lr

    model, opt, sched = _model_and_opt()
    for _ in range(2):
        _train_step(model, opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    new = scale_lr(opt, sched, 0.5)
    assert new == [pytest.approx(1e-2 / 3 * 0.5)]
    _train_step(model, opt, sched)  # LambdaLR recomputes from base_lrs: the halving must persist
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4 * 0.5)
    assert sched.get_last_lr() == [pytest.approx(1e-2 / 4 * 0.5)]


def test_step_signals_single_process() -> None:
    from gradience.integrations.guard import step_signals

    model, _opt, _ = _model_and_opt()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    params = list(model.parameters())
    want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    loss, norm = step_signals(params, torch.tensor(1.25))
    assert loss == pytest.approx(1.25) and norm == pytest.approx(want, rel=1e-6)
    model.weight.grad[0, 0] = float("inf")
    _, norm = step_signals(params, None)
    assert norm == math.inf
    model.weight.grad[0, 1] = float("nan")
    loss, norm = step_signals(params, None)
    assert loss is None and math.isnan(norm)
    for p in params:
        p.grad = None
    assert step_signals(params, None) == (None, None)
