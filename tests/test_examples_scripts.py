"""examples/trainer_callback.py and examples/plain_pytorch_loop.py run offline on CPU and write a
well-formed run log that `gradience monitor` reads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=240)


def _check_run_file(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["run_id"] for r in records}) == 1
    events = [r["event"] for r in records]
    assert events[0] == "run_start" and events[-1] == "run_end" and records[-1]["status"] == "ok"
    splits = {r["split"] for r in records if r["event"] == "eval"}
    assert splits == {"train", "test"}
    for r in records:
        if r["event"] == "eval":
            assert r["metrics"]["ppl"] == pytest.approx(math.exp(r["metrics"]["loss"]))
    assert any(r["event"] == "metrics" and r["kind"] == "lora_audit" for r in records)
    return records


@pytest.mark.slow
def test_trainer_callback_example(tmp_path: Path) -> None:
    proc = _run([str(REPO / "examples" / "trainer_callback.py"), "--out", "out", "--max-steps", "20"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _check_run_file(tmp_path / "out" / "run.jsonl")
    assert records[0]["config"]["lora"]["r"] == 8
    assert [r["step"] for r in records if r["event"] == "train_step"] == [5, 10, 15, 20]
    monitor = _run(["-m", "gradience", "monitor", str(tmp_path / "out" / "run.jsonl"), "--json"], tmp_path)
    assert monitor.returncode == 0, monitor.stderr
    assert json.loads(monitor.stdout)["run_id"] == records[0]["run_id"]


@pytest.mark.slow
def test_plain_pytorch_loop_example(tmp_path: Path) -> None:
    proc = _run([str(REPO / "examples" / "plain_pytorch_loop.py"), "--out", "out", "--steps", "20"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _check_run_file(tmp_path / "out" / "run.jsonl")
    assert [r["step"] for r in records if r["event"] == "train_step"] == list(range(1, 21))
    assert records[0]["config"]["optimizer"]["name"] == "adamw_torch"
    test_evals = [r for r in records if r["event"] == "eval" and r["split"] == "test"]
    assert [r["step"] for r in test_evals] == [20] and test_evals[0]["metrics"]["n"] == 200
    assert "telemetry written to" in proc.stdout
