"""``gradience monitor`` advice that leads somewhere (issue 9, item 5): the flags it suggests exist, the audit
command it suggests runs as printed, its status reflects what the analysis found, and ``--json`` carries
the non-default TrainingArguments only. Real CLI calls on logs written by the real TelemetryWriter."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.config.hf_defaults import TRAINING_ARGS_DEFAULTS
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig, TrainingConfig

REPO = Path(__file__).resolve().parents[1]


def monitor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["monitor", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def monitor_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    rc, out, err = monitor(capsys, *args, "--json")
    assert rc == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a printed command verbatim through a shell, with this interpreter's `gradience` first on PATH."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write_log(path: Path, *, config: ConfigSnapshot | None = None, nan_steps: tuple[int, ...] = (),
              status: str | None = "ok", alert: tuple[str, str] | None = None) -> Path:
    tw = TelemetryWriter(path)  # no context manager: it would write a run_end that ``status=None`` leaves out
    if config is not None:
        tw.run_start(config)
    for s in range(1, 31):
        loss = float("nan") if s in nan_steps else 1.0 - 0.01 * s
        tw.train_step(s, loss=loss, lr=1e-4, grad_norm=1.0)
    tw.eval(30, "train", {"loss": math.log(1.5)})
    tw.eval(30, "test", {"loss": math.log(1.6)})
    if alert is not None:
        tw.alert(alert[0], alert[1], "logged by the training script")
    if status is not None:
        tw.run_end(status)
    tw.close()
    return path


def plain_config(**lora: Any) -> ConfigSnapshot:
    return ConfigSnapshot(optimizer=OptimizerConfig(lr=3e-4), lora=LoraConfig(r=8, alpha=16,
                          target_modules=["q_proj", "v_proj"], **lora))


# -- --task-profile / --dataset ------------------------------------------------------------------------------
def test_the_suggested_profile_flags_exist_and_drive_the_advice(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "run.jsonl", config=plain_config())
    base = monitor_json(capsys, str(log))
    assert base["task_profile"] == {"name": "unknown", "inferred": True}
    probe = next(r for r in base["recommendations"] if r["action"] == "calibration_probe")
    assert "--task-profile or --dataset" in probe["message"]  # the advice names these flags ...
    assert not any(r["action"] == "lower_lr" for r in base["recommendations"])  # 3e-4: in the LoRA band

    # ... and they work: the dataset names the data and the profile is inferred from it, as in check.
    reasoning = monitor_json(capsys, str(log), "--dataset", "gsm8k")
    assert reasoning["config"]["dataset_name"] == "gsm8k"
    assert reasoning["task_profile"] == {"name": "hard_reasoning", "inferred": True}
    assert not any(r["action"] == "calibration_probe" for r in reasoning["recommendations"])  # unknown-only

    explicit = monitor_json(capsys, str(log), "--task-profile", "generation", "--dataset", "gsm8k")
    assert explicit["task_profile"] == {"name": "generation", "inferred": False}
    probe = next(r for r in explicit["recommendations"] if r["action"] == "calibration_probe")
    assert probe["evidence"]["suggested_targets"] == "attention+mlp"  # the generation profile's probe

    rc, out, _ = monitor(capsys, str(log), "--dataset", "glue/sst2")
    assert rc == 0 and "Profile: easy_classification" in out and "Dataset: glue/sst2" in out
    # The file is unchanged: overrides apply to this report only.
    assert monitor_json(capsys, str(log))["config"]["dataset_name"] is None


def test_profile_flags_on_a_log_without_run_start_and_bad_values(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "run.jsonl", config=None)
    assert monitor_json(capsys, str(log))["task_profile"] is None  # no config: no config advice
    data = monitor_json(capsys, str(log), "--dataset", "gsm8k")
    assert data["task_profile"] == {"name": "hard_reasoning", "inferred": True}
    assert any(r["action"] == "set_lr" for r in data["recommendations"])  # the check rules ran on it
    with pytest.raises(SystemExit) as exc:
        main(["monitor", str(log), "--task-profile", "reasoning"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- the audit suggestion runs as printed ---------------------------------------------------------------------
def test_suggested_audit_command_runs_verbatim_and_monitor_then_shows_the_audit(
        tmp_path: Path, synthetic_adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "my run"  # a space: the printed command must quote paths
    run_dir.mkdir()
    log = write_log(run_dir / "run.jsonl", config=plain_config())
    _, text, _ = monitor(capsys, str(log))
    data = monitor_json(capsys, str(log))
    hint = data["audit_hint"]
    assert data["audit"] is None and hint["needs_adapter_dir"] is True
    assert hint["command"] in text and "ADAPTER_DIR" in text
    command = hint["command"].replace("ADAPTER_DIR", shlex.quote(str(synthetic_adapter_dir)))
    done = shell(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    after = monitor_json(capsys, str(log))
    assert after["audit"] is not None and after["audit_hint"] is None
    assert after["run_id"] == data["run_id"] and after["audit"]["n_layers"] == 4 * 7  # synthetic: 4 x q..down
    assert after["audit"]["r"] == 8


def test_adapter_next_to_the_log_gives_a_command_with_no_placeholder(
        tmp_path: Path, synthetic_adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(synthetic_adapter_dir, run_dir)
    log = write_log(run_dir / "run.jsonl", config=plain_config())
    hint = monitor_json(capsys, str(log))["audit_hint"]
    assert hint["needs_adapter_dir"] is False and "ADAPTER_DIR" not in hint["command"]
    assert shell(hint["command"], cwd=tmp_path).returncode == 0
    assert monitor_json(capsys, str(run_dir))["audit"] is not None


def test_trainer_state_never_gets_an_append_suggestion(tmp_path: Path, synthetic_adapter_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "out" / "checkpoint-30"
    shutil.copytree(synthetic_adapter_dir, ckpt)
    history = [{"step": s, "loss": 1.0 - 0.01 * s, "learning_rate": 1e-4, "epoch": s / 30} for s in range(1, 31)]
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history, "max_steps": 30,
                                                         "train_batch_size": 8, "num_train_epochs": 1}))
    hint = monitor_json(capsys, str(tmp_path / "out"))["audit_hint"]
    assert "--append" not in hint["command"] and hint["needs_adapter_dir"] is False
    assert hint["command"] == f"gradience audit --peft-dir {shlex.quote(str(ckpt))}"
    done = shell(hint["command"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "LoRA" in done.stdout or "GRADIENCE" in done.stdout
    # The old suggestion, for the record, is refused: a trainer_state.json is not a telemetry log.
    refused = shell(f"gradience audit --peft-dir {shlex.quote(str(ckpt))} --append "
                    f"{shlex.quote(str(ckpt / 'trainer_state.json'))}", cwd=tmp_path)
    assert refused.returncode == 2 and "trainer_state.json" in refused.stderr


# -- status reflects the analysis -----------------------------------------------------------------------------
def test_nan_losses_make_the_status_an_error_even_when_run_end_says_ok(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "run.jsonl", config=plain_config(), nan_steps=(12, 13, 20))
    data = monitor_json(capsys, str(log))
    assert data["training"]["status"] == "ok"  # what run_end said, unchanged
    assert data["status"]["overall"] == "error" and data["status"]["run_end"] == "ok"
    assert {"source": "analysis", "code": "nan_loss", "severity": "error"} in data["status"]["findings"]
    _, text, _ = monitor(capsys, str(log))
    lines = text.splitlines()
    status = next(x for x in lines if x.startswith("  Status:"))
    assert status.startswith("  Status: error; found: nan_loss (error)") and status.endswith("run_end: ok")
    assert "Alerts: none" not in lines
    alerts = next(x for x in lines if x.startswith("Alerts"))
    assert alerts == ("Alerts: none logged by the run; the analysis found 1 problem(s) (worst: error), listed "
                      "under Recommendations")


def test_clean_run_reads_ok_and_logged_alerts_or_a_failed_end_raise_the_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write_log(tmp_path / "clean.jsonl", config=plain_config())
    data = monitor_json(capsys, str(clean))
    assert data["status"] == {"overall": "ok", "run_end": "ok", "reason": None, "findings": []}
    _, text, _ = monitor(capsys, str(clean))
    assert "  Status: ok" in text.splitlines() and "Alerts: none" in text.splitlines()

    warned = write_log(tmp_path / "alert.jsonl", config=plain_config(), alert=("warning", "slow_dataloader"))
    status = monitor_json(capsys, str(warned))["status"]
    assert status["overall"] == "warning"
    assert status["findings"] == [{"source": "alert", "code": "slow_dataloader", "severity": "warning", "count": 1}]

    crashed = write_log(tmp_path / "crash.jsonl", config=plain_config(), status="error")
    assert monitor_json(capsys, str(crashed))["status"]["overall"] == "error"
    open_run = write_log(tmp_path / "open.jsonl", config=plain_config(), status=None)
    assert monitor_json(capsys, str(open_run))["status"]["overall"] == "ok"  # maybe still running
    _, text, _ = monitor(capsys, str(open_run))
    assert "  Status: - (no run_end)" in text.splitlines()


def test_fail_on_and_config_advice_do_not_count_as_run_findings(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # lr 2e-3 under the unknown profile: a config warning (lower_lr) is advice, not a finding about the run.
    cfg = ConfigSnapshot(optimizer=OptimizerConfig(lr=2e-3), lora=LoraConfig(r=8, alpha=16,
                         target_modules=["q_proj"]))
    data = monitor_json(capsys, str(write_log(tmp_path / "run.jsonl", config=cfg)))
    assert any(r["action"] == "lower_lr" and r["severity"] == "warning" for r in data["recommendations"])
    assert data["status"]["overall"] == "ok"


# -- config extras: non-default TrainingArguments only ---------------------------------------------------------
def test_json_hides_well_known_training_args_defaults_and_verbose_keeps_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extras = {"dataloader_num_workers": 0, "ddp_timeout": 1800, "warmup_steps": 0, "report_to": [],
              "logging_nan_inf_filter": True,                    # five defaults
              "lr_scheduler_type": "cosine", "logging_steps": 10,  # two changed values
              "my_custom_key": 1, "output_dir": "/x"}            # not TrainingArguments defaults
    cfg = plain_config()
    cfg.training = TrainingConfig(seed=1, extras=extras)
    log = write_log(tmp_path / "run.jsonl", config=cfg)
    short = monitor_json(capsys, str(log))["config"]["training"]
    assert short["extras"] == {"lr_scheduler_type": "cosine", "logging_steps": 10, "my_custom_key": 1,
                               "output_dir": "/x"}
    assert short["extras_defaults_hidden"] == 5 and short["seed"] == 1
    full = monitor_json(capsys, str(log), "--verbose")["config"]["training"]
    assert full["extras"] == extras and "extras_defaults_hidden" not in full


def test_defaults_table_matches_the_installed_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    actual = transformers.TrainingArguments(output_dir="unused").to_dict()
    differing = {k: (v, actual.get(k, "<absent>")) for k, v in TRAINING_ARGS_DEFAULTS.items()
                 if actual.get(k, "<absent>") != v}
    assert differing == {}
    missing = set(actual) - set(TRAINING_ARGS_DEFAULTS) - {"output_dir", "hub_token"}
    assert missing == set()


def test_monitor_with_the_new_flags_stays_torch_free(tmp_path: Path) -> None:
    log = write_log(tmp_path / "run.jsonl", config=plain_config(), nan_steps=(5,))
    code = ("import sys; from gradience.cli.main import main; rc = main(['monitor', sys.argv[1], '--json', "
            "'--dataset', 'gsm8k']); heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(heavy, file=sys.stderr); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip().splitlines()[-1] == "[]"
