"""``gradience check`` through the real CLI: the seed command on a real PEFT + TrainingArguments pair, text and
JSON output, flag precedence, --fail-on, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradience.cli.main import main

SEED_COMMAND = ["check", "--task", "sst2", "--peft-dir", "runs/toy/peft", "--training-dir", "runs/toy/training"]


@pytest.fixture
def toy_runs(tmp_path: Path, distilbert_seqcls_adapter_dir: Path) -> Path:
    """``runs/toy/peft`` (a real PEFT save_pretrained output) + ``runs/toy/training/training_args.json``
    (a real TrainingArguments dump), laid out as the golden path's toy run leaves them."""
    from transformers import TrainingArguments

    shutil.copytree(distilbert_seqcls_adapter_dir, tmp_path / "runs" / "toy" / "peft")
    training = tmp_path / "runs" / "toy" / "training"
    training.mkdir(parents=True)
    args = TrainingArguments(output_dir=str(training), learning_rate=2e-4, per_device_train_batch_size=16,
                             max_steps=60, seed=0, report_to=[])
    (training / "training_args.json").write_text(args.to_json_string())
    return tmp_path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_seed_command_subprocess(toy_runs: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradience", *SEED_COMMAND], cwd=toy_runs, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[:3] == ["=" * 72, "GRADIENCE CHECK", "=" * 72]
    assert "Dataset:   sst2" in out
    assert "Profile:   easy_classification (inferred)" in out
    assert "runs/toy/peft/adapter_config.json (peft)" in out
    assert "runs/toy/training/training_args.json (training_args)" in out
    assert "flags:    --task sst2" in out
    assert "r=8  alpha=16  alpha/r=2" in out
    assert "q_lin (attn)" in out and "lin1 (mlp)" in out
    assert "lr=0.0002" in out and "max_steps=60" in out
    # The distilbert fixture targets attention and MLP modules at lr 2e-4: inside the evidence-based bands.
    assert "prefer_attention_only" not in out and "config_ok" in out
    assert proc.stderr == ""


def test_seed_command_json_matches_the_input_files(toy_runs: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(toy_runs)
    code, out, _ = run_cli([*SEED_COMMAND, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    adapter = json.loads((toy_runs / "runs/toy/peft/adapter_config.json").read_text())
    training = json.loads((toy_runs / "runs/toy/training/training_args.json").read_text())
    assert data["schema"] == "gradience.check/v1"
    assert data["task_profile"] == {"name": "easy_classification", "inferred": True}
    cfg = data["config"]
    assert cfg["dataset_name"] == "sst2"
    assert cfg["lora"]["r"] == adapter["r"] and cfg["lora"]["alpha"] == adapter["lora_alpha"]
    assert sorted(cfg["lora"]["target_modules"]) == sorted(adapter["target_modules"])
    assert cfg["optimizer"]["lr"] == training["learning_rate"]
    assert cfg["optimizer"]["name"] == training["optim"]
    assert cfg["training"]["batch_size"] == training["per_device_train_batch_size"]
    assert cfg["model_name"] == adapter["base_model_name_or_path"]
    assert [s["form"] for s in data["sources"]] == ["peft", "training_args", "flags"]
    assert data["sources"][0]["path"] == "runs/toy/peft/adapter_config.json"
    assert data["sources"][2]["text"] == "--task sst2"
    for rec in data["recommendations"]:
        assert set(rec) == {"severity", "action", "message", "rationale", "confidence", "scope", "evidence",
                            "source"}


def test_check_does_not_import_torch(toy_runs: Path) -> None:
    code = ("import sys; from gradience.cli.main import main; "
            f"rc = main({SEED_COMMAND!r} + ['--json']); "
            "heavy = [m for m in ('torch', 'transformers', 'scipy', 'peft') if m in sys.modules]; "
            "sys.stderr.write(repr(heavy)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=toy_runs, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr == "[]"


def test_text_and_json_list_recommendations_in_the_same_order(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--dataset", "gsm8k", "--lr", "3e-3", "--r", "64", "--weight-decay", "-0.1",
            "--targets", "q_proj,up_proj", "frob"]
    _, text, _ = run_cli(argv, capsys)
    _, js, _ = run_cli([*argv, "--json"], capsys)
    json_actions = [r["action"] for r in json.loads(js)["recommendations"]]
    text_actions = re.findall(r"^  \[[A-Z]+\] (\w+):", text, flags=re.MULTILINE)
    assert text_actions == json_actions
    assert json_actions[0] == "fix_weight_decay" and "lower_lr" in json_actions
    assert f"Recommendations ({len(json_actions)}):" in text


def test_verbose_shows_rationale_and_evidence(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["check", "--dataset", "sst2", "--lr", "1e-4", "--r", "8", "--alpha", "16",
                            "--targets", "q_lin", "v_lin", "lin1", "lin2", "--verbose"], capsys)
    assert code == 0
    assert "[INFO] config_ok:" in out and "why:" in out and "evidence:" in out and "confidence: 0.50" in out
    _, out, _ = run_cli(["check", "--dataset", "sst2", "--lr", "2e-3", "--model-size", "7B", "--verbose"], capsys)
    assert "[WARNING] lower_lr:" in out
    assert 'source: Schulman et al., "LoRA Without Regret", Thinking Machines Lab, 2025' in out
    assert "Model:     - (7B parameters from --model-size)" in out


def test_flags_win_over_files_and_yaml_lr_is_coerced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("lr: 5e-5\nr: 8\nlora_alpha: 16\ntargets: q_proj, v_proj\ndataset: gsm8k\n")
    code, out, _ = run_cli(["check", str(config), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["config"]["optimizer"]["lr"] == 5e-5
    assert data["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    code, out, _ = run_cli(["check", str(config), "--lr", "3e-4", "--r", "16", "--task-profile", "generation",
                            "--json"], capsys)
    data = json.loads(out)
    assert data["config"]["optimizer"]["lr"] == 3e-4 and data["config"]["lora"]["r"] == 16
    assert data["task_profile"] == {"name": "generation", "inferred": False}


def test_fail_on(capsys: pytest.CaptureFixture[str]) -> None:
    bad = ["check", "--dataset", "sst2", "--lr", "5", "--r", "8", "--alpha", "16", "--targets", "q_lin"]
    code, out, _ = run_cli([*bad, "--fail-on", "error"], capsys)
    assert code == 1 and "--fail-on 'error' met by: fix_lr_units (error)" in out
    code, _, err = run_cli([*bad, "--fail-on", "error", "--json"], capsys)
    assert code == 1 and "fix_lr_units" in err  # JSON stdout stays parseable
    good = ["check", "--dataset", "sst2", "--lr", "1e-4", "--r", "8", "--alpha", "16", "--targets", "q_lin"]
    assert run_cli([*good, "--fail-on", "warning"], capsys)[0] == 0
    assert run_cli([*good, "--fail-on", "info"], capsys)[0] == 1  # config_ok is an info
    assert run_cli([*bad, "--fail-on", "fix_lr_units"], capsys)[0] == 1
    assert run_cli([*good, "--fail-on", "fix_lr_units,lower_lr"], capsys)[0] == 0
    code, _, err = run_cli([*good, "--fail-on", "bogus"], capsys)
    assert code == 2 and "unknown rule 'bogus'" in err
    code, _, err = run_cli([*good, "--fail-on", "lr>1"], capsys)
    assert code == 2 and "not comparisons" in err


def test_uncoercible_value_is_one_line_naming_file_and_key(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("lr: 5e-5\nlora:\n  r: eight\n")
    code, out, err = run_cli(["check", str(config)], capsys)
    assert code == 2 and out == ""
    assert err == f"gradience check: error: {config}: key 'lora.r': cannot read 'eight' as a number\n"


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("bad.json", "{\"lr\": ", "invalid JSON"),
    ("bad.yaml", "lr: [1e-4\n", "invalid YAML"),
])
def test_unreadable_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str,
                                  problem: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2 and err.startswith(f"gradience check: error: {path}: {problem}") and err.count("\n") == 1


def test_directory_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["check", "--peft-dir", str(tmp_path)], capsys)
    assert code == 2 and "no adapter_config.json found" in err
    code, _, err = run_cli(["check", "--training-dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such directory" in err
    code, _, err = run_cli(["check", "--peft", "a.json", "--peft-dir", str(tmp_path)], capsys)
    assert code == 2 and "not both" in err


def test_nothing_to_check_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["check"], capsys)
    assert code == 2 and "nothing to check" in err
