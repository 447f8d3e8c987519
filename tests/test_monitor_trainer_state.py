"""``gradience monitor`` on Hugging Face ``trainer_state.json``: hand-written cases and a real Trainer run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.monitor import monitor_run
from gradience.monitor.sources import read_trainer_state, resolve_run_path


def write_state(path: Path, log_history: list[dict[str, Any]], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": 0, "log_history": log_history, **extra}))
    return path


def test_log_history_mapping(tmp_path: Path) -> None:
    history = [
        {"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 3.0, "epoch": 0.1, "step": 1},
        {"loss": 1.5, "learning_rate": 5e-5, "grad_norm": 2.0, "epoch": 0.2, "step": 2},
        {"eval_loss": 1.2, "eval_accuracy": 0.55, "eval_runtime": 0.1, "epoch": 0.2, "step": 2},
        {"eval_train_loss": 0.9, "eval_train_accuracy": 0.8, "eval_test_loss": 1.1, "eval_test_accuracy": 0.6,
         "epoch": 0.2, "step": 2},
        {"train_runtime": 3.2, "train_samples_per_second": 10.0, "train_loss": 1.75, "total_flos": 1.0,
         "epoch": 0.2, "step": 2},
    ]
    state = read_trainer_state(write_state(tmp_path / "trainer_state.json", history, train_batch_size=4,
                                           max_steps=2, num_train_epochs=1))
    assert state.events == [
        ("train_step", 1, {"loss": 2.0, "lr": 1e-4, "grad_norm": 3.0, "epoch": 0.1}),
        ("train_step", 2, {"loss": 1.5, "lr": 5e-5, "grad_norm": 2.0, "epoch": 0.2}),
        ("eval", 2, {"split": "eval", "metrics": {"loss": 1.2, "accuracy": 0.55, "runtime": 0.1}}),
        ("eval", 2, {"split": "train", "metrics": {"loss": 0.9, "accuracy": 0.8}}),
        ("eval", 2, {"split": "test", "metrics": {"loss": 1.1, "accuracy": 0.6}}),
    ]
    assert state.summary["train_runtime"] == 3.2  # the summary entry is not a train step
    assert (state.config.training.batch_size, state.config.training.max_steps) == (4, 2)
    report = monitor_run(tmp_path / "trainer_state.json")
    assert report.source == "trainer_state" and report.training["steps_logged"] == 2
    assert report.signals["test_split"] == "test" and report.signals["gap"] == pytest.approx(math.exp(1.1 - 0.9))
    assert report.training["hf_train_summary"]["train_loss"] == 1.75


def test_eval_only_uses_the_eval_split_as_test_and_says_so(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_state(tmp_path / "trainer_state.json",
                       [{"loss": 1.0, "step": 1}, {"eval_loss": 0.8, "step": 1}])
    assert main(["monitor", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"  Test  PPL: {math.exp(0.8):.2f}" in out and "'eval' stands in for test" in out
    assert "  Train PPL: -" in out and "log_train_test_ppl" in out


def test_directory_picks_the_latest_checkpoint_numerically(tmp_path: Path) -> None:
    for n in (4, 8, 12):
        write_state(tmp_path / f"checkpoint-{n}" / "trainer_state.json", [{"loss": float(n), "step": n}])
    source = resolve_run_path(tmp_path)
    assert source.path == tmp_path / "checkpoint-12" / "trainer_state.json"
    assert monitor_run(tmp_path).training["last_loss"] == 12.0
    write_state(tmp_path / "trainer_state.json", [{"loss": 99.0, "step": 1}])  # top level wins
    assert monitor_run(tmp_path).training["last_loss"] == 99.0


def test_trainer_state_errors(tmp_path: Path) -> None:
    from gradience.errors import InputError

    empty_history = write_state(tmp_path / "a" / "trainer_state.json", [])
    with pytest.raises(InputError, match="no train or eval entries"):
        monitor_run(empty_history)
    with pytest.raises(InputError, match="--run-id applies to telemetry"):
        monitor_run(write_state(tmp_path / "b" / "trainer_state.json", [{"loss": 1.0}]), run_id="x")
    binary = tmp_path / "c.json"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(InputError, match="not UTF-8"):
        monitor_run(binary)


@pytest.mark.slow
def test_real_trainer_run_with_checkpoints(tmp_path: Path, tiny_gpt2_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A real HF Trainer + PEFT run on a tiny GPT-2: train/test evals, checkpoints, then monitor it."""
    from transformers import Trainer, TrainingArguments

    from support.tiny_models import gpt2_lora_for_trainer

    model, data = gpt2_lora_for_trainer(tiny_gpt2_dir, seed=0)

    out_dir = tmp_path / "hf_run"
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-3, warmup_steps=3, lr_scheduler_type="linear", logging_steps=1,
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4, report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data(32),
                      eval_dataset={"train": data(8), "test": data(8)})
    trainer.train()
    capsys.readouterr()  # the Trainer prints its logs; keep them out of the CLI output checked below

    source = resolve_run_path(out_dir)
    assert source.kind == "trainer_state" and source.path.parent.name == "checkpoint-12"
    history = json.loads(source.path.read_text())["log_history"]
    train_entries = [e for e in history if "loss" in e]
    last_train_eval = [e for e in history if "eval_train_loss" in e][-1]
    last_test_eval = [e for e in history if "eval_test_loss" in e][-1]
    assert (source.path.parent / "adapter_config.json").is_file()

    report = monitor_run(out_dir)
    t, s = report.training, report.signals
    assert t["steps_logged"] == len(train_entries) == 12
    assert t["last_loss"] == train_entries[-1]["loss"]
    assert t["min_loss"] == min(e["loss"] for e in train_entries)
    assert t["grad_norm_max"] == pytest.approx(max(e["grad_norm"] for e in train_entries))
    peak = max(train_entries, key=lambda e: e["learning_rate"])  # first entry with the highest lr
    assert t["lr_schedule"]["shape"] == "warmup+decay" and t["lr_schedule"]["peak_step"] == peak["step"]
    assert t["lr_schedule"]["peak"] == peak["learning_rate"]
    assert s["train_ppl"] == pytest.approx(math.exp(last_train_eval["eval_train_loss"]))
    assert s["test_ppl"] == pytest.approx(math.exp(last_test_eval["eval_test_loss"]))
    assert s["gap"] == pytest.approx(math.exp(last_test_eval["eval_test_loss"] - last_train_eval["eval_train_loss"]))
    assert report.config is not None and report.config.lora.r == 4 and report.config.lora.alpha == 8
    assert report.config.training.max_steps == 12

    assert main(["monitor", str(out_dir), "--json"]) == 0
    data_out = json.loads(capsys.readouterr().out)
    assert data_out["file"] == str(source.path) and data_out["run_id"] == out_dir.resolve().name
    assert main(["monitor", str(source.path)]) == 0
    text = capsys.readouterr().out
    assert f"  Gap:       {s['gap']:.2f}x" in text and "Steps logged: 12 (steps 1-12)" in text
