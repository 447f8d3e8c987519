"""``gradience monitor`` CLI: the seed's text layout, JSON keys, exit codes, inputs and bad inputs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig

RULE = "=" * 72


def seed_log(path: Path, *, extra_bad_line: bool = False) -> Path:
    """The numbers of the seed's example output: train/test ppl 1.88/2.04, acc 68.8%/50.0%, sr 1.47, util 18.4%."""
    config = ConfigSnapshot(model_name="distilbert-base-uncased", dataset_name="glue/sst2",
                            task_profile="easy_classification", optimizer=OptimizerConfig(name="adamw_torch", lr=5e-5),
                            lora=LoraConfig(r=8, alpha=16, target_modules=["q_lin", "v_lin"], dropout=0.1))
    with TelemetryWriter(path) as tw:
        tw.run_start(config)
        for s in range(1, 31):
            tw.train_step(s, loss=0.7 - 0.005 * s, lr=5e-5 * (1 - s / 40), grad_norm=1.0, epoch=s / 30)
        tw.eval(30, "train", {"loss": math.log(1.88), "accuracy": 0.688, "n": 64})
        tw.eval(30, "test", {"loss": math.log(2.04), "accuracy": 0.5, "n": 64})
        tw.metrics("lora_audit", {"stable_rank_mean": 1.47, "utilization_mean": 0.184, "energy_rank_90_p50": 2.5,
                                  "energy_rank_90_p90": 6, "suggested_r_global_median": 4,
                                  "suggested_r_global_90": 8, "total_lora_params": 294912, "n_layers": 24,
                                  "adapter": {"r": 8}}, step=30)
    if extra_bad_line:
        with open(path, "a") as fh:
            fh.write("{broken\n")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["monitor", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_layout_of_the_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = seed_log(tmp_path / "run.jsonl")
    rc, out, err = run_cli(capsys, str(path), "--verbose")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[:7] == [RULE, "GRADIENCE MONITOR", RULE, f"File: {path}", "Model:   distilbert-base-uncased",
                         "Dataset: glue/sst2", "Profile: easy_classification"]
    i = lines.index("Latest eval signals:")
    assert lines[i - 1] == ""
    assert lines[i + 1:i + 6] == ["  Train PPL: 1.88", "  Test  PPL: 2.04", "  Gap:       1.09x",
                                  "  Train Acc: 68.8%", "  Test  Acc: 50.0%"]
    d = lines.index("Diagnostics:")
    assert lines[d + 1:d + 3] == ["  Stable rank (mean): 1.47", "  Utilization (mean): 18.4%"]
    assert "  Energy rank k@90% (p50/p90): 2.5/6" in lines
    assert "  Suggested rank (median): r=4 (saves 147.5K / 50.0% of LoRA params)" in lines
    assert "  Suggested rank (p90): r=8 (no saving)" in lines
    order = [lines.index(x) for x in ("Latest eval signals:", "Training:", "Diagnostics:", "Alerts: none")]
    assert order == sorted(order)
    rec_header = next(x for x in lines if x.startswith("Recommendations ("))
    assert lines.index(rec_header) > order[-1]
    assert lines[-1] == "Telemetry issues: 0"
    assert "-x" not in out and not re.search(r":\s+nan\b|nan%", out.lower())


def test_text_and_json_list_recommendations_in_the_same_order(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.run_start(ConfigSnapshot(optimizer=OptimizerConfig(lr=3e-4), lora=LoraConfig(r=32, alpha=64)))
        for s in range(1, 30):
            tw.train_step(s, loss=float("nan") if s == 12 else 1.0, grad_norm=1.0)
        tw.eval(30, "train", {"loss": 0.1})
        tw.eval(30, "test", {"loss": 1.0})
        tw.metrics("lora_audit", {"utilization_mean": 0.1, "stable_rank_mean": 3.2, "energy_rank_90_p90": 4,
                                  "suggested_r_global_90": 4, "adapter": {"r": 32}})
    _, text, _ = run_cli(capsys, str(path))
    _, js, _ = run_cli(capsys, str(path), "--json")
    json_actions = [r["action"] for r in json.loads(js)["recommendations"]]
    text_lines = [x for x in text.splitlines() if x.startswith("  - [")]
    text_actions = [x.split("] ", 1)[1].split(":", 1)[0] for x in text_lines]
    assert text_actions == json_actions and len(json_actions) >= 5
    assert f"Recommendations ({len(json_actions)}):" in text


def test_json_keys_and_strictness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = seed_log(tmp_path / "run.jsonl")
    with open(path, "a") as fh:  # a NaN loss in the log must not produce bare NaN in the output
        fh.write(json.dumps({"schema": "gradience.vnext.telemetry/v1", "ts": 1.0, "run_id": None,
                             "event": "train_step", "step": 31, "loss": "NaN"}) + "\n")
    rc, out, _ = run_cli(capsys, str(path), "--json", "--run-id", json.loads(path.read_text().splitlines()[0])["run_id"])

    def refuse(token: str) -> Any:
        raise AssertionError(token)

    data = json.loads(out, parse_constant=refuse)
    assert rc == 0
    assert {"schema", "file", "run_id", "runs", "config", "signals", "training", "audit", "alerts",
            "recommendations", "telemetry_issues"} <= set(data)
    assert data["schema"] == "gradience.monitor/v1" and data["file"] == str(path)
    assert len(data["runs"]) == 2 and data["run_id"] == data["runs"][0]
    assert data["config"]["model_name"] == "distilbert-base-uncased"
    assert data["signals"]["gap"] == pytest.approx(2.04 / 1.88)
    assert data["audit"]["suggested"]["median"] == {"r": 4, "params": 147456, "params_saved": 147456,
                                                   "reduction_ratio": 0.5}
    for rec in data["recommendations"]:
        assert {"severity", "action", "message", "rationale", "confidence", "scope", "evidence"} <= set(rec)
        assert set(rec) - {"severity", "action", "message", "rationale", "confidence", "scope", "evidence"} \
            <= {"source"}  # the evidence citation (issue 18), present on rules that have one
        assert 0.0 <= rec["confidence"] <= 1.0


def test_unknown_values_print_as_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.train_step(1, loss=float("nan"))
    rc, out, _ = run_cli(capsys, str(path))
    assert rc == 0
    for expected in ("Model:   -", "  Train PPL: -", "  Gap:       -", "  Test  Acc: -", "  Stable rank (mean): -",
                     "  Utilization (mean): -", "  Overfitting onset: -"):
        assert expected in out.splitlines()
    assert "-x" not in out and not re.search(r":\s+nan\b|nan%", out.lower())


def test_telemetry_issues_counted_and_listed_with_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = seed_log(tmp_path / "run.jsonl", extra_bad_line=True)
    n_lines = len(path.read_text().splitlines())
    _, out, _ = run_cli(capsys, str(path))
    assert "Telemetry issues: 1 (list with --verbose)" in out and "bad_json" not in out
    _, out, _ = run_cli(capsys, str(path), "--verbose")
    assert f"  line {n_lines}: [bad_json]" in out
    rc, _, err = run_cli(capsys, str(path), "--strict-schema")
    assert rc == 2 and f"line {n_lines}" in err and err.count("\n") == 1


@pytest.mark.parametrize("rules,rc", [
    (["gap>1.5"], 0), (["gap>1.05"], 1), (["gap>=1.08,test_acc<0.4"], 1), (["gap>=1.09,test_acc<0.4"], 0), (["warning"], 0),
    (["info"], 1),  # add_mlp_targets (info): the seed's config adapts attention only (issue 18)
    (["utilization<0.2"], 1), (["nan_loss"], 0), (["nan_losses>0"], 0), (["issues"], 0),
])
def test_fail_on_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: list[str], rc: int) -> None:
    path = seed_log(tmp_path / "run.jsonl")
    args = [a for rule in rules for a in ("--fail-on", rule)]
    got, _, err = run_cli(capsys, str(path), *args)
    assert got == rc
    assert ("fail-on rule met" in err) == (rc == 1)


def test_fail_on_flags_for_instability(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        for s in range(1, 10):
            tw.train_step(s, loss=float("inf") if s == 5 else 1.0)
    for rule in ("nan_loss", "error", "warning", "nan_losses>=1"):
        rc, _, err = run_cli(capsys, str(path), "--fail-on", rule)
        assert rc == 1 and f"fail-on rule met: {rule}" in err
    rc, out, _ = run_cli(capsys, str(path), "--json", "--fail-on", "nan_loss")
    assert rc == 1 and json.loads(out)["gates"]["rules"] == ["nan_loss"]


@pytest.mark.parametrize("args,needle", [
    (["--fail-on", "bogus_metric>1"], "unknown metric 'bogus_metric'"),
    (["--fail-on", "gap>>1"], "cannot parse rule"),
    (["--fail-on", "nan_los"], "unknown flag 'nan_los'"),  # a typo must not silently never fire
    (["--gap-threshold", "-1"], "--gap-threshold must be a positive number"),
    (["--run-id", "missing"], "no run with id 'missing'"),
])
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    path = seed_log(tmp_path / "run.jsonl")
    rc, out, err = run_cli(capsys, str(path), *args)
    assert rc == 2 and out == "" and needle in err and err.startswith("gradience monitor: error: ")


@pytest.mark.parametrize("kind,needle", [
    ("missing", "no such file or directory"),
    ("empty", "empty file"),
    ("garbage", "no telemetry records found"),
    ("empty_dir", "no run.jsonl, *.jsonl, trainer_state.json"),
    ("fifo", "not a regular file"),
    ("bad_state", "not a trainer_state.json: invalid JSON"),
    ("state_without_history", "no 'log_history' list"),
    ("two_jsonl", "several telemetry files"),
])
def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
                                        needle: str) -> None:
    target = tmp_path / "input"
    if kind == "empty":
        target = tmp_path / "run.jsonl"
        target.write_bytes(b"")
    elif kind == "garbage":
        target = tmp_path / "run.jsonl"
        target.write_bytes(os.urandom(4096).replace(b"{", b"("))
    elif kind == "empty_dir":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "bad_state":
        target = tmp_path / "trainer_state.json"
        target.write_text("{not json")
    elif kind == "state_without_history":
        target = tmp_path / "trainer_state.json"
        target.write_text('{"global_step": 3}')
    elif kind == "two_jsonl":
        target.mkdir()
        seed_log(target / "a.jsonl")
        seed_log(target / "b.jsonl")
    rc, out, err = run_cli(capsys, str(target))
    assert rc == 2 and out == ""
    assert err.startswith("gradience monitor: error: ") and needle in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_directory_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "toy"
    run_dir.mkdir()
    seed_log(run_dir / "run.jsonl")
    seed_log(run_dir / "other.jsonl")  # run.jsonl wins over other *.jsonl
    rc, out, _ = run_cli(capsys, str(run_dir))
    assert rc == 0 and f"File: {run_dir / 'run.jsonl'}" in out
    single = tmp_path / "single"
    single.mkdir()
    seed_log(single / "exp.jsonl")
    _, out, _ = run_cli(capsys, str(single))
    assert f"File: {single / 'exp.jsonl'}" in out


def test_monitor_does_not_import_torch(tmp_path: Path) -> None:
    path = seed_log(tmp_path / "run.jsonl")
    code = (f"import sys; from gradience.cli.main import main; rc = main(['monitor', {str(path)!r}, '--json']); "
            "heavy = [m for m in ('torch', 'transformers', 'scipy', 'numpy') if m in sys.modules]; "
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
    assert json.loads(proc.stdout)["schema"] == "gradience.monitor/v1"
