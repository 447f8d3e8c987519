"""Runs logged by other tools (TensorBoard, W&B, W&B exports, LLaMA-Factory) -> a fed ``RunAnalyzer``.

The readers (``gradience.telemetry.tensorboard`` / ``wandb`` / ``llamafactory``) stream run events in the
shapes of ``run.jsonl``, so the analysis, gates, ``--json`` and ``report`` are the ones of a Gradience log.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError, InputError
from gradience.issues import Issue
from gradience.monitor.analysis import RunAnalyzer
from gradience.telemetry.types import ConfigSnapshot

EXTERNAL_KINDS = ("tensorboard", "wandb", "wandb_export", "llamafactory")


@dataclass
class ExternalRun:
    analyzer: RunAnalyzer
    issues: list[Issue]
    runs: list[str | None]
    lines: int
    config: ConfigSnapshot | None


def open_log(kind: str, path: Path, run_id: str | None) -> Any:
    """The reader for ``kind`` (its optional dependency is imported here, lazily)."""
    if kind == "tensorboard":
        from gradience.telemetry.tensorboard import TensorBoardLog

        return TensorBoardLog(path, run_id)
    if kind == "wandb":
        from gradience.telemetry.wandb import WandbLog

        return WandbLog(path, run_id)
    from gradience.telemetry.llamafactory import LlamaFactoryLog, WandbExportLog

    return (LlamaFactoryLog if kind == "llamafactory" else WandbExportLog)(path, run_id)


def _snapshot(training_args: dict[str, Any] | None) -> ConfigSnapshot | None:
    """TrainingArguments (TensorBoard's ``args`` text, W&B's run config) -> a ConfigSnapshot; None when the
    log holds none or it cannot be read as a config."""
    if not training_args:
        return None
    try:
        from gradience.config import snapshot_from_sources

        return snapshot_from_sources(training=training_args)
    except (ImportError, NotImplementedError, GradienceError):
        return None


class ExternalFeed:
    """A reader's events -> its ``RunAnalyzer``. The run's config (the TrainingArguments TensorBoard's
    ``args`` text or W&B's config carry) is taken when the first event arrives: the config records come
    first. Fed in one go (``monitor``) or refresh by refresh (``monitor --follow``)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.analyzer = RunAnalyzer(getattr(log, "run_id", None))
        self.n = 0
        self.configured = False
        self.snapshot: ConfigSnapshot | None = None

    def feed(self, events: Iterable[tuple[str, int | None, dict[str, Any]]]) -> None:
        analyzer = self.analyzer
        for event, step, data in events:
            if not self.configured:
                self.configured = True
                log = self.log
                self.snapshot = _snapshot(getattr(log, "training_args", None) or getattr(log, "config", None))
                _configure(analyzer, log, self.snapshot)
            analyzer.feed(event, step, data)
            self.n += 1
        analyzer.run_id = self.log.run_id
        if self.log.summary:
            analyzer.summary_extra["hf_train_summary"] = self.log.summary


def check_log(kind: str, path: Path, log: Any, n_events: int, *, strict: bool) -> None:
    """The ends of a read that leave nothing to report: an issue under ``--strict-schema``, no metrics."""
    if strict and log.issues:
        bad = next((i for i in log.issues if i.severity != "info"), None)
        if bad is not None:
            raise InputError(f"{bad.message} (strict schema)", path)
    if n_events == 0:
        problem = f"; {log.issues[0].message}" if log.issues else ""
        raise InputError(f"no train or eval metrics in this {kind} log{problem}", path)


def read_external(kind: str, path: Path, *, run_id: str | None, strict: bool) -> ExternalRun:
    log = open_log(kind, path, run_id)
    feed = ExternalFeed(log)
    feed.feed(log.events())
    check_log(kind, path, log, feed.n, strict=strict)
    return ExternalRun(feed.analyzer, log.issues, list(log.runs), log.records, feed.snapshot)


def _configure(analyzer: RunAnalyzer, log: Any, snapshot: ConfigSnapshot | None) -> None:
    """What the log says about clipping: the logged TrainingArguments' ``max_grad_norm`` when there are some,
    else the Trainer's default for logs written by the Trainer (as for trainer_state.json)."""
    meta = {"framework": "transformers"} if log.transformers else None
    if snapshot is not None or meta is not None:
        analyzer.train.signatures.configure(None if snapshot is None else snapshot.to_dict(), meta)


def is_external_log(path: Path) -> bool:
    """A log another tool wrote that ``monitor`` reads (``report`` asks, to show it as a run)."""
    from gradience.monitor.sources import resolve_run_path

    try:
        return resolve_run_path(path).kind in EXTERNAL_KINDS
    except InputError:
        return False


def source_events(source: Any, run_id: str | None) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    """The run events of a trainer_state.json or another tool's log (``report``'s curves)."""
    if source.kind in EXTERNAL_KINDS:
        yield from open_log(source.kind, source.path, run_id).events()
        return
    from gradience.monitor.sources import read_trainer_state

    yield from read_trainer_state(source.path).events
