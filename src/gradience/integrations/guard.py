"""Guard (SPEC §16, experimental, opt-in): roll a LoRA run back to a good state instead of letting it die.

A LoRA run's trainable state (adapter factors + their optimizer moments) is small enough to copy into CPU
memory every few steps. The guard keeps a small ring of such snapshots; when a step goes bad it restores the
newest good one, lowers the learning rate, and lets training continue with the next batches. After too many
rollbacks in a window it restores once more and stops training cleanly (the callback then writes
``run_end(status="aborted", reason=...)``).

Two layers, so the decisions can be tested without torch or a Trainer:

- **Pure logic** — :class:`GuardSettings` (validated options), :class:`GuardPolicy` (triggers, running median,
  rollback budget) and :class:`SnapshotRing` (which snapshot to restore).
- **Torch parts** — :class:`TrainableState` (capture/restore of the optimizer's parameters and their state),
  :func:`scale_lr` (optimizer param groups *and* scheduler base lrs), :func:`step_signals` (the step's loss and
  grad norm, agreed across DDP ranks) and :class:`GuardRuntime`, which the HF callback drives from its hooks.

Where the checks happen (transformers' ``Trainer``), and the limits that follow:

- **Before the optimizer step** (``on_pre_optimizer_step``): gradients exist and are already all-reduced
  (DDP) and clipped. The guard computes the total norm of the trainable gradients itself (the Trainer's own
  ``grad_norm`` is not passed to callbacks). Because it runs *after* clipping, only a non-finite norm is a
  trigger (clipping turns a NaN/Inf norm into NaN gradients; it does not hide it). A rejected step never
  reaches the weights: the snapshot is restored and every gradient is set to ``None``, which makes
  ``optimizer.step()`` a no-op (torch optimizers skip parameters without a gradient).
- **The step's loss** is read from the Trainer's on-device loss accumulator (``Trainer._tr_loss``, the sum the
  Trainer logs) as its increase between ``on_step_begin`` and ``on_pre_optimizer_step``: exact per-step
  losses with one host sync per step and no change to logging. It is a private attribute (present in
  transformers 5.x); when it is missing, or with ``guard_loss_source="log"``, the loss triggers use the losses
  of ``on_log`` instead (set ``logging_steps=1`` for per-step checks; the rollback then happens after the
  logged step was applied, and a spike is judged on an average over the logging window).
- HF's ``logging_nan_inf_filter=True`` (the default) replaces a NaN/Inf step loss by the running average
  before it reaches that accumulator, so a NaN *loss* is seen as its NaN *gradients* (the optimizer step
  would still have happened without the guard). With the filter off, the accumulator itself becomes NaN and
  HF's reset (``tr_loss -= tr_loss``) would keep it NaN for the rest of the run; after a rollback the guard
  replaces the rejected step's contribution by the running median of accepted losses so the logs recover.
- **DDP**: the step's loss (mean over ranks), the non-finite flags and the grad norm are combined with one
  small ``all_reduce``, so every rank takes the same decision, keeps the same snapshots and restores the same
  one. Only rank 0 writes telemetry (the callback's rule).
- **FSDP**: each rank's optimizer holds that rank's shards of the LoRA parameters and of their optimizer
  state; each rank snapshots and restores exactly those (in place, so FSDP's flat parameters keep their
  storage), the grad norm is the root of the ranks' summed squared shard norms, and the decision is the same
  all-reduced one, so every rank rolls back to the same step. DeepSpeed partitions state inside its own engine
  (not the torch optimizer the guard sees): the guard disables itself there with one warning.
- **fp16 with a GradScaler**: overflowing gradients are normal there (the scaler skips those steps and lowers
  its scale), so non-finite gradients are not a trigger; loss triggers stay on. bf16 and fp32 are unaffected.
- The step counter does not rewind: a rollback restores weights and optimizer state, not the data order or
  ``global_step``, so training still ends at ``max_steps`` and the skipped batches are simply not learned.
- Cost: nothing at all per step while the guard is off. When on, a norm over the trainable gradients and one
  host sync per step, plus a copy of the trainable state to CPU every ``snapshot_every`` steps (see
  ``benchmarks/bench_guard.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from gradience.policy import thresholds as T

TRIGGERS = ("nonfinite_loss", "nonfinite_grad_norm", "loss_spike")
LOSS_SOURCES = ("auto", "step", "log")

# The reference tool's Guard fields (johntnanney/gradience, vnext/integrations/hf.py GradienceCallbackConfig,
# experimental/guard.py), accepted from its users' code by gradience.vnext: renamed ones mean the same here;
# the others have no counterpart and are accepted with what this Guard does instead. One table, used by
# translate_reference_guard_fields only (guard_snapshot_every and guard_max_rollbacks keep their names).
REFERENCE_GUARD_ALIASES: dict[str, str] = {
    "enable_guard": "guard", "guard_ring_size": "guard_ring", "guard_window_steps": "guard_window",
}
REFERENCE_GUARD_NO_EFFECT: dict[str, str] = {
    "guard_grad_threshold": "a finite gradient norm is no trigger (the Trainer has clipped it before the guard "
                            "sees it); non-finite norms and loss spikes (guard_spike_factor) are",
    "guard_cooldown_steps": "rollbacks are bounded by guard_max_rollbacks within guard_window steps",
    "guard_steps_back": "the newest snapshot is restored, the next older one when training fails again before "
                        "a newer snapshot is taken",
    "guard_prune_newer_on_rollback": "snapshots newer than the restored one never exist or are dropped",
}


def translate_reference_guard_fields(fields: dict[str, Any], *, stacklevel: int = 2) -> dict[str, Any]:
    """``fields`` with the reference's Guard names replaced by ours (one DeprecationWarning per name used);
    names with no counterpart are dropped with a DeprecationWarning saying what happens instead."""
    import warnings

    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in REFERENCE_GUARD_ALIASES:
            new = REFERENCE_GUARD_ALIASES[name]
            if new in fields:
                raise TypeError(f"both {name} (deprecated) and {new} given; pass {new} only")
            warnings.warn(f"{name} is deprecated: use {new} (same meaning)", DeprecationWarning,
                          stacklevel=stacklevel)
            out[new] = value
        elif name in REFERENCE_GUARD_NO_EFFECT:
            warnings.warn(f"{name} is deprecated and has no effect: {REFERENCE_GUARD_NO_EFFECT[name]}",
                          DeprecationWarning, stacklevel=stacklevel)
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------------------------
# pure logic
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardSettings:
    """Validated guard options (the ``guard_*`` fields of ``GradienceCallbackConfig``)."""

    snapshot_every: int = T.GUARD_SNAPSHOT_EVERY
    ring: int = T.GUARD_RING
    spike_factor: float = T.GUARD_SPIKE_FACTOR
    spike_window: int = T.GUARD_SPIKE_WINDOW
    min_history: int = T.GUARD_MIN_HISTORY
    lr_factor: float = T.GUARD_LR_FACTOR
    max_rollbacks: int = T.GUARD_MAX_ROLLBACKS
    window: int = T.GUARD_WINDOW
    loss_source: str = "auto"

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"guard_{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("snapshot_every", self.snapshot_every)
        positive_int("ring", self.ring)
        positive_int("spike_window", self.spike_window)
        positive_int("min_history", self.min_history)
        positive_int("max_rollbacks", self.max_rollbacks, minimum=0)
        positive_int("window", self.window)
        if not (isinstance(self.spike_factor, (int, float)) and self.spike_factor > 1.0):
            raise ValueError(f"guard_spike_factor must be a number > 1, got {self.spike_factor!r}")
        if not (isinstance(self.lr_factor, (int, float)) and 0.0 < self.lr_factor <= 1.0):
            raise ValueError(f"guard_lr_factor must be in (0, 1], got {self.lr_factor!r}")
        if self.loss_source not in LOSS_SOURCES:
            raise ValueError(f"guard_loss_source must be one of {', '.join(LOSS_SOURCES)}, got "
                             f"{self.loss_source!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass(frozen=True)
class Verdict:
    """What the policy decided about one bad step: ``rollback`` or ``abort`` (and why)."""

    action: str                 # "rollback" | "abort"
    trigger: str                # one of TRIGGERS
    step: int                   # the optimizer step that was rejected (1-based: global_step after it)
    loss: float | None
    grad_norm: float | None
    running_median: float | None
    rollbacks_in_window: int    # rollbacks within the window before this verdict


class GuardPolicy:
    """Triggers and the rollback budget; fed one observation per optimizer step.

    ``check`` returns None for a good step (its loss then joins the running median) or a :class:`Verdict`
    for a bad one (its loss is kept out of the median). At most ``max_rollbacks`` rollbacks are granted within
    any ``window`` consecutive steps; the next trigger inside the window is an ``abort``.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._losses: deque[float] = deque(maxlen=settings.spike_window)
        self._rollback_steps: deque[int] = deque()
        self.rollbacks = 0

    def running_median(self) -> float | None:
        if len(self._losses) < self.settings.min_history:
            return None
        xs = sorted(self._losses)
        n, mid = len(xs), len(xs) // 2
        return xs[mid] if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])

    def trigger(self, loss: float | None, grad_norm: float | None) -> tuple[str | None, float | None]:
        """(trigger or None, running median used): pure, no state change."""
        median = self.running_median()
        if loss is not None and not math.isfinite(loss):
            return "nonfinite_loss", median
        if grad_norm is not None and not math.isfinite(grad_norm):
            return "nonfinite_grad_norm", median
        if _finite(loss) and median is not None and median > 0 and loss is not None \
                and loss > self.settings.spike_factor * median:
            return "loss_spike", median
        return None, median

    def in_window(self, step: int) -> int:
        while self._rollback_steps and self._rollback_steps[0] <= step - self.settings.window:
            self._rollback_steps.popleft()
        return len(self._rollback_steps)

    def check(self, step: int, loss: float | None, grad_norm: float | None) -> Verdict | None:
        trig, median = self.trigger(loss, grad_norm)
        if trig is None:
            if _finite(loss):
                assert loss is not None
                self._losses.append(loss)
            return None
        recent = self.in_window(step)
        if recent >= self.settings.max_rollbacks:
            return Verdict("abort", trig, step, loss, grad_norm, median, recent)
        self._rollback_steps.append(step)
        self.rollbacks += 1
        return Verdict("rollback", trig, step, loss, grad_norm, median, recent)

    def snapshot_due(self, step: int) -> bool:
        return step % self.settings.snapshot_every == 0


