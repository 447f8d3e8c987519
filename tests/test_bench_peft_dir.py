"""`gradience bench --peft-dir ADAPTER [--against ADAPTER2]` (issue 18 item 3): the user's own adapter on the
config's task, paired, with interval verdicts; the audit's and monitor's advice name this command; bench --help."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gradience.bench.config import load_bench_config
from gradience.bench.evaluate import MODE, assemble_eval, prepare_eval_dir
from gradience.bench.render import render_markdown, render_text
from gradience.cli.main import build_parser, main
from gradience.errors import InputError
from gradience.monitor import monitor_run
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "bench" / "toy.yaml"


def test_bench_help_ends_with_examples_naming_peft_dir() -> None:
    parser = build_parser("bench")
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    text = sub.choices["bench"].format_help().rstrip()
    last = text.split("\n\n")[-1]
    assert last.startswith("examples:") and "gradience bench" in last and "--peft-dir" in last
    assert "INCONCLUSIVE" in text


def _task() -> SimpleNamespace:
    return SimpleNamespace(kind="classification", model_name="gradience/tiny-distilbert",
                           dataset_name="gradience/tiny-sentiment")


def test_assemble_eval_by_hand() -> None:
    cfg = load_bench_config(str(TOY))  # acc_tolerance 0.02
    ref = np.array([1.0] * 80 + [0.0] * 20)
    same = assemble_eval(cfg, _task(), ("a_r4", 4096, 4, 8.0), ("a", 8192, 8, 16.0), None, ref, ref.copy(), 0.1)
    assert same["schema"] == "gradience.bench/v1" and same["mode"] == MODE
    (arm,) = same["arms"]
    assert arm["per_seed"][0]["ci95"] == [0.0, 0.0] and same["verdict"] == "PASS"
    assert arm["params_ratio"] == 0.5 and same["evaluation"]["against"] == "a"
    # Five items lost and five gained: Δ = 0, the paired differences are ±1 on 10% of the items, so the 95%
    # interval is ≈ ±1.96·√(0.1/100) ≈ ±0.062, wider than the tolerance: INCONCLUSIVE, not the point rule's PASS.
    adapter = ref.copy()
    adapter[:5] = 0.0
    adapter[80:85] = 1.0
    doc = assemble_eval(cfg, _task(), ("a_r4", 4096, 4, 8.0), None, None, ref, adapter, 0.1)
    s = doc["arms"][0]["per_seed"][0]
    lo, hi = s["ci95"]
    assert s["delta"] == pytest.approx(0.0) and 0.04 <= -lo <= 0.08 and 0.04 <= hi <= 0.08
    assert doc["verdict"] == s["verdict"] == "INCONCLUSIVE" and doc["policy"]["point_estimate_verdict"] == "PASS"
    assert s["n_eval_items_needed"] == int(np.ceil(100 * (-lo / 0.02) ** 2 * (1 - 1e-12)))
    assert doc["evaluation"]["reference"] == "base" and doc["arms"][0]["params_ratio"] is None
    text = render_text(doc)
    assert "Verdict: INCONCLUSIVE" in text and f"~{s['n_eval_items_needed']} eval items" in text
    assert "point-estimate rule says PASS" in text and "against the base model" in text
    assert "INCONCLUSIVE" in render_markdown(doc)
    # A clear loss: 30 items lost → Δ = −0.30, the whole interval below −0.02.
    worse = ref.copy()
    worse[:30] = 0.0
    assert assemble_eval(cfg, _task(), ("x", 1, 1, 1.0), None, None, ref, worse, 0.1)["verdict"] == "FAIL"


def test_eval_output_dir_never_takes_over_another_directory(tmp_path: Path) -> None:
    training = tmp_path / "bench"
    training.mkdir()
    (training / "bench_config.json").write_text("{}")
    with pytest.raises(InputError, match="holds other files"):
        prepare_eval_dir(training)
    earlier = tmp_path / "eval"
    earlier.mkdir()
    (earlier / "bench.json").write_text(json.dumps({"schema": "gradience.bench/v1", "mode": "peft_dir"}))
    prepare_eval_dir(earlier)  # an earlier --peft-dir evaluation is overwritten
    (earlier / "bench.json").write_text(json.dumps({"schema": "gradience.bench/v1"}))
    with pytest.raises(InputError, match="not an earlier --peft-dir"):
        prepare_eval_dir(earlier)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        prepare_eval_dir(tmp_path / "file")


@pytest.mark.parametrize("extra,flag", [(["--seeds", "1,2"], "--seeds"), (["--resume"], "--resume"),
                                        (["--arms", "uniform:4"], "--arms")])
def test_training_flags_are_refused_with_peft_dir(tmp_path: Path, extra: list[str], flag: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--config", str(TOY), "--peft-dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"gradience bench: error: {flag}: not used with")


def test_against_needs_peft_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--config", str(TOY), "--against", "x"]) == 2
    assert "needs --peft-dir" in capsys.readouterr().err


def test_monitor_names_the_bench_command_with_the_runs_adapter(tmp_path: Path) -> None:
    """compress_rank on a run whose adapter sits at <run>/peft: the commands carry that path."""
    run = tmp_path / "my run"
    (run / "peft").mkdir(parents=True)
    (run / "peft" / "adapter_config.json").write_text("{}")
    config = ConfigSnapshot(model_name="m", dataset_name="d", task_profile="generation",
                            optimizer=OptimizerConfig(name="adamw", lr=2e-4),
                            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    audit = {"stable_rank_mean": 1.6, "utilization_mean": 0.1, "energy_rank_90_p50": 2, "energy_rank_90_p90": 4,
             "suggested_r_global_median": 2, "suggested_r_global_90": 4, "total_lora_params": 1_000_000,
             "n_layers": 10, "adapter": {"r": 16}, "by_type": {}}
    with TelemetryWriter(run / "run.jsonl") as tw:
        tw.run_start(config)
        tw.metrics("lora_audit", audit, step=100)
    recs = {r.action: r for r in monitor_run(run / "run.jsonl").recommendations}
    peft = str(run / "peft")
    assert f"--peft-dir '{peft}_r4' --against '{peft}'" in recs["compress_rank"].message
    assert "gradience bench --config BENCH.yaml" in recs["compress_rank"].message
    # Without an adapter beside the log the commands keep the ADAPTER placeholder.
    shutil.rmtree(run / "peft")
    recs = {r.action: r for r in monitor_run(run / "run.jsonl").recommendations}
    assert "--peft-dir ADAPTER_r4 --against ADAPTER`" in recs["compress_rank"].message


@pytest.mark.slow
def test_compress_then_the_printed_bench_command_runs_as_printed(tmp_path: Path) -> None:
    """Toy run → audit prints compress + verify commands → both run exactly as printed (shell, cwd = tmp)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    gradience = shutil.which("gradience")
    if gradience is None:
        pytest.skip("the gradience console script is not on PATH")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))

    def sh(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)

    toy = sh(f"python {REPO / 'examples' / 'vnext' / 'toy_lora_run.py'} --out run --device cpu --max-steps 60")
    assert toy.returncode == 0, toy.stderr[-2000:]
    audit = sh("gradience audit --peft-dir run/peft")
    assert audit.returncode == 0, audit.stderr[-2000:]
    compress = re.search(r"Apply without retraining: (gradience compress .*)$", audit.stdout, re.M)
    verify = re.search(r"Then verify it on your task \(BENCH\.yaml: .*?\): (gradience bench .*)$", audit.stdout, re.M)
    assert compress and verify, audit.stdout
    assert verify.group(1).startswith("gradience bench --config BENCH.yaml --peft-dir run/peft_r")
    assert verify.group(1).endswith(" --against run/peft")
    # A small bench config: the toy task with 120 eval items.
    small = TOY.read_text(encoding="utf-8").replace("task:\n", "task:\n  max_eval_samples: 120\n", 1)
    assert "max_eval_samples: 120" in small
    (tmp_path / "BENCH.yaml").write_text(small, encoding="utf-8")
    done = sh(compress.group(1))
    assert done.returncode == 0, done.stderr[-2000:]
    bench = sh(verify.group(1))
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "Gradience Bench (--peft-dir)" in bench.stdout and "Verdict: " in bench.stdout
    doc = json.loads((tmp_path / "runs" / "bench_eval" / "bench.json").read_text())
    items = json.loads((tmp_path / "runs" / "bench_eval" / "eval_items.json").read_text())
    assert doc["mode"] == "peft_dir" and doc["task"]["n_eval_items"] == 120 == len(items["adapter"])
    (arm,) = doc["arms"]
    s = arm["per_seed"][0]
    assert s["delta"] == pytest.approx(np.mean(items["adapter"]) - np.mean(items["reference"]))
    lo, hi = s["ci95"]
    assert doc["verdict"] == ("PASS" if lo >= -0.02 - 1e-9 else "FAIL" if hi < -0.02 - 1e-9 else "INCONCLUSIVE")
    assert arm["params_ratio"] == pytest.approx(int(verify.group(1).split("_r")[1].split()[0]) / 8)
    assert doc["evaluation"]["base"].endswith("run/base")
    # The reference is the toy run's own adapter on its own base: its accuracy on the first 120 test items
    # is the Trainer's per-item agreement; all 200 (no limit) equal the run's last test accuracy in run.jsonl.
    full = sh(f"gradience bench --config {TOY} --peft-dir run/peft --output-dir full --json")
    assert full.returncode == 0, full.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "run.jsonl").read_text().splitlines()]
    last_test = [e for e in events if e.get("event") == "eval" and e.get("split") == "test"][-1]
    assert json.loads(full.stdout)["arms"][0]["per_seed"][0]["metric"] == \
        pytest.approx(last_test["metrics"]["accuracy"], abs=1e-9)
