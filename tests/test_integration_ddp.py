"""A real 2-process DDP run (torchrun, gloo, CPU) with GradienceCallback: exactly one well-formed run file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.ddp import run_torchrun

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support_ddp_script.py"


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(tmp_path: Path) -> None:
    run_torchrun(SCRIPT, ["--out", str(tmp_path / "out"), "--max-steps", "12"], tmp_path, timeout=180)

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
