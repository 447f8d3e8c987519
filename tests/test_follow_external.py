"""``monitor --follow`` on other tools' growing logs (issue 22): TensorBoard event files written by torch's
real SummaryWriter and LLaMA-Factory's trainer_log.jsonl appended line by line.

Each refresh reads only what was appended (byte offsets per file); a record or line the writer has not
finished is not an error while following and is read whole at a later refresh; the final followed report
equals the one-shot ``monitor`` of the finished log.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.monitor import monitor_run
from gradience.monitor.follow import FollowedLog, follow, open_followed
from support.logs_runs import scripted_run

TRAINER_NAMES = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}
SUMMARY = {"train_runtime": 12.5, "train_samples_per_second": 3.0, "train_steps_per_second": 1.0,
           "total_flos": 1e9, "train_loss": 0.7}


def _writer(log_dir: Path) -> Any:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def _log_step(writer: Any, event: str, step: int, data: dict[str, Any]) -> None:
    """One log call of the Trainer's TensorBoardCallback (transformers ``rewrite_logs`` names)."""
    if event == "train_step":
        for key, value in data.items():
            writer.add_scalar(f"train/{TRAINER_NAMES[key]}", value, step)
    else:
        for key, value in data["metrics"].items():
            writer.add_scalar(f"eval/{key}", value, step)


def _log_summary(writer: Any, step: int) -> None:
    for key, value in SUMMARY.items():
        writer.add_scalar(f"train/{key}", value, step)


def _same(followed: Any, once: Any) -> None:
    assert followed is not None
    assert followed.to_dict() == once.to_dict()


