"""A real Trainer run (tiny GPT-2 + PEFT, report_to=["tensorboard"], checkpoints every 4 steps): monitor on its
TensorBoard events (issue 22) and the checkpoint series."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.monitor import monitor_run

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    from transformers import Trainer, TrainingArguments

    from support.tiny_models import gpt2_lora_for_trainer

    model, data = gpt2_lora_for_trainer(tiny_gpt2_dir, seed=0)

    out_dir = tmp_path_factory.mktemp("hf") / "out"
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=3e-3, warmup_steps=3, lr_scheduler_type="linear", logging_steps=1, max_grad_norm=0.5,
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4, report_to=["tensorboard"],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data(32), eval_dataset=data(8)).train()
    return out_dir


def _history(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((out_dir / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_trainer_tensorboard_events(hf_run: Path) -> None:
    """The Trainer's own TensorBoardCallback output: the same steps and (float32) values as its trainer_state."""
    history = _history(hf_run)
    train = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    report = monitor_run(hf_run / "runs")
    assert report.source == "tensorboard"
    t = report.training
    assert t["steps_logged"] == len(train) == 12 and t["last_step"] == 12
    assert t["last_loss"] == float(np.float32(train[-1]["loss"]))
    assert t["min_loss"] == float(np.float32(min(e["loss"] for e in train)))
    assert t["grad_norm_max"] == pytest.approx(max(e["grad_norm"] for e in train), rel=1e-6)
    assert report.signals["eval_splits"] == ["eval"]
    assert report.signals["test"]["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    # the TrainingArguments the callback wrote as text: max_grad_norm and lr reach the config and the rules
    clipping = t["failure_signatures"]["clipping"]
    assert clipping["max_grad_norm"] == 0.5 and clipping["max_grad_norm_source"] == "config"
    assert report.config is not None and report.config.optimizer.lr == pytest.approx(3e-3)
    # eval/runtime etc. are eval metrics; nothing the Trainer logs is "unknown" except its speed counters
    unknown = [i for i in report.telemetry_issues if i.code == "unknown_tag"]
    assert all(not k.startswith(("train/loss", "eval/loss")) for i in unknown for k in i.extra["tags"])


@pytest.mark.slow
def test_series_table_and_suggestion(hf_run: Path, tiny_gpt2_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.adapter import load_adapter
    from gradience.audit import AuditOptions, run_audit
    from gradience.series import SeriesOptions, run_series

    ckpts = [hf_run / f"checkpoint-{s}" for s in (12, 4, 8)]  # any order in, step order out
    doc = run_series(ckpts, SeriesOptions(base_model=str(tiny_gpt2_dir)))
    assert doc["schema"] == "gradience.series/v1" and doc["metric"] == "eval_loss" and doc["mode"] == "min"
    rows = doc["checkpoints"]
    assert [r["step"] for r in rows] == [4, 8, 12]
    evals = {e["step"]: e["eval_loss"] for e in _history(hf_run) if "eval_loss" in e}
    for r in rows:
        assert r["eval_step"] == r["step"] and r["eval"]["eval_loss"] == evals[r["step"]]
        direct = run_audit(load_adapter(r["path"]), AuditOptions(udr=True, base_model=str(tiny_gpt2_dir)))
        summary = direct.to_summary(include_layers=False)
        assert r["audit"]["utilization_mean"] == summary["utilization_mean"]
        assert r["audit"]["udr_median"] == summary["udr_median"] is not None
    best_step = min(evals, key=lambda s: (evals[s], s))
    s = doc["suggestion"]
    assert s["checkpoint"] == f"checkpoint-{best_step}" and s["value"] == evals[best_step]
    assert s["moved"]["udr_median"] == {"from": rows[0]["audit"]["udr_median"],
                                        "to": next(r for r in rows if r["step"] == best_step)["audit"]["udr_median"]}
    assert "best eval_loss" in s["text"] and "predict" not in s["text"]
    # the output directory expands to its checkpoints; the CLI table and JSON
    assert main(["series", str(hf_run), "--base-model", str(tiny_gpt2_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["checkpoints"] == rows
    series_json = tmp_path / "series.json"
    series_json.write_text(out)
    assert main(["series", str(hf_run), "--no-udr", "--metric", "eval_loss"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint-4" in text and f"Suggested: checkpoint-{best_step}" in text
    # the report view: table and both charts
    page = tmp_path / "series.html"
    assert main(["report", str(series_json), "-o", str(page)]) == 0
    capsys.readouterr()
    html = page.read_text()
    assert "Checkpoint series" in html and f"checkpoint-{best_step} has the best" in html and html.count("<svg") >= 2
    assert not math.isnan(s["value"])


def test_series_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["series", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["series", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint-* directories" in err[0]
