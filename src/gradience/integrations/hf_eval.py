"""Evaluation side of the HF callback: split names of the Trainer's evaluations and the train-eval subset pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from gradience.integrations.hf_values import _strip_prefix

if TYPE_CHECKING:
    from gradience.integrations.hf_config import GradienceCallbackConfig

_EVAL_PREFIX = "eval_"
_TRAIN_EVAL_PREFIX = "train_eval_"


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


class EvalHooks:
    """Mixin of :class:`gradience.integrations.hf.GradienceCallback`: which split an evaluation is, and the
    train-eval subset scored with the Trainer's own evaluation loop (see the ``hf`` module docstring)."""

    config: GradienceCallbackConfig
    trainer: Any
    _training: bool
    _train_eval: Any
    _train_eval_ready: bool

    if TYPE_CHECKING:  # provided by GradienceCallback
        def _warn_once(self, kind: str, message: str) -> None: ...

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