def test_tensorboard_followed_between_flushes_equals_one_shot(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "Dec06_12-00-00_host"
    writer = _writer(run_dir)
    writer.add_text("args", json.dumps({"max_grad_norm": 0.5, "learning_rate": 1e-3}))
    events = scripted_run()
    _log_step(writer, *events[0])
    writer.flush()
    run = open_followed(tmp_path / "runs")
    assert isinstance(run, FollowedLog)
    assert run.poll() == 2 + 4  # file_version, the args text, the first step's four scalars (one record each)
    files = run.log.files
    assert len(files) == 1
    steps_seen = []
    for event in events[1:]:
        before = run.log.records
        _log_step(writer, *event)
        writer.flush()
        size = files[0].stat().st_size
        new = run.poll()
        # incremental: only the records appended since the last refresh are read, up to the file's end
        assert new == len(event[2] if event[0] == "train_step" else event[2]["metrics"])
        assert run.log.records == before + new and run.log._scanners[files[0]].offset == size
        assert run.poll() == 0  # nothing appended: nothing read
        report = run.report()
        assert report is not None and not run.ended
        steps_seen.append(report.training["steps_logged"])
        assert not [i for i in report.telemetry_issues if i.severity != "info"]
    # the step being logged stays open until the next one: the report lags by at most one step
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= 29
    _log_summary(writer, 30)
    writer.close()
    assert run.poll() == len(SUMMARY) and not run.ended  # the end-of-training summary ...
    assert run.poll() == 0 and run.ended  # ... and a refresh that brings nothing more: finished
    final = run.report()
    assert final is not None and final.training["steps_logged"] == 30
    assert final.training["hf_train_summary"]["train_runtime"] == 12.5
    _same(final, monitor_run(tmp_path / "runs"))
    # the clipping threshold came from the logged TrainingArguments, as in the one-shot read
    assert final.training["failure_signatures"]["clipping"]["max_grad_norm"] == 0.5


def test_tensorboard_writer_thread_and_new_event_file(tmp_path: Path) -> None:
    """A SummaryWriter in a thread (the Trainer's), then a second events file in the same run directory (a
    resumed run): follow() picks both up and ends at the summary; the result equals the one-shot monitor."""
    run_dir = tmp_path / "runs" / "Dec06_12-00-00_host"
    events = scripted_run(40)
    first = _writer(run_dir)
    _log_step(first, *events[0])
    first.flush()

    def train() -> None:
        writer = first
        for i, event in enumerate(events[1:], 1):
            if i == len(events) // 2:
                writer.close()
                time.sleep(1.1)  # event file names carry the time in seconds: the next one sorts after
                writer = _writer(run_dir)
            _log_step(writer, *event)
            writer.flush()
            time.sleep(0.002)
        _log_summary(writer, 40)
        writer.close()

    thread = threading.Thread(target=train)
    seen: list[int] = []
    thread.start()
    try:
        final = follow(run_dir, interval=0.01, on_report=lambda r: seen.append(r.training["steps_logged"]),
                       max_idle=60)
    finally:
        thread.join()
    assert len(sorted(run_dir.glob("*tfevents*"))) == 2
    assert seen == sorted(seen) and len(seen) > 2
    assert final is not None and final.training["steps_logged"] == 40
    _same(final, monitor_run(run_dir))


def test_follow_started_before_the_trainer_writes(tmp_path: Path) -> None:
    """``monitor --follow out/runs/<run>`` started before the Trainer created its run directory: it waits, then
    follows the event file it finds there; a path that never appears ends at the idle timeout with nothing."""
    run_dir = tmp_path / "runs" / "Dec06_12-00-00_host"
    events = scripted_run(12)

    def train() -> None:
        time.sleep(0.2)
        writer = _writer(run_dir)
        for event in events:
            _log_step(writer, *event)
            writer.flush()
        _log_summary(writer, 12)
        writer.close()

    pytest.importorskip("tensorboard")
    thread = threading.Thread(target=train)
    thread.start()
    try:
        final = follow(run_dir, interval=0.01, on_report=lambda r: None, max_idle=60)
    finally:
        thread.join()
    assert final is not None and final.source == "tensorboard" and final.training["steps_logged"] == 12
    _same(final, monitor_run(run_dir))
    assert follow(tmp_path / "never", interval=0.01, on_report=lambda r: None, max_polls=3) is None


def test_tensorboard_record_cut_mid_write_is_read_whole_later(tmp_path: Path) -> None:
    """The real writer's bytes appended in pieces that cut records anywhere (header, data, CRC): no issue while
    following, every record read once; a record still cut when the follow ends is reported as truncated."""
    src_dir = tmp_path / "src"
    writer = _writer(src_dir)
    for event in scripted_run():
        _log_step(writer, *event)
    _log_summary(writer, 30)
    writer.close()
    data = next(src_dir.glob("*tfevents*")).read_bytes()
    grown = tmp_path / "grown" / "events.out.tfevents.1700000000.host.1.0"
    grown.parent.mkdir()
    grown.write_bytes(b"")
    run = open_followed(grown)
    assert isinstance(run, FollowedLog)
    for i in range(0, len(data), 37):
        with open(grown, "ab") as f:
            f.write(data[i:i + 37])
        run.poll()
        report = run.report()
        if report is not None:
            assert not [x for x in report.telemetry_issues if x.severity != "info"], i
    run.poll()
    assert run.ended
    _same(run.report(), monitor_run(grown))
    # cut for good: the end of the follow (an idle timeout) reports the truncation one-shot monitor reports
    cut = tmp_path / "cut" / "events.out.tfevents.1700000000.host.1.0"
    cut.parent.mkdir()
    cut.write_bytes(data[:len(data) // 2 + 5])
    clock = iter(range(0, 1000, 10))
    final = follow(cut, interval=1, on_report=lambda r: None, max_idle=15, sleep=lambda s: None,
                   clock=lambda: float(next(clock)))
    assert final is not None and "truncated_record" in [i.code for i in final.telemetry_issues]
    _same(final, monitor_run(cut))


def _lf_line(event: str, step: int, data: dict[str, Any], total: int = 30) -> str:
    """``LogCallback.on_log`` (src/llamafactory/train/callbacks.py): keys whose value is None left out."""
    logs: dict[str, Any] = {"current_steps": step, "total_steps": total}
    if event == "train_step":
        logs.update(loss=data["loss"], lr=data["lr"], epoch=data["epoch"])
    else:
        logs.update(eval_loss=data["metrics"]["loss"], epoch=step / total)
    logs.update(percentage=round(step / total * 100, 2), elapsed_time="0:00:10", remaining_time="0:00:20")
    return json.dumps(logs) + "\n"


def test_llamafactory_appended_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    lines = [_lf_line(*e) for e in scripted_run()]
    # the end-of-training summary: LogCallback keeps only the counters of the Trainer's summary log
    lines.append(json.dumps({"current_steps": 30, "total_steps": 30, "epoch": 1.0, "percentage": 100.0,
                             "elapsed_time": "0:00:30", "remaining_time": "0:00:00"}) + "\n")
    path.write_text(lines[0])
    run = open_followed(path)
    assert isinstance(run, FollowedLog) and run.poll() == 1
    for line in lines[1:]:
        half = len(line) // 2
        with open(path, "a") as f:
            f.write(line[:half])  # the writer mid-line: not an error, not read yet
        offset = run.log.offset
        assert run.poll() == 0 and run.log.offset == offset
        with open(path, "a") as f:
            f.write(line[half:])
        assert run.poll() == 1 and run.log.offset == path.stat().st_size
        report = run.report()
        assert report is not None and not [i for i in report.telemetry_issues if i.code == "bad_log_entry"]
    assert not run.ended
    assert run.poll() == 0 and run.ended  # the summary line, then nothing more
    final = run.report()
    assert final is not None and final.training["steps_logged"] == 30 and final.lines == len(lines)
    _same(final, monitor_run(path))


def test_llamafactory_cut_line_at_the_end_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    events = scripted_run()[:12]  # 11 train steps and the eval at step 10
    path.write_text("".join(_lf_line(*e) for e in events) + '{"current_steps": 12, "total_')
    final = follow(path, interval=0.01, on_report=lambda r: None, max_polls=3)
    assert final is not None and final.training["steps_logged"] == 11
    bad = [i for i in final.telemetry_issues if i.code == "bad_log_entry"]
    assert len(bad) == 1 and "line 13" in bad[0].message
    _same(final, monitor_run(path))


def test_cli_follow_tensorboard_and_llamafactory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "Dec06_12-00-00_host"
    events = scripted_run()
    writer = _writer(run_dir)
    _log_step(writer, *events[0])
    writer.flush()

    def train() -> None:
        for event in events[1:]:
            _log_step(writer, *event)
            writer.flush()
            time.sleep(0.002)
        _log_summary(writer, 30)
        writer.close()

    thread = threading.Thread(target=train)
    thread.start()
    try:
        rc = main(["monitor", str(tmp_path / "runs"), "--follow", "--json", "--interval", "0.01",
                   "--idle-timeout", "60"])
    finally:
        thread.join()
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert main(["monitor", str(tmp_path / "runs"), "--json"]) == 0
    assert json.loads(out) == json.loads(capsys.readouterr().out)
    # a LLaMA-Factory log without its end line: --idle-timeout ends the follow, with the text summary
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(_lf_line(*e) for e in events))
    rc = main(["monitor", str(path), "--follow", "--interval", "0.01", "--idle-timeout", "0.05"])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "") and "Steps logged: 30" in out.split("GRADIENCE MONITOR")[-1]
    assert main(["monitor", str(path), "--follow", "--idle-timeout", "0"]) == 2
    assert "--idle-timeout must be a positive number" in capsys.readouterr().err


def test_follow_refuses_logs_written_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A W&B history export is written once: --follow says so in one line naming its kind."""
    export = tmp_path / "export.csv"
    export.write_text("Step,train/loss\n1,0.5\n")
    assert main(["monitor", str(export), "--follow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this is a wandb_export log" in err[0] and "internal error" not in err[0]


@pytest.mark.slow
def test_wandb_offline_run_grown_in_pieces(tmp_path: Path) -> None:
    """A real offline W&B run's transaction log appended in pieces that cut its fragments anywhere: no corrupt
    record while following; the exit record ends the follow; the result equals the one-shot monitor."""
    pytest.importorskip("wandb.sdk.internal.datastore")
    from test_logs_wandb import write_wandb_run

    (tmp_path / "w").mkdir()
    src = write_wandb_run(tmp_path / "w", scripted_run(), pad=500)
    data = next(src.glob("run-*.wandb")).read_bytes()
    grown = tmp_path / "wandb" / src.name
    grown.mkdir(parents=True)
    target = grown / next(src.glob("run-*.wandb")).name
    target.write_bytes(data[:3])  # not even the header yet
    run = open_followed(grown)
    assert isinstance(run, FollowedLog)
    piece = max(1, len(data) // 150)
    for i in range(3, len(data), piece):
        with open(target, "ab") as f:
            f.write(data[i:i + piece])
        run.poll()
        report = run.report()
        if report is not None:
            assert not [x for x in report.telemetry_issues if x.severity != "info"], i
    run.poll()
    assert run.ended
    final = run.report()
    assert final is not None and final.training["steps_logged"] == 30
    _same(final, monitor_run(grown))
    # stopped mid-run: the record cut at the end of the follow is what one-shot monitor reports
    target.write_bytes(data[:len(data) // 2])
    _same(follow(grown, interval=0.01, on_report=lambda r: None, max_polls=2), monitor_run(grown))
    # cut at a block boundary, after the FIRST fragment of a record whose LAST is in the next block: DataStore
    # ends there without a word; it is reported as a truncation
    target.write_bytes(data[:32 * 1024])
    once = monitor_run(grown)
    cut = [i for i in once.telemetry_issues if i.code == "truncated_record"]
    assert len(cut) == 1 and 0 < cut[0].extra["offset"] < 32 * 1024 and cut[0].severity == "warning"
    _same(follow(grown, interval=0.01, on_report=lambda r: None, max_polls=2), once)
