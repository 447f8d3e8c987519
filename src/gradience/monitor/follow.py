"""``gradience monitor --follow RUN``: the summary of a run that is still being written, refreshed until its
``run_end``.

Each refresh reads only the bytes appended since the previous one (the reader resumes at the byte offset and
line number where it stopped, and leaves a half-written last line for the next refresh), feeds the new records
to the same streaming :class:`~gradience.monitor.analysis.RunAnalyzer` ``monitor`` uses, and builds the report
from it — so the work per refresh does not grow with the size of the log. The analysis keeps the newest run of
the file (or ``run_id``), exactly like ``monitor``. If the file shrinks (rotated or rewritten) it is read again
from the start. Returns data through a callback; printing is the CLI's job.

Other tools' logs are followed the same way (:class:`FollowedLog`): TensorBoard event files (the record framing
resumes at its byte offset per file; an events file that appears in the run's directory joins), a W&B run's
``run-*.wandb`` (DataStore resumes at the last whole record) and LLaMA-Factory's ``trainer_log.jsonl``. They
have no ``run_end``: the run is over once its end was read (the Trainer's end-of-training summary; W&B's exit
record) and a refresh finds no byte more; then the rest is read as a finished log (a record or line still cut
is now reported as truncated). ``max_idle`` ends any follow after that many seconds without a new record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.monitor.analysis import RunAnalyzer
from gradience.monitor.core import MonitorReport, build_report
from gradience.monitor.external import ExternalFeed, check_log, open_log
from gradience.monitor.sources import RunSource, resolve_run_path
from gradience.policy import thresholds as T
from gradience.telemetry.reader import DEFAULT_MAX_LINE_BYTES, TelemetryReader
from gradience.telemetry.types import ConfigSnapshot

MAX_ISSUES_PER_CODE = 20
_ONCE_CODES = ("unknown_event", "unknown_schema")  # reported once per file, not once per refresh


class _Followed:
    """What every followed log keeps: its source, the reading options and the report overrides."""

    def __init__(self, source: RunSource, run_id: str | None, strict: bool, gap_threshold: float,
                 task_profile: str | None, dataset: str | None) -> None:
        self.source = source
        self.path = source.path
        self.run_id = run_id
        self.strict = strict
        self.gap_threshold = gap_threshold
        self.overrides = {"task_profile": task_profile, "dataset": dataset}
        self.polls = 0


class FollowedRun(_Followed):
    """Incremental state of one growing telemetry log. ``poll()`` reads what was appended; ``report()``
    summarizes what was read so far; ``ended`` is True once the followed run wrote its ``run_end``."""

    def __init__(self, path: str | os.PathLike[str], *, run_id: str | None = None, strict: bool = False,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, gap_threshold: float = T.GAP_THRESHOLD,
                 task_profile: str | None = None, dataset: str | None = None) -> None:
        p = Path(path)
        source = resolve_run_path(p) if p.exists() else RunSource("telemetry", p)
        if source.kind == "trainer_state":
            raise InputError("--follow needs a telemetry log (.jsonl): a trainer_state.json is rewritten whole, "
                             "not appended; run `gradience monitor` on it instead", source.path)
        if source.kind != "telemetry":  # other tools' logs: FollowedLog
            raise InputError(f"--follow needs a telemetry log (.jsonl); this is a {source.kind} log: run "
                             "`gradience monitor` on it without --follow", source.path)
        super().__init__(source, run_id, strict, gap_threshold, task_profile, dataset)
        self.max_line_bytes = max_line_bytes
        self.bytes_read = 0       # over the whole follow (each byte of the file is read once)
        self.last_read = 0        # by the latest poll
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.lines = 0
        self.run_ids: list[str | None] = []
        self.analyzer: RunAnalyzer | None = None
        self._current: Any = object()
        self._issues: list[Issue] = []
        self._issue_counts: dict[str, int] = {}
        self._once: set[tuple[str, str]] = set()

    @property
    def ended(self) -> bool:
        return self.analyzer is not None and self.analyzer.status is not None

    def poll(self) -> int:
        """Read the lines appended since the last poll; returns the number of new records."""
        self.polls += 1
        self.last_read = 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0  # not created yet: keep waiting
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None
        if size < self.offset:
            self._reset()  # truncated or replaced: start over
        if size == self.offset:
            return 0
        reader = TelemetryReader(self.path, strict=self.strict, max_line_bytes=self.max_line_bytes,
                                 require_records=False)
        n = 0
        for rec in reader.records(start_offset=self.offset, start_line=self.lines, stop_at_partial=True):
            if rec.run_id not in self.run_ids:
                self.run_ids.append(rec.run_id)
            if self.run_id is not None:
                if rec.run_id != self.run_id:
                    continue
                if self.analyzer is None:
                    self.analyzer = RunAnalyzer(rec.run_id)
            elif rec.run_id != self._current and rec.run_id == self.run_ids[-1]:
                self._current = rec.run_id  # a new run starts: the newest run is the one followed
                self.analyzer = RunAnalyzer(rec.run_id)
            elif rec.run_id != self._current:
                continue
            assert self.analyzer is not None
            self.analyzer.feed(rec.event, rec.step, rec.data, rec.ts)
            n += 1
        self._add_issues(reader.issues)
        self.last_read = reader.offset - self.offset
        self.bytes_read += self.last_read
        self.offset = reader.offset
        self.lines = reader.lines
        return n

    def _add_issues(self, issues: list[Issue]) -> None:
        for issue in issues:
            if issue.code in _ONCE_CODES:
                key = (issue.code, str(issue.extra.get("event", issue.extra.get("schema", ""))))
                if key in self._once:
                    continue
                self._once.add(key)
            count = self._issue_counts.get(issue.code, 0) + 1
            self._issue_counts[issue.code] = count
            if count <= MAX_ISSUES_PER_CODE:
                self._issues.append(issue)

    def finish(self) -> None:
        """Nothing to close: a half-written last line of a run.jsonl stays unread."""

    def report(self) -> MonitorReport | None:
        """The summary so far, or None while no record of the followed run has been read."""
        if self.analyzer is None:
            return None
        config = ConfigSnapshot.from_dict(self.analyzer.config) if self.analyzer.config is not None else None
        return build_report(self.analyzer, source=self.source, runs=list(self.run_ids), issues=list(self._issues),
                            lines=self.lines, config=config, gap_threshold=self.gap_threshold, **self.overrides)


FOLLOWED_KINDS = ("tensorboard", "llamafactory", "wandb")


class FollowedLog(_Followed):
    """Incremental state of another tool's growing log (TensorBoard event files, LLaMA-Factory's
    ``trainer_log.jsonl``), with the interface of :class:`FollowedRun`. The reader keeps its byte offsets and
    its open step between polls; the events go to the same :class:`~gradience.monitor.external.ExternalFeed`
    one-shot ``monitor`` uses, so the final report is the one ``monitor`` gives on the finished log."""

    def __init__(self, source: RunSource, *, run_id: str | None = None, strict: bool = False,
                 gap_threshold: float = T.GAP_THRESHOLD, task_profile: str | None = None,
                 dataset: str | None = None) -> None:
        if source.kind not in FOLLOWED_KINDS:
            raise InputError(f"--follow reads a growing run.jsonl, TensorBoard event files, a W&B run directory or "
                             f"LLaMA-Factory's trainer_log.jsonl; this is a {source.kind} log (written whole): run "
                             "`gradience monitor` on it without --follow", source.path)
        super().__init__(source, run_id, strict, gap_threshold, task_profile, dataset)
        self._reset()

    def _reset(self) -> None:
        self.log = open_log(self.source.kind, self.path, self.run_id)
        self.feed = ExternalFeed(self.log)
        self.finished = False

    @property
    def ended(self) -> bool:
        return self.finished

    def poll(self) -> int:
        """Read what was appended since the last poll; returns the number of new records. Once the log holds
        the end-of-training summary, the first poll that finds nothing more (no byte) finishes it."""
        self.polls += 1
        if self.finished:
            return 0
        if self.log.shrunk():
            self._reset()  # rewritten: start over
        before = self.log.records
        self.feed.feed(self.log.poll())
        new = int(self.log.records - before)
        if self.log.ended and new == 0 and not self.log.pending():
            self.finish()
        return new

    def finish(self) -> None:
        """Read the rest as a finished log (a cut record is now a truncation issue) and close the open step."""
        if self.finished:
            return
        self.feed.feed(self.log.finish())
        self.finished = True
        check_log(self.source.kind, self.path, self.log, self.feed.n, strict=self.strict)

    def report(self) -> MonitorReport | None:
        """The summary so far, or None while no metric has been read."""
        if self.feed.n == 0:
            return None
        issues = list(self.log.issues) if self.finished else self.log.current_issues()
        return build_report(self.feed.analyzer, source=self.source, runs=list(self.log.runs), issues=issues,
                            lines=self.log.records, config=self.feed.snapshot, gap_threshold=self.gap_threshold,
                            **self.overrides)


def open_followed(path: str | os.PathLike[str], *, run_id: str | None = None, strict: bool = False,
                  gap_threshold: float = T.GAP_THRESHOLD, task_profile: str | None = None,
                  dataset: str | None = None) -> FollowedRun | FollowedLog:
    """The follower for the log at ``path`` (a path that does not exist yet is a run.jsonl to come)."""
    p = Path(path)
    if p.exists():
        source = resolve_run_path(p)
        if source.kind not in ("telemetry", "trainer_state"):
            return FollowedLog(source, run_id=run_id, strict=strict, gap_threshold=gap_threshold,
                               task_profile=task_profile, dataset=dataset)
    return FollowedRun(p, run_id=run_id, strict=strict, gap_threshold=gap_threshold, task_profile=task_profile,
                       dataset=dataset)


def _written(path: Path) -> bool:
    """The path exists, and a directory holds something (the Trainer creates its run directory just before
    the events file in it)."""
    try:
        return path.exists() and (not path.is_dir() or next(path.iterdir(), None) is not None)
    except OSError:
        return False


def follow(path: str | os.PathLike[str], *, on_report: Callable[[MonitorReport], None], interval: float = 5.0,
           run_id: str | None = None, strict: bool = False, gap_threshold: float = T.GAP_THRESHOLD,
           task_profile: str | None = None, dataset: str | None = None, max_idle: float | None = None,
           max_polls: int | None = None, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> MonitorReport | None:
    """Poll ``path`` every ``interval`` seconds, calling ``on_report`` whenever new records arrived, until the
    followed run ends, ``max_idle`` seconds pass without a new record, or ``max_polls`` polls were made;
    returns the final report. KeyboardInterrupt propagates (the CLI turns it into exit 0)."""
    if not interval > 0:
        raise InputError(f"--interval must be a positive number of seconds, got {interval}")
    if max_idle is not None and not max_idle > 0:
        raise InputError(f"--idle-timeout must be a positive number of seconds, got {max_idle}")
    last_new = clock()
    polls = 0

    def stop() -> bool:
        return (max_idle is not None and clock() - last_new >= max_idle) or (max_polls is not None
                                                                            and polls >= max_polls)

    while not _written(Path(path)):  # not written yet: its kind (run.jsonl, a TensorBoard run ...) is unknown
        polls += 1
        if stop():
            return None
        sleep(interval)
    run = open_followed(path, run_id=run_id, strict=strict, gap_threshold=gap_threshold,
                        task_profile=task_profile, dataset=dataset)
    while True:
        polls += 1
        if run.poll():
            last_new = clock()
            report = run.report()
            if report is not None:
                on_report(report)
        if run.ended:
            return run.report()
        if stop():
            run.finish()
            return run.report()
        sleep(interval)
