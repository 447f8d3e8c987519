"""A real 2-process DDP run (torchrun, gloo, CPU) with GradienceCallback: exactly one well-formed run file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support_ddp_script.py"


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    # --standalone: a local rendezvous on a free port, so parallel test runs never collide.
    cmd += ["--standalone", "--nproc_per_node", "2", str(SCRIPT), "--out", str(tmp_path / "out"),
            "--max-steps", "12"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    # start_new_session: on timeout the whole process group (torchrun and its workers) is killed.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]

    files = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".jsonl")
    assert files == ["run.jsonl"]
    lines = (tmp_path / "out" / "run.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole, strict JSON (no interleaving)
    assert len({r["run_id"] for r in records}) == 1
    events = [r["event"] for r in records]
    assert events.count("run_start") == 1 and events.count("run_end") == 1
    assert events[0] == "run_start" and events[-1] == "run_end" and records[-1]["status"] == "ok"
    assert records[0]["meta"]["world_size"] == 2
    assert records[0]["meta"]["effective_batch_size"] == 16  # 8 per device x 2 processes
    assert [r["step"] for r in records if r["event"] == "train_step"] == [2, 4, 6, 8, 10, 12]
    # The train-eval subset ran on both ranks (the loop gathers) and was logged once per evaluation.
    evals = [(r["step"], r["split"]) for r in records if r["event"] == "eval"]
    assert evals == [(6, "test"), (6, "train"), (12, "test"), (12, "train")]
    assert all(r["metrics"]["n"] == 32 for r in records if r["event"] == "eval" and r["split"] == "train")
    assert sum(1 for r in records if r["event"] == "metrics" and r["kind"] == "lora_audit") == 1
