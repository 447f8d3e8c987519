"""The HF callback's advice-facing output on real Trainer runs (tiny model, CPU): the train-eval pass stays
off the eval progress bar, ``run_start`` carries only non-default TrainingArguments, and ``check`` on the
run's saved files agrees with ``monitor`` on the run's log (epochs, max_steps, dtype, target order)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
from test_integration_callback import build_parts, make_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return build_parts()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradience", *args], capture_output=True, text=True, timeout=120)


class BarSpy(TrainerCallback):
    """Placed after the Gradience callback and before the ProgressCallback (which closes the bar in its own
    on_evaluate): records the eval bar's position against its total at every evaluation."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.seen: list[tuple[int, int]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        progress = next(c for c in self.trainer.callback_handler.callbacks if isinstance(c, ProgressCallback))
        bar = progress.prediction_bar
        if bar is not None:
            self.seen.append((int(bar.n), int(bar.total)))


def test_train_eval_does_not_overrun_the_eval_progress_bar(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(train_eval_samples=40, audit_on_train_end=False))
    spy = BarSpy()
    # eval set of 48 rows at batch 8: a 6-step bar; the 40-row train-eval would push it to 11/6.
    trainer = make_trainer(parts, tmp_path, [cb, spy], max_steps=4, eval_steps=2, disable_tqdm=False,
                           per_device_eval_batch_size=8)
    spy.trainer = trainer
    trainer.train()
    assert spy.seen == [(6, 6), (6, 6)]
    records = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["event"] == "eval" and r["split"] == "train"]
    assert [r["metrics"]["n"] for r in trains] == [40, 40]  # the train-eval itself still ran
    # ... and the handler points at the Trainer's own eval loader again afterwards.
    assert trainer.callback_handler.eval_dataloader is not None
    assert len(trainer.callback_handler.eval_dataloader) == 6


def test_run_start_keeps_only_non_default_training_arguments(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))
    trainer = make_trainer(parts, tmp_path, [cb], max_steps=2, eval_strategy="no", warmup_steps=1,
                           lr_scheduler_type="cosine", logging_nan_inf_filter=False)
    trainer.train()
    config = json.loads((tmp_path / "run.jsonl").read_text().splitlines()[0])["config"]
    extras = config["training"]["extras"]
    full = trainer.args.to_dict()
    defaults = TrainingArguments(output_dir=str(tmp_path / "defaults")).to_dict()
    # Every kept key differs from the default TrainingArguments value, and every differing unknown key is kept.
    for key in ("lr_scheduler_type", "warmup_steps", "logging_nan_inf_filter", "output_dir", "save_strategy"):
        assert key in extras and full[key] != defaults[key]
    assert extras["lr_scheduler_type"] == "cosine" and extras["logging_nan_inf_filter"] is False
    for key in ("dataloader_num_workers", "hub_strategy", "ddp_timeout", "label_smoothing_factor", "tf32"):
        assert key not in extras and full[key] == defaults[key]
    assert len(extras) < 25 < len(full)
    # Fields gradience reads are always there, default or not (seed=7 here, adam_beta1 at its default 0.9).
    assert config["optimizer"]["betas"][0] == 0.9 and config["training"]["seed"] == 7
    # The Trainer's resolved plan and the weights dtype are kept beside the configured values.
    assert extras["planned_max_steps"] == trainer.state.max_steps == 2
    assert extras["planned_epochs"] == trainer.state.num_train_epochs
    assert extras["model_dtype"] == "float32"


def test_check_on_saved_files_agrees_with_monitor_on_the_log(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))
    trainer = make_trainer(parts, tmp_path / "out", [cb], max_steps=3, eval_strategy="no", num_train_epochs=5)
    trainer.train()
    peft_dir = tmp_path / "adapter"
    trainer.model.save_pretrained(str(peft_dir))
    training_dir = tmp_path / "training"
    training_dir.mkdir()
    (training_dir / "training_args.json").write_text(trainer.args.to_json_string())

    checked = cli("check", "--peft-dir", str(peft_dir), "--training-dir", str(training_dir), "--json")
    monitored = cli("monitor", str(tmp_path / "out" / "run.jsonl"), "--json")
    assert checked.returncode == 0, checked.stderr
    assert monitored.returncode == 0, monitored.stderr
    c, m = json.loads(checked.stdout)["config"], json.loads(monitored.stdout)["config"]
    for key in ("max_steps", "epochs", "dtype", "batch_size", "seed"):
        assert c["training"][key] == m["training"][key], key
    # The configured values, as HF reads them: max_steps=3 wins over num_train_epochs=5 (kept, not resolved).
    assert (m["training"]["max_steps"], m["training"]["epochs"], m["training"]["dtype"]) == (3, 5.0, None)
    assert c["lora"]["target_modules"] == m["lora"]["target_modules"] == ["q_lin", "v_lin"]
    text = cli("check", "--peft-dir", str(peft_dir), "--training-dir", str(training_dir)).stdout
    assert "epochs=5 (ignored: max_steps is set)" in text


def test_check_and_monitor_on_a_real_trainer_output_dir(parts: dict[str, Any], tmp_path: Path) -> None:
    """A run trained without the callback: the output dir holds training_args.bin (a pickle, never opened),
    trainer_state.json and the adapter."""
    out = tmp_path / "hf_out"
    trainer = make_trainer(parts, out, [], max_steps=4, eval_strategy="no", per_device_train_batch_size=4)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    assert (out / "training_args.bin").is_file() and not (out / "training_args.json").exists()

    done = cli("check", "--task", "sst2", "--peft-dir", str(out), "--training-dir", str(out), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"role": "training", "path": str(out / "trainer_state.json"), "form": "trainer_state"} in data["sources"]
    t = data["config"]["training"]
    assert (t["batch_size"], t["max_steps"]) == (4, trainer.state.max_steps) == (4, 4)
    assert t["epochs"] == trainer.state.num_train_epochs
    info = t["extras"]["trainer_state"]
    assert info["global_step"] == 4 and info["logging_steps"] == 2
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert info["logged_lr_peak"] == pytest.approx(max(logged))
    note = next(r for r in data["recommendations"] if r["action"] == "export_training_args")
    assert note["severity"] == "info" and "to_json_string()" in note["message"]
    assert data["config"]["optimizer"]["lr"] is None  # the state does not record it: not guessed

    # The export the note describes gives check the full arguments.
    (out / "training_args.json").write_text(trainer.args.to_json_string())
    again = json.loads(cli("check", "--peft-dir", str(out), "--training-dir", str(out), "--json").stdout)
    assert again["config"]["optimizer"]["lr"] == pytest.approx(3e-3)
    assert not any(r["action"] in ("export_training_args", "fix_config_key") for r in again["recommendations"])
    (out / "training_args.json").unlink()

    # monitor on the same dir reads trainer_state.json and suggests an audit command that runs as printed.
    mon = json.loads(cli("monitor", str(out), "--json").stdout)
    assert mon["source"] == "trainer_state" and mon["audit"] is None
    assert mon["audit_hint"]["command"] == f"gradience audit --peft-dir {out}"
    ran = subprocess.run([sys.executable, "-m", "gradience", *mon["audit_hint"]["command"].split()[1:]],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr

    # Without trainer_state.json either, the error still names the pickle and the way out.
    (out / "trainer_state.json").unlink()
    failed = cli("check", "--training-dir", str(out))
    assert failed.returncode == 2 and "to_json_string" in failed.stderr and len(failed.stderr.splitlines()) == 1
