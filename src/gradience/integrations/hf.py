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
from pathlib import Path
from typing import Any

from gradience.errors import MissingDependencyError
from gradience.integrations.hf_adapter import _peft_config_dict, audit_model_adapter
from gradience.integrations.hf_config import GradienceCallbackConfig, GradienceTelemetryWarning
from gradience.integrations.hf_eval import EvalHooks
from gradience.integrations.hf_guard import GuardHooks
from gradience.integrations.hf_values import _non_default_args, _plain, _scalar, _strip_prefix
from gradience.telemetry.logmap import is_trl_metric

try:
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("transformers", "hf", "the Hugging Face Trainer callback") from _exc

logger = logging.getLogger(__name__)

__all__ = ["GradienceCallback", "GradienceCallbackConfig", "GradienceTelemetryWarning", "audit_model_adapter"]

# Keys of the Trainer's final summary log (on_log after training); recorded as one metrics event.
_TRAIN_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                                 "total_flos", "train_loss"})


class GradienceCallback(GuardHooks, EvalHooks, TrainerCallback):
    """Writes a Gradience telemetry log for a Hugging Face ``Trainer`` run (see the module docstring).

    Its guard hooks are in :mod:`gradience.integrations.hf_guard`, its evaluation helpers (split names, the
    train-eval pass) in :mod:`gradience.integrations.hf_eval`."""

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
            # TRL's trainers log their own metrics in the same call (rewards/margins, kl ...): kept under TRL's
            # names, as the log readers carry them, for monitor's TRL block (telemetry.logmap.is_trl_metric)
            fields.update((k, _scalar(v)) for k, v in logs.items() if k not in fields and is_trl_metric(k))
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