@dataclass
class _Entry:
    step: int
    payload: Any
    restored: int = 0


class SnapshotRing:
    """The last ``capacity`` snapshots (oldest evicted; its buffers handed back for reuse).

    ``choose`` returns the snapshot to restore: the newest one, unless it was already restored and training
    failed again before a newer snapshot was taken — then that one is suspect and is dropped in favour of the
    next older one (the oldest is always kept).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("ring capacity must be >= 1")
        self.capacity = capacity
        self._entries: deque[_Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self._entries]

    def push(self, step: int, make: Callable[[Any], Any]) -> None:
        """Store ``make(reusable)`` as the snapshot of ``step``; ``reusable`` is the evicted payload or None."""
        reusable = None
        if self._entries and self._entries[-1].step == step:
            reusable = self._entries.pop().payload  # same step again: replace it
        elif len(self._entries) >= self.capacity:
            reusable = self._entries.popleft().payload
        self._entries.append(_Entry(step, make(reusable)))

    def choose(self) -> tuple[int, Any]:
        if not self._entries:
            raise LookupError("no snapshot to restore")
        if self._entries[-1].restored and len(self._entries) > 1:
            self._entries.pop()
        entry = self._entries[-1]
        entry.restored += 1
        return entry.step, entry.payload

    def clear(self) -> None:
        self._entries.clear()


# The torch parts live in guard_state (re-exported here: callers import them from this module).
from gradience.integrations.guard_state import (  # noqa: E402,F401
    TrainableState,
    _dist_world,
    _Snapshot,
    _unwrap_optimizer,
    scale_lr,
    step_signals,
    torch_isfinite,
)


def alert_for(event: dict[str, Any]) -> tuple[str, str, str]:
    """(severity, code, message) of the ``alert`` that accompanies a guard metrics event."""
    what = {"nonfinite_loss": "non-finite loss", "nonfinite_grad_norm": "non-finite gradient norm",
            "loss_spike": "loss spike"}.get(str(event.get("trigger")), str(event.get("trigger")))
    loss = event.get("loss")
    median = event.get("running_median")
    detail = ""
    if event.get("trigger") == "loss_spike" and _finite(loss) and _finite(median) and median:
        detail = f" (loss {loss:.4g} = {loss / median:.1f}x the running median {median:.4g})"
    if event.get("action") == "abort":
        return ("critical", "guard_abort",
                f"Guard stopped training: {what} at step {event.get('step')}{detail} after "
                f"{event.get('rollbacks_in_window')} rollback(s) within {event.get('window')} steps; "
                f"restored the snapshot of step {event.get('restored_step')}")
    lr = event.get("new_lr")
    lr_text = f"{lr:.3g}" if _finite(lr) else "-"
    return ("warning", "guard_rollback",
            f"Guard rolled back: {what} at step {event.get('step')}{detail}; restored the snapshot of step "
            f"{event.get('restored_step')}, lr lowered to {lr_text}")


def __getattr__(name: str) -> Any:
    """``GuardRuntime`` lives in guard_runtime (it imports this module); still importable from here."""
    if name == "GuardRuntime":
        from gradience.integrations.guard_runtime import GuardRuntime

        return GuardRuntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
