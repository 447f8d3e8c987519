"""Options of the Hugging Face callback, kept apart so they can be read and built without transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradience.policy import thresholds as T


class GradienceTelemetryWarning(RuntimeWarning):
    """Telemetry could not be written or computed; training itself is unaffected."""


@dataclass
class GradienceCallbackConfig:
    """Options of :class:`GradienceCallback` (all optional)."""

    output_dir: str | None = None          # default: TrainingArguments.output_dir
    filename: str = "run.jsonl"
    run_id: str | None = None              # default: a fresh uuid4 per trainer.train() call (a fixed id is
                                           # reused by every train() call of this callback)
    dataset_name: str | None = None
    model_name: str | None = None          # default: PEFT base_model_name_or_path / model.config._name_or_path
    task_profile: str | None = None        # easy_classification | hard_reasoning | generation | unknown
    notes: str | None = None
    telemetry_allow_text: bool = False
    telemetry_max_str_len: int = 256
    eval_split: str = "test"               # split name for the Trainer's own evaluations
    train_eval_dataset: Any = None         # evaluated at each evaluation and logged as split "train"
    train_eval_samples: int | None = None  # evenly spaced rows of train_eval_dataset (default: train_dataset)
    audit_on_train_end: bool = True
    audit_include_layers: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # extra run_start meta (no secrets: it is logged)
    # Guard (SPEC §16, experimental, off by default): see gradience.integrations.guard for what it does.
    guard: bool = False
    guard_snapshot_every: int = T.GUARD_SNAPSHOT_EVERY    # optimizer steps between CPU snapshots
    guard_ring: int = T.GUARD_RING                        # snapshots kept
    guard_spike_factor: float = T.GUARD_SPIKE_FACTOR      # step loss > this x running median: rollback
    guard_lr_factor: float = T.GUARD_LR_FACTOR            # lr multiplier per rollback
    guard_max_rollbacks: int = T.GUARD_MAX_ROLLBACKS      # within guard_window steps; one more: stop
    guard_window: int = T.GUARD_WINDOW
    guard_loss_source: str = "auto"                       # "auto" | "step" (Trainer._tr_loss) | "log" (on_log)
