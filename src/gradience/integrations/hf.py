"""Hugging Face Trainer integration: ``GradienceCallback`` writes a telemetry v1 run log (SPEC §5, §8).

Usage::

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig

    cb = GradienceCallback(GradienceCallbackConfig(dataset_name="glue/sst2", task_profile="easy_classification",
                                                   train_eval_samples=256))
    trainer = Trainer(model=peft_model, args=args, ..., callbacks=[cb])
    with cb.guard():          # records run_end(status="error") if train() raises
        trainer.train()

What it writes (to ``<output_dir>/run.jsonl``, appending): ``run_start`` with a ConfigSnapshot built from the
TrainingArguments and the PEFT config, ``train_step`` per Trainer log, ``eval`` per evaluation (``eval_`` prefix
stripped, split ``eval_split``; ``ppl`` = exp(loss) added by the writer), an ``eval`` on split ``train`` when a
train-eval subset is configured (so ``monitor`` gets its train/test gap), a ``lora_audit`` metrics event from
the in-memory adapter at train end, then ``run_end``.

Design decisions, and why:

- **Never breaks training.** Every hook catches its own failures; a failure becomes one warning
  (``GradienceTelemetryWarning``) per kind of failure and training continues. An unwritable output directory
  disables telemetry for the run after one warning.
- **One writer under DDP / FSDP / DeepSpeed.** Only ``state.is_world_process_zero`` opens the file. The
  train-eval subset, however, is evaluated on *every* rank, because the Trainer's evaluation loop gathers
  across processes (evaluating on rank 0 alone would deadlock).
- **Train-eval without recursion.** The train subset is scored with ``trainer.evaluation_loop`` (the loop
  ``Trainer.evaluate`` itself uses, with the same ``compute_metrics``) from inside ``on_evaluate``; unlike a
  nested ``trainer.evaluate`` it fires no second ``on_evaluate``/``on_log`` and leaves ``log_history`` alone.
  The callback needs the Trainer for that: pass it with :meth:`GradienceCallback.attach`, or let the callback
  find it (it looks up the calling ``Trainer`` frame once, at ``on_train_begin``).
- **Exceptions.** transformers has no exception hook. ``with cb.guard(): trainer.train()`` writes
  ``run_end(status="error"|"aborted", reason=...)`` and re-raises. Without the guard, an ``atexit`` handler
  closes a run left open when the process ends (``error`` with the uncaught exception as reason, else
  ``aborted``), so a crashed script still leaves a well-formed log. A hard kill (SIGKILL, OOM killer) cannot
  be recorded; ``monitor`` then reports the run as having no ``run_end``.
- **Cheap.** Per step it only copies the scalars the Trainer already logged; no tensor work unless the
  train-end audit (a few small SVDs) is enabled.
- **Guard** (``guard=True``, SPEC §16, off by default): snapshots of the trainable state, rollback + lower lr
  on a NaN/Inf or a loss spike, a clean stop (``run_end`` ``aborted``) after too many rollbacks. Driven from
  ``on_step_begin`` / ``on_pre_optimizer_step`` / ``on_step_end`` / ``on_log`` on every rank; the logic and
  its limits are in :mod:`gradience.integrations.guard`. With the guard off those hooks only test an attribute.
  (Not to be confused with :meth:`GradienceCallback.guard`, the exception-recording context manager.)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from gradience.errors import MissingDependencyError
from gradience.policy import thresholds as T

try:
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("transformers", "hf", "the Hugging Face Trainer callback") from _exc

logger = logging.getLogger(__name__)

_EVAL_PREFIX = "eval_"
_TRAIN_EVAL_PREFIX = "train_eval_"
# Keys of the Trainer's final summary log (on_log after training); recorded as one metrics event.
_TRAIN_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                                 "total_flos", "train_loss"})


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


def _plain(obj: Any) -> Any:
    """JSON-friendly copy of a PEFT/HF config value: enums by value, sets sorted, tuples as lists."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=str)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # plain str, also for str subclasses (TorchVersion, str-enums)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return str(obj)


