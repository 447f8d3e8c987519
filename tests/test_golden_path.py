"""The seed's golden path, verbatim, in a fresh directory (subprocesses, exactly as a user types it),
and `gradience demo` which runs the same path in one command."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TOY_SCRIPT = REPO / "examples" / "vnext" / "toy_lora_run.py"
SEED_COMMANDS = [
    "gradience check --task sst2 --peft-dir runs/toy/peft --training-dir runs/toy/training",
    "gradience monitor runs/toy/run.jsonl --verbose",
    "gradience audit --peft-dir runs/toy/peft --top-wasteful 10",
]
NUMBER = r"-?\d+(?:\.\d+)?"


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _gradience(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gradience", *shlex.split(cmd)[1:]]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=120)


@pytest.mark.slow
def test_seed_golden_path_verbatim(tmp_path: Path) -> None:
    # The seed runs the script from the repository root; a copy of examples/ keeps the relative path verbatim.
    (tmp_path / "examples" / "vnext").mkdir(parents=True)
    (tmp_path / "examples" / "vnext" / "toy_lora_run.py").write_text(TOY_SCRIPT.read_text())
    toy = subprocess.run([sys.executable, "examples/vnext/toy_lora_run.py", "--out", "runs/toy", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert toy.returncode == 0, toy.stderr[-3000:]
    assert toy.stdout.rstrip().splitlines()[-3:] == [f"  {c}" for c in SEED_COMMANDS]
    # progress while it trains: a start line, then step lines up to the last step (stderr, stdout stays clean)
    progress = [line for line in toy.stderr.splitlines() if line.startswith("toy run: ")]
    assert progress[0].startswith("toy run: training 100 steps on cpu"), toy.stderr[-2000:]
    assert any(line.startswith("toy run: step 100/100") for line in progress), toy.stderr[-2000:]
    assert "Writing model shards" not in toy.stderr
    assert (tmp_path / "runs/toy/run.jsonl").is_file()
    assert (tmp_path / "runs/toy/peft/adapter_config.json").is_file()
    assert (tmp_path / "runs/toy/peft/adapter_model.safetensors").is_file()
    assert (tmp_path / "runs/toy/training/training_args.json").is_file()

    check = _gradience(SEED_COMMANDS[0], tmp_path)
    assert check.returncode == 0, check.stderr
    assert "easy_classification" in check.stdout

    monitor = _gradience(SEED_COMMANDS[1], tmp_path)
    assert monitor.returncode == 0, monitor.stderr
    text = monitor.stdout
    for label in ("Train PPL:", "Test  PPL:", "Train Acc:", "Test  Acc:", "Stable rank (mean):",
                  "Utilization (mean):"):
        assert re.search(rf"{re.escape(label)}\s+{NUMBER}", text), f"{label} has no number:\n{text}"
    assert re.search(rf"Gap:\s+{NUMBER}x", text), text
    assert re.search(r"Recommendations \(\d+\):", text), text
    assert "Model:   gradience/tiny-distilbert" in text
    assert "Dataset: gradience/tiny-sentiment" in text

    as_json = _gradience("gradience monitor runs/toy/run.jsonl --json", tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    blob = json.loads(as_json.stdout)
    assert blob["schema"] == "gradience.monitor/v1"
    records = [json.loads(line) for line in (tmp_path / "runs/toy/run.jsonl").read_text().splitlines()]
    assert blob["run_id"] == records[0]["run_id"]
    last_test = [r for r in records if r["event"] == "eval" and r["split"] == "test"][-1]["metrics"]
    assert last_test["accuracy"] >= 0.7
    assert json.dumps(last_test["accuracy"]) in as_json.stdout  # the JSON blob carries the run's numbers

    audit = _gradience(SEED_COMMANDS[2], tmp_path)
    assert audit.returncode == 0, audit.stderr
    assert "Most wasteful layers" in audit.stdout
    assert "PEFT dir: runs/toy/peft" in audit.stdout
    # the "Next:" audit line shows UDR: the toy run saved its base beside the adapter (runs/toy/base)
    assert "UDR (update vs base spectral norm, base: runs/toy/base)" in audit.stdout
    assert re.search(rf"Median: {NUMBER}", audit.stdout), audit.stdout


@pytest.mark.slow
def test_demo_runs_the_whole_golden_path(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gradience", "demo", "--out", "demo_out", "--max-steps", "30"],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    banners = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    assert banners == [
        "python examples/vnext/toy_lora_run.py --out demo_out --device cpu",
        "gradience check --task sst2 --peft-dir demo_out/peft --training-dir demo_out/training",
        "gradience monitor demo_out/run.jsonl --verbose",
        "gradience audit --peft-dir demo_out/peft --top-wasteful 10",
    ]
    # Each command's output follows its banner.
    positions = [out.index(f"$ {b}") for b in banners]
    assert out.index("GRADIENCE CHECK") > positions[1]
    assert positions[2] < out.index("GRADIENCE MONITOR") < positions[3] < out.index("GRADIENCE LoRA AUDIT")
    assert (tmp_path / "demo_out" / "run.jsonl").is_file()
    assert "UDR (update vs base spectral norm, base: demo_out/base)" in out  # the demo's audit shows UDR


def test_demo_without_torch_is_one_clear_error(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from gradience.cli.main import main\n"
            "sys.exit(main(['demo', '--out', 'x']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gradience demo: error:")
    assert "torch" in lines[0] and "gradience[hf]" in lines[0]
    assert not (tmp_path / "x").exists()


def test_toy_script_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TOY_SCRIPT), "--out", "o", "--dataset", "./missing.csv"],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["toy_lora_run.py: error: ./missing.csv: dataset path does not exist"]
