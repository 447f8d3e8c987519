"""``gradience monitor --follow``: incremental reads of a growing log (each byte read once, partial lines left
for the next refresh), a writer thread appending until run_end, and Ctrl-C in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradience.cli.main import main
from gradience.monitor.follow import FollowedRun, follow
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot

REPO = Path(__file__).resolve().parents[1]


def test_each_poll_reads_only_the_new_bytes(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    run = FollowedRun(path)
    assert run.poll() == 0 and run.report() is None  # not created yet: waiting, not an error
    tw = TelemetryWriter(path, run_id="r1")
    tw.run_start(ConfigSnapshot(model_name="m"))
    for s in range(1, 101):
        tw.train_step(s, loss=1.0 / s, lr=1e-3)
    assert run.poll() == 101 and run.last_read == path.stat().st_size
    report = run.report()
    assert report is not None and report.training["steps_logged"] == 100 and not run.ended
    # A much larger file: the next poll reads only what was appended since.
    size_before = path.stat().st_size
    for s in range(101, 111):
        tw.train_step(s, loss=0.5, lr=1e-3)
    assert run.poll() == 10
    assert run.last_read == path.stat().st_size - size_before
    # A half-written line is left for the next poll, then read whole.
    with open(path, "ab") as fh:
        fh.write(b'{"schema": "gradience.vnext.telemetry/v1", "ts": 1.0, "run_id": "r1", "event": "train_st')
    assert run.poll() == 0 and run.last_read == 0
    with open(path, "ab") as fh:
        fh.write(b'ep", "step": 111, "loss": 0.25}\n')
    assert run.poll() == 1
    tw.run_end("ok", step=111)
    tw.close()
    assert run.poll() == 1 and run.ended
    final = run.report()
    assert final is not None and final.training["steps_logged"] == 111 and final.training["last_loss"] == 0.25
    assert final.training["status"] == "ok" and final.telemetry_issues == []
    assert run.bytes_read == path.stat().st_size  # every byte read exactly once over the whole follow
    assert final.lines == len(path.read_bytes().splitlines()) == 113  # line numbers continue across polls


def test_final_summary_matches_a_one_shot_monitor(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, run_id="old") as tw:  # an earlier run in the same file is not followed
        tw.run_start(ConfigSnapshot(model_name="old"))
        tw.train_step(1, loss=9.0)
    tw = TelemetryWriter(path, run_id="new")
    tw.run_start(ConfigSnapshot(model_name="m", dataset_name="d"))
    stop = threading.Event()

    def writer() -> None:
        for s in range(1, 41):
            tw.train_step(s, loss=2.0 - s * 0.01, grad_norm=float("nan") if s == 20 else 1.0, lr=1e-3)
            if s % 10 == 0:
                tw.eval(s, "test", {"loss": 1.5, "accuracy": 0.6})
                time.sleep(0.02)
        tw.run_end("ok", step=40)
        tw.close()
        stop.set()

    thread = threading.Thread(target=writer)
    seen: list[int] = []
    thread.start()
    final = follow(path, interval=0.01, on_report=lambda r: seen.append(r.training["steps_logged"]))
    thread.join()
    assert final is not None and final.run_id == "new" and final.runs == ["old", "new"]
    assert seen == sorted(seen) and seen[-1] == 40
    from gradience.monitor import monitor_run

    once = monitor_run(path)
    assert final.to_dict() == once.to_dict()


def test_cli_follow_until_run_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    tw = TelemetryWriter(path)
    tw.run_start(ConfigSnapshot(model_name="tiny-follow"))

    def writer() -> None:
        for s in range(1, 31):
            tw.train_step(s, loss=1.0, lr=1e-3)
            time.sleep(0.005)
        tw.run_end("ok", step=30)
        tw.close()

    thread = threading.Thread(target=writer)
    thread.start()
    rc = main(["monitor", str(path), "--follow", "--interval", "0.02"])
    thread.join()
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    last = out.split("GRADIENCE MONITOR")[-1]
    assert "Steps logged: 30 (steps 1-30)" in last and "tiny-follow" in last
    # --json prints the final report once.
    rc = main(["monitor", str(path), "--follow", "--json", "--interval", "0.01"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["training"]["steps_logged"] == 30 and data["training"]["status"] == "ok"


def test_cli_follow_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0}]}))
    assert main(["monitor", str(state), "--follow"]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.json" in err and "--follow needs a telemetry log" in err and len(err.splitlines()) == 1
    log = tmp_path / "run.jsonl"
    log.write_text("")
    assert main(["monitor", str(log), "--follow", "--interval", "0"]) == 2
    assert "--interval must be a positive number" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.run_start(ConfigSnapshot(model_name="m"))
        tw.train_step(1, loss=1.0)
    # The writer's context writes run_end only on an exception: this run stays open, --follow waits.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "gradience", "monitor", str(path), "--follow",
                             "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first redraw has started
        assert "=" in first
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