def _scalar(value: Any) -> float | int | None:
    """A plain number from a logged value (python/numpy/0-d torch), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return out if isinstance(out, (int, float)) and not isinstance(out, bool) else None
    return None


def _strip_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        number = _scalar(value)
        if number is not None:
            out[name] = number
    return out


def _non_default_args(cls: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (TrainingArguments keys) without those equal to the field's default in ``cls``: a run log
    carries what was changed, not ~110 defaults. Field defaults are read from the dataclass (no instance is
    built, so nothing touches devices); a few fields normalized by ``__post_init__`` may stay."""
    import dataclasses

    from gradience.config.hf_defaults import drop_defaults

    defaults: dict[str, Any] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            try:
                if f.default is not dataclasses.MISSING:
                    defaults[f.name] = _plain(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    defaults[f.name] = _plain(f.default_factory())
            except Exception:  # an exotic default: keep the key
                continue
    return drop_defaults(values, defaults)


@contextlib.contextmanager
def _quiet_prediction_steps(handler: Any) -> Iterator[None]:
    """Within the block, the callback handler's ``on_prediction_step`` does nothing (the instance attribute
    shadows the method and is removed afterwards): an internal evaluation pass moves no progress bar."""
    if handler is None:
        yield
        return
    handler.on_prediction_step = lambda args, state, control, **kwargs: control
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del handler.on_prediction_step


def _adapter_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(LoRA tensors, adapter config dict) of the active adapter of a PEFT or transformers-PEFT model."""
    if model is None:
        return None
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config:
        return None
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        name = model.active_adapter
    else:  # transformers' own PEFT integration (model.add_adapter)
        active = model.active_adapters() if callable(getattr(model, "active_adapters", None)) else []
        name = active[0] if active else next(iter(peft_config))
    # save_embedding_layers=False: only LoRA factors are audited, and PEFT's "auto" may query the Hub about
    # the base model's config.
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    config = peft_config.get(name) or next(iter(peft_config.values()))
    return dict(state), _plain(config.to_dict())


def _peft_config_dict(model: Any) -> dict[str, Any] | None:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config:
        return None
    name = getattr(model, "active_adapter", None)
    if not isinstance(name, str) or name not in peft_config:
        name = next(iter(peft_config))
    return _plain(peft_config[name].to_dict())


def audit_model_adapter(model: Any, include_layers: bool = False) -> dict[str, Any] | None:
    """Audit the in-memory LoRA adapter of ``model`` (no files): the ``lora_audit`` metrics payload.

    Returns None when the model has no PEFT adapter. Raises ``ValueError`` when the weights are sharded
    away from this process (DeepSpeed ZeRO-3 / FSDP without a full state dict).
    """
    found = _adapter_state(model)
    if found is None:
        return None
    state, config = found
    from gradience.audit import audit_state_dict

    tensors = {}
    for key, tensor in state.items():
        if "lora_" not in key:  # modules_to_save heads etc. are not part of the LoRA audit
            continue
        if tensor.numel() == 0:
            raise ValueError(f"adapter tensor {key} is empty in this process (sharded by ZeRO-3/FSDP?); "
                             "run `gradience audit` on the saved adapter instead")
        tensors[key] = tensor.detach().to("cpu").float().numpy()
    if not tensors:
        return None
    summary: dict[str, Any] = audit_state_dict(tensors, config).to_summary(include_layers=include_layers)
    return summary


class GradienceCallback(TrainerCallback):
    """Writes a Gradience telemetry log for a Hugging Face ``Trainer`` run (see the module docstring)."""

    def __init__(self, config: GradienceCallbackConfig | None = None) -> None:
        self.config = config or GradienceCallbackConfig()
        self.trainer: Any = None
        self.writer: Any = None
        self.path: Path | None = None
        self._open = False          # a run_start was written and no run_end yet
        self._warned: set[str] = set()
        self._train_eval: Any = None
        self._train_eval_ready = False
        self._atexit_registered = False
        self._training = False      # between on_train_begin and on_train_end (every rank)
        self.last_eval: dict[str, dict[str, Any]] = {}  # split -> metrics of its latest evaluation
        self.rollback_guard: Any = None  # a guard.GuardRuntime while a guarded train() runs (all ranks)
        if self.config.guard:
            self._guard_settings()  # bad guard options fail here, not in the middle of training

    # -- public helpers ------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> GradienceCallback:
        """Give the callback its Trainer (needed for the train-eval subset); returns self."""
        self.trainer = trainer
        return self

    @property
    def run_id(self) -> str | None:
        return None if self.writer is None else str(self.writer.run_id)

    @contextlib.contextmanager
    def guard(self) -> Iterator[GradienceCallback]:
        """``with cb.guard(): trainer.train()`` — an exception escaping training closes the run with
        ``run_end(status="error", reason=...)`` (``aborted`` for Ctrl-C) and is re-raised unchanged."""
        try:
            yield self
        except BaseException as exc:
            status = "aborted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "error"
            self.end_run(status, f"{type(exc).__name__}: {exc}")
            raise

    def end_run(self, status: str, reason: str | None = None, step: int | None = None) -> None:
        """Close an open run with ``run_end(status, reason)``; a no-op when no run is open."""
        if not self._open or self.writer is None:
            return
        self._open = False
        try:
            self.writer.run_end(status, reason=reason, step=step)
        except Exception as exc:
            self._warn_once("telemetry", f"could not write run_end to {self.path}: {exc}")
        finally:
            self._close_writer()

    # -- internals -----------------------------------------------------------------------------------------
    def _warn_once(self, kind: str, message: str) -> None:
        if kind in self._warned:
            logger.debug("gradience telemetry (%s): %s", kind, message)
            return
        self._warned.add(kind)
        warnings.warn(f"gradience: {message} (training continues)", GradienceTelemetryWarning, stacklevel=3)

    def _close_writer(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self._atexit_registered:
            atexit.unregister(self._close_at_exit)
            self._atexit_registered = False

    def _close_at_exit(self) -> None:
        """atexit: a run still open when the interpreter exits did not reach on_train_end."""
        if not self._open:
            return
        exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        if exc is not None:
            self.end_run("error", f"{type(exc).__name__}: {exc}")
        else:
            self.end_run("aborted", "process exited before training ended")

    def _find_trainer(self) -> None:
        """Find the Trainer running this callback by walking up the call stack (only when not attached)."""
        if self.trainer is not None:
            return
        frame: Any = sys._getframe(1)
        for _ in range(12):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            if handler is not None and self in getattr(handler, "callbacks", ()):
                self.trainer = candidate
                return
            frame = frame.f_back

    def _open_writer(self, args: Any) -> bool:
        from gradience.telemetry import TelemetryWriter

        out_dir = self.config.output_dir or getattr(args, "output_dir", None) or "."
        self.path = Path(out_dir) / self.config.filename
        try:
            self.writer = TelemetryWriter(self.path, run_id=self.config.run_id, append=True,
                                          allow_text=self.config.telemetry_allow_text,
                                          max_str_len=self.config.telemetry_max_str_len)
        except Exception as exc:
            self._warn_once("telemetry", f"telemetry disabled for this run: cannot open {self.path}: {exc}")
            return False
        return True

    def _snapshot(self, args: Any, state: Any, model: Any) -> Any:
        from gradience.config import snapshot_from_sources

        peft = _peft_config_dict(model)
        cfg = self.config
        model_name = cfg.model_name
        if model_name is None:
            model_name = (peft or {}).get("base_model_name_or_path") or \
                getattr(getattr(model, "config", None), "_name_or_path", None) or None
        overrides = {key: value for key, value in (
            ("model_name", model_name), ("dataset_name", cfg.dataset_name),
            ("task_profile", cfg.task_profile), ("notes", cfg.notes)) if value is not None}
        # max_steps / epochs / dtype are read from the arguments by the same normalization `gradience check`
        # applies to training_args.json, so check and monitor agree on one run. The Trainer's resolved plan
        # and the weights dtype are facts of this run too: kept beside them in training.extras.
        snapshot = snapshot_from_sources(peft=peft, training=_plain(args.to_dict()), overrides=overrides)
        extras = _non_default_args(type(args), snapshot.training.extras)
        for key, value in (("planned_max_steps", getattr(state, "max_steps", 0) or None),
                           ("planned_epochs", getattr(state, "num_train_epochs", 0) or None),
                           ("model_dtype", str(getattr(model, "dtype", "") or "").replace("torch.", "") or None)):
            if value is not None:
                extras[key] = _plain(value)
        snapshot.training.extras = extras
        return snapshot

    def _meta(self, args: Any) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        world = int(getattr(args, "world_size", 1) or 1)
        meta: dict[str, Any] = {
            "source": "gradience.integrations.hf",
            "framework": "transformers",
            "transformers_version": str(transformers.__version__),
            "peft_version": str(peft.__version__),
            "torch_version": str(torch.__version__),
            "world_size": world,
            "effective_batch_size": int(args.per_device_train_batch_size) * world
            * int(args.gradient_accumulation_steps),
        }
        # Recorded explicitly: monitor warns when this HF default may have hidden a NaN loss.
        meta["logging_nan_inf_filter"] = bool(getattr(args, "logging_nan_inf_filter", False))
        if self.rollback_guard is not None:
            meta["guard"] = self.rollback_guard.describe()
        meta.update(self.config.meta)
        return meta

    def _should_write(self, state: Any) -> bool:
        return bool(state.is_world_process_zero) and self._open and self.writer is not None

    def _hook(self, name: str, fn: Any, *a: Any) -> None:
        try:
            fn(*a)
        except Exception as exc:  # never raise into the training loop; one warning for all write failures
            self._warn_once("telemetry", f"telemetry {name} failed: {type(exc).__name__}: {exc}")

    # -- guard (SPEC §16; the logic lives in gradience.integrations.guard) ------------------------------------
    def _guard_settings(self) -> Any:
        from gradience.integrations.guard import GuardSettings

        c = self.config
        return GuardSettings(snapshot_every=c.guard_snapshot_every, ring=c.guard_ring,
                             spike_factor=c.guard_spike_factor, lr_factor=c.guard_lr_factor,
                             max_rollbacks=c.guard_max_rollbacks, window=c.guard_window,
                             loss_source=c.guard_loss_source)

    def _guard_call(self, name: str, fn: Any, *a: Any) -> Any:
        """Run a guard step; a failure disables the guard for the rest of the run (training continues)."""
        try:
            return fn(*a)
        except Exception as exc:
            if self.rollback_guard is not None:
                self.rollback_guard.end()
            self.rollback_guard = None
            self._warn_once("guard", f"guard disabled: {name} failed: {type(exc).__name__}: {exc}")
            return None

    def _guard_begin(self, args: Any, state: Any, kwargs: Mapping[str, Any]) -> None:
        from gradience.integrations.guard_runtime import GuardRuntime

        self.rollback_guard = None
        trainer = self.trainer
        if getattr(trainer, "is_deepspeed_enabled", False):  # FSDP is supported: each rank guards its shards
            self._warn_once("guard", "guard disabled: DeepSpeed partitions the optimizer state inside its engine, "
                                     "out of the guard's reach (FSDP and DDP are supported)")
            return
        optimizer = kwargs.get("optimizer") or getattr(trainer, "optimizer", None)
        if optimizer is None:
            self._warn_once("guard", "guard disabled: the Trainer has no optimizer at on_train_begin")
            return
        runtime = GuardRuntime(self._guard_settings())
        runtime.begin(trainer, optimizer, kwargs.get("lr_scheduler") or getattr(trainer, "lr_scheduler", None),
                      int(state.global_step))
        self.rollback_guard = runtime

    def _guard_emit(self, state: Any, event: dict[str, Any] | None) -> None:
        """An alert plus a ``guard`` metrics event for one action (rank 0 writes)."""
        if event is None or not self._should_write(state):
            return
        from gradience.integrations.guard import alert_for

        severity, code, message = alert_for(event)
        self.writer.alert(severity, code, message, context=event, step=event["step"])
        self.writer.metrics("guard", event, step=event["step"])

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            self._guard_call("on_step_begin", self.rollback_guard.step_begin)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            event = self._guard_call("on_pre_optimizer_step", self.rollback_guard.pre_optimizer_step,
                                     state.global_step, control)
            self._hook("guard", self._guard_emit, state, event)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollback_guard is not None:
            self._guard_call("on_step_end", self.rollback_guard.step_end, state.global_step)

    # -- TrainerCallback hooks -------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.config.guard:
            self._find_trainer()
            self._guard_call("on_train_begin", self._guard_begin, args, state, kwargs)
        self._hook("on_train_begin", self._train_begin, args, state, kwargs.get("model"))

    def _train_begin(self, args: Any, state: Any, model: Any) -> None:
        self._find_trainer()
        self._train_eval_ready = False
        self._training = True
        if not state.is_world_process_zero:
            return
        if self._open:  # a previous train() of this callback never reached on_train_end
            self.end_run("aborted", "a new training run started before the previous one ended")
        if not self._open_writer(args):
            return
        try:
            self.writer.run_start(self._snapshot(args, state, model), self._meta(args), step=state.global_step)
        except Exception:
            self._close_writer()
            raise
        self._open = True
        if not self._atexit_registered:
            atexit.register(self._close_at_exit)
            self._atexit_registered = True

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.rollback_guard is not None and logs and "loss" in logs:
            event = self._guard_call("on_log", self.rollback_guard.logged_loss, state.global_step,
                                     _scalar(logs.get("loss")), control)
            self._hook("guard", self._guard_emit, state, event)
        if self._should_write(state) and logs:
            self._hook("on_log", self._log, state, logs)

    def _log(self, state: Any, logs: Mapping[str, Any]) -> None:
        if "loss" in logs:
            fields = {"loss": _scalar(logs.get("loss")), "lr": _scalar(logs.get("learning_rate")),
                      "grad_norm": _scalar(logs.get("grad_norm")), "epoch": _scalar(logs.get("epoch")),
                      "tokens": _scalar(logs.get("num_input_tokens_seen"))}
            self.writer.train_step(state.global_step, **fields)
        elif _TRAIN_SUMMARY_KEYS.intersection(logs):
            self.writer.metrics("train_summary", _strip_prefix(logs, ""), step=state.global_step)
        # eval logs are recorded by on_evaluate (with the split), not here

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self._hook("on_evaluate", self._evaluate, args, state, metrics or {})

    def _evaluate(self, args: Any, state: Any, metrics: Mapping[str, Any]) -> None:
        split, prefix = self._split_of(metrics)
        if self._should_write(state):
            values = _strip_prefix(metrics, prefix)
            if "n" not in values:
                n = self._eval_size(split)
                if n is not None:
                    values["n"] = n
            self.last_eval[split] = values
            self.writer.eval(state.global_step, split, values)
        train_metrics = self._run_train_eval()  # every rank: the evaluation loop gathers across processes
        if train_metrics is not None and self._should_write(state):
            self.last_eval["train"] = train_metrics
            self.writer.eval(state.global_step, "train", train_metrics)

    def _split_of(self, metrics: Mapping[str, Any]) -> tuple[str, str]:
        """Split name and key prefix: ``eval_x`` is ``eval_split``; with a dict of eval datasets,
        ``eval_<name>_x`` is split ``<name>``."""
        eval_sets = getattr(self.trainer, "eval_dataset", None)
        if isinstance(eval_sets, Mapping):
            for name in eval_sets:
                prefix = f"{_EVAL_PREFIX}{name}_"
                if any(k.startswith(prefix) for k in metrics):
                    return str(name), prefix
        return self.config.eval_split, _EVAL_PREFIX

    def _eval_size(self, split: str) -> int | None:
        dataset = getattr(self.trainer, "eval_dataset", None)
        if isinstance(dataset, Mapping):
            dataset = dataset.get(split)
        try:
            return len(dataset) if dataset is not None else None
        except TypeError:
            return None

    def _prepare_train_eval(self) -> Any:
        cfg = self.config
        dataset = cfg.train_eval_dataset
        if dataset is None and cfg.train_eval_samples:
            dataset = getattr(self.trainer, "train_dataset", None)
        if dataset is None:
            return None
        n = cfg.train_eval_samples
        if n is None:
            return dataset
        if not hasattr(dataset, "__len__"):  # a stream: its first n rows
            if callable(getattr(dataset, "take", None)):  # datasets.IterableDataset
                return dataset.take(n)
            self._warn_once("train_eval", "train-eval needs a sized dataset or a datasets.IterableDataset; "
                                          "train-eval is disabled")
            return None
        total = len(dataset)
        if total <= n:
            return dataset
        # Evenly spaced rows, not the first n: training sets are often sorted (by label, length, source).
        indices = [i * total // n for i in range(n)]
        if callable(getattr(dataset, "select", None)):  # datasets.Dataset
            return dataset.select(indices)
        from torch.utils.data import Subset

        return Subset(dataset, indices)

    def _run_train_eval(self) -> dict[str, Any] | None:
        cfg = self.config
        if not self._training or (cfg.train_eval_dataset is None and not cfg.train_eval_samples):
            return None
        if self.trainer is None:
            self._warn_once("train_eval", "train-eval is configured but the Trainer is unknown; "
                                          "call callback.attach(trainer)")
            return None
        if not self._train_eval_ready:
            self._train_eval = self._prepare_train_eval()
            self._train_eval_ready = True
        if self._train_eval is None:
            return None
        trainer = self.trainer
        handler = getattr(trainer, "callback_handler", None)
        saved_loader = getattr(handler, "eval_dataloader", None)
        try:
            loader = trainer.get_eval_dataloader(self._train_eval)
            # The Trainer's eval progress bar is still open here (ProgressCallback closes it in its own
            # on_evaluate, after ours): keep this pass's prediction steps off it, or it overruns (11/6).
            with _quiet_prediction_steps(handler):
                output = trainer.evaluation_loop(
                    loader, description="Gradience train-eval",
                    prediction_loss_only=True if trainer.compute_metrics is None else None,
                    metric_key_prefix=_TRAIN_EVAL_PREFIX.rstrip("_"))
        except Exception as exc:
            self._train_eval = None  # do not retry (and re-warn) at every evaluation
            self._warn_once("train_eval", f"train-eval failed and is disabled: {type(exc).__name__}: {exc}")
            return None
        finally:
            if handler is not None and hasattr(handler, "eval_dataloader"):
                handler.eval_dataloader = saved_loader  # evaluation_loop pointed it at the train-eval loader
        values = _strip_prefix(output.metrics, _TRAIN_EVAL_PREFIX)
        values.setdefault("n", int(output.num_samples))
        return values

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        abort_reason = None
        if self.rollback_guard is not None:
            abort_reason = self.rollback_guard.abort_reason
            self.rollback_guard.end()  # frees the snapshots; events stay readable
        if self._should_write(state):
            self._hook("on_train_end", self._train_end, state, kwargs.get("model"), abort_reason)

    def _train_end(self, state: Any, model: Any, abort_reason: str | None = None) -> None:
        try:
            if self.config.audit_on_train_end:
                self._audit(state, model)
        finally:
            if abort_reason is not None:
                self.end_run("aborted", abort_reason, step=state.global_step)
            else:
                self.end_run("ok", step=state.global_step)

    def _audit(self, state: Any, model: Any) -> None:
        try:
            summary = audit_model_adapter(model, include_layers=self.config.audit_include_layers)
        except Exception as exc:
            self._warn_once("audit", f"in-memory LoRA audit skipped: {type(exc).__name__}: {exc}")
            return
        if summary is not None:
            self.writer.metrics("lora_audit", summary, step=state.global_step)

