"""The Guard under a real 2-process DDP run (torchrun, gloo, CPU) with faults injected on one rank only:
every rank takes the same decisions and restores the same snapshot (identical parameter hashes at every
step), and only rank 0 writes the run log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from support.ddp import run_torchrun

pytest.importorskip("torch")
pytest.importorskip("peft")

from gradience.telemetry.reader import read_events

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support_guard_ddp.py"


@pytest.mark.slow
def test_ddp_ranks_agree_on_every_rollback(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_torchrun(SCRIPT, ["--out", str(out), "--max-steps", "14", "--nan-step", "5", "--spike-step", "10"],
                 tmp_path, timeout=240)

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Same trainable parameters, bit for bit, at the end of every step on both ranks: no divergence.
    assert ranks[0]["hashes"] == ranks[1]["hashes"] and len(ranks[0]["hashes"]) == 14
    assert all(r["final_step"] == 14 and r["finite"] for r in ranks)
    # The NaN (rank 0 only) and the spike (rank 1 only) were each acted on by both ranks, identically.
    for r in ranks:
        assert [(e["trigger"], e["step"], e["restored_step"]) for e in r["events"]] == [
            ("nonfinite_grad_norm", 5, 4), ("loss_spike", 10, 8)]
    assert ranks[0]["events"] == ranks[1]["events"]
    # A rollback restores the state of its snapshot on both ranks (hash after step 5 == hash after step 4).
    h = ranks[0]["hashes"]
    assert h["5"] == h["4"] and h["10"] == h["8"] and h["6"] != h["5"]

    # One run file, written by rank 0 only: one alert + one guard metrics event per action.
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".jsonl") == ["run.jsonl"]
    records = [rec.data for rec in read_events(out / "run.jsonl")]
    assert len({r["run_id"] for r in records}) == 1
    guard = [r["metrics"] for r in records if r["event"] == "metrics" and r["kind"] == "guard"]
    assert [(g["trigger"], g["step"]) for g in guard] == [("nonfinite_grad_norm", 5), ("loss_spike", 10)]
    assert [r["code"] for r in records if r["event"] == "alert"] == ["guard_rollback", "guard_rollback"]
    # The spike was judged on the mean loss over both ranks.
    assert guard[1]["loss"] > 5 * guard[1]["running_median"] and math.isfinite(guard[1]["loss"])
    assert records[-1]["event"] == "run_end" and records[-1]["status"] == "ok"
    assert records[0]["meta"]["world_size"] == 2
