"""Shared by the issue-22 tests: one scripted run and the monitor of a run.jsonl holding its values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main

# Keys that name the input rather than describe the run.
BOOKKEEPING = ("source", "file", "run_id", "runs", "telemetry_issues", "audit_hint")


def f32(x: float) -> float:
    """TensorBoard stores scalars as float32: the reference log holds the same rounded values."""
    return float(np.float32(x))


def scripted_run(n: int = 30) -> list[tuple[str, int, dict[str, Any]]]:
    """A run with a warmup+decay lr, a loss spike, a NaN loss and evals on two splits every 10 steps."""
    events: list[tuple[str, int, dict[str, Any]]] = []
    for step in range(1, n + 1):
        loss = 2.0 * math.exp(-step / 10) + 0.25
        if step == 17:
            loss = 9.0
        if step == 23:
            loss = float("nan")
        lr = 1e-3 * min(step / 5, (n - step + 1) / (n - 4))
        events.append(("train_step", step, {"loss": loss, "lr": lr, "grad_norm": 0.5 + step / 40,
                                            "epoch": step / n}))
        if step % 10 == 0:
            events.append(("eval", step, {"split": "eval", "metrics": {"loss": 0.4 + step / 100, "accuracy": 0.5}}))
    return events


def reference_jsonl(path: Path, events: list[tuple[str, int, dict[str, Any]]], rounding: Any = float) -> Path:
    lines = []
    for event, step, data in events:
        if event == "train_step":
            payload: dict[str, Any] = {k: rounding(v) for k, v in data.items()}
        else:
            payload = {"split": data["split"], "metrics": {k: rounding(v) for k, v in data["metrics"].items()}}
        rec = {"schema": "gradience.telemetry/v1", "run_id": "r", "event": event, "step": step, **payload}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_json(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> dict[str, Any]:
    rc = main(["monitor", str(path), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def assert_same_run(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    a = {k: v for k, v in ours.items() if k not in BOOKKEEPING}
    b = {k: v for k, v in ref.items() if k not in BOOKKEEPING}
    assert a == b


def assert_same_but_clipping_default(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    """A Trainer log (its max_grad_norm default known) against a run.jsonl without a run_start: equal but for
    the clipping evidence that default adds."""
    assert ours["signals"] == ref["signals"] and ours["alerts"] == ref["alerts"]
    ours, ref = json.loads(json.dumps(ours)), json.loads(json.dumps(ref))
    for doc in (ours, ref):
        del doc["training"]["failure_signatures"]["clipping"]
    assert ours["training"] == ref["training"]
    # the run rules' findings (config advice aside: a log with a config also gets the check rules)
    assert [f for f in ours["status"]["findings"] if f["code"] != "clipping_saturated"] == \
        [f for f in ref["status"]["findings"] if f["code"] != "clipping_saturated"]
