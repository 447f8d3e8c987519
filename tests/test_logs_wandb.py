"""monitor on a real W&B offline run directory (issue 22): written by ``wandb`` itself (WANDB_MODE=offline,
no network), read back through W&B's own DataStore and Record classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.monitor import monitor_run
from support.logs_runs import assert_same_but_clipping_default, reference_jsonl, run_json, scripted_run

pytest.importorskip("wandb.sdk.internal.datastore")

WRITER = """
import json, sys
import wandb
events = json.loads(open(sys.argv[2]).read())
names = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "epoch": "train/epoch"}
run = wandb.init(project="gradience-test", dir=sys.argv[1], config={"learning_rate": 1e-3, "max_grad_norm": 1.0,
                                                                    "lora_r": 8})
run.define_metric("train/global_step")
run.define_metric("*", step_metric="train/global_step", step_sync=True)
pad = int(sys.argv[3])
for event, step, data in events:
    row = {"train/global_step": step}
    if event == "train_step":
        row.update({names[k]: v for k, v in data.items()})
    else:
        row.update({"eval/" + k: v for k, v in data["metrics"].items()})
    if pad:
        row["train/padding_text_metric"] = "x" * pad
    run.log(row)
run.finish()
"""


def write_wandb_run(root: Path, events: list[Any], pad: int = 0) -> Path:
    script = root / "writer.py"
    script.write_text(WRITER)
    data = root / "events.json"
    data.write_text(json.dumps(events))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off"}
    subprocess.run([sys.executable, str(script), str(root), str(data), str(pad)], check=True, env=env,
                   timeout=180, capture_output=True)
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    return runs[0]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # padded rows make the log span several 32 KiB blocks (the corruption test needs a later block)
    return write_wandb_run(tmp_path_factory.mktemp("wb"), scripted_run(), pad=3000)


@pytest.mark.slow
def test_wandb_offline_run_equals_jsonl(wandb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = run_json(capsys, reference_jsonl(tmp_path / "run.jsonl", scripted_run()))
    for path in (wandb_run, wandb_run.parent, wandb_run.parent.parent, next(wandb_run.glob("run-*.wandb"))):
        ours = run_json(capsys, path)
        assert ours["source"] == "wandb"
        assert_same_but_clipping_default(ours, ref)
    assert ours["run_id"] == wandb_run.name.rsplit("-", 1)[1]
    # max_grad_norm comes from the run's config (WandbCallback logs the TrainingArguments there)
    clipping = ours["training"]["failure_signatures"]["clipping"]
    assert clipping["max_grad_norm"] == 1.0 and clipping["max_grad_norm_source"] == "config"
    unknown = [i for i in ours["telemetry_issues"] if i["code"] == "unknown_tag"]
    assert unknown and "train/padding_text_metric" in unknown[0]["tags"]


@pytest.mark.slow
def test_wandb_corrupt_record(wandb_run: Path, tmp_path: Path) -> None:
    """A flipped byte in the second 32 KiB block: one problem, at the offset of the record holding it; the
    blocks after it are read."""
    original = next(wandb_run.glob("run-*.wandb"))
    data = bytearray(original.read_bytes())
    assert len(data) > 4 * 32768
    data[32768 + 100] ^= 0xFF
    bad_dir = tmp_path / "offline-run-20260101_000000-corrupt"
    bad_dir.mkdir()
    (bad_dir / original.name).write_bytes(bytes(data))
    full = monitor_run(wandb_run)
    report = monitor_run(bad_dir)
    corrupt = [i for i in report.telemetry_issues if i.code == "corrupt_record"]
    assert len(corrupt) == 1 and corrupt[0].severity == "warning"
    assert 0 < corrupt[0].extra["offset"] <= 32768 + 100 - 7 < corrupt[0].extra["offset"] + 65536
    assert report.training["last_step"] == full.training["last_step"]
    assert 0 < report.training["steps_logged"] < full.training["steps_logged"]
    # not a W&B log at all: one input error
    (bad_dir / original.name).write_bytes(b":W&X" + bytes(data[4:]))
    assert main(["monitor", str(bad_dir)]) == 2
