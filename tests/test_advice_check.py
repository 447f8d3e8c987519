"""``gradience check`` advice (issue 9, item 5): extreme alpha/r at any lr, a high lr under the unknown
profile, misspelt keys, stable target order. Real CLI calls on real files; scales checked by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from gradience.config import snapshot_from_sources
from gradience.policy.check_rules import check_config


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["check", *args, "--json"])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


def actions(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["action"]: r for r in data["recommendations"]}


# -- alpha / r -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "alpha", "lr", "scale"), [
    (8, 512, "1e-5", 64.0),     # 512 / 8
    (32, 8, "1e-5", 0.25),      # PEFT's default alpha at r=32
    (32, 8, None, 0.25),        # any lr, even none
    (4, 64, "5e-5", 16.0),      # the high edge counts
])
def test_extreme_alpha_over_r_warns_at_any_lr(capsys: pytest.CaptureFixture[str], r: int, alpha: int,
                                              lr: str | None, scale: float) -> None:
    args = ["--task", "sst2", "--r", str(r), "--alpha", str(alpha), "--targets", "q_proj", "v_proj"]
    rc, data = check(capsys, *args, *(["--lr", lr] if lr else []))
    assert rc == 0
    rec = actions(data)["fix_alpha_scale"]
    assert rec["severity"] == "warning" and rec["evidence"]["scale"] == pytest.approx(scale)
    assert rec["evidence"]["suggested_alpha"] == 2 * r
    assert f"= {scale:g}" in rec["message"]  # the reason states the scale
    assert ("shrunk" in rec["message"]) == (scale < 1)


@pytest.mark.parametrize(("r", "alpha", "rslora"), [
    (8, 16, False), (16, 8, False), (4, 32, False),  # 2, 0.5, 8: ordinary choices
    (64, 8, True),                                    # rsLoRA: 8 / sqrt(64) = 1
])
def test_ordinary_alpha_scales_are_quiet(r: int, alpha: int, rslora: bool) -> None:
    snap = snapshot_from_sources(config={"task": "sst2", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
                                         "target_modules": ["q_proj"], "lr": 5e-5})
    assert "fix_alpha_scale" not in {r.action for r in check_config(snap).recommendations}


def test_rslora_scale_is_alpha_over_sqrt_r() -> None:
    snap = snapshot_from_sources(config={"r": 4, "lora_alpha": 64, "use_rslora": True, "lr": 5e-5})
    rec = next(r for r in check_config(snap).recommendations if r.action == "fix_alpha_scale")
    assert rec.evidence["scale"] == pytest.approx(64 / 2) and "alpha/sqrt(r)" in rec.message


# -- high lr under the unknown profile ---------------------------------------------------------------------
def test_high_lr_warns_under_the_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--r", "8", "--alpha", "16", "--targets", "q_proj"]
    _, high = check(capsys, *base, "--lr", "2e-3")
    assert high["task_profile"] == {"name": "unknown", "inferred": True}
    rec = actions(high)["lower_lr"]
    assert rec["severity"] == "warning" and rec["evidence"]["threshold"] == 1e-3
    assert "calibration_probe" in actions(high)
    _, ok = check(capsys, *base, "--lr", "1e-3")
    assert "lower_lr" not in actions(ok)
    rc = main(["check", *base, "--lr", "2e-3", "--fail-on", "warning"])
    capsys.readouterr()
    assert rc == 1


# -- misspelt keys -------------------------------------------------------------------------------------------
def test_misspelt_key_is_a_warning_naming_the_closest_known_key(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("learnin_rate: 1e-4\nr: 8\nlora_alpha: 16\ntarget_modules: [q_proj, v_proj]\n"
                   "per_device_eval_batch_size: 16\nwarmup_steps: 10\n")
    rc, data = check(capsys, str(cfg), "--task", "gsm8k")
    assert rc == 0
    typos = [r for r in data["recommendations"] if r["action"] == "fix_config_key"]
    assert len(typos) == 1  # legitimate HF keys are not flagged
    assert typos[0]["severity"] == "warning"
    assert typos[0]["evidence"] == {"task_profile": "hard_reasoning", "key": "learnin_rate",
                                    "closest": "learning_rate", "where": "extras"}
    assert "set_lr" in actions(data)  # the value really was not read
    rc = main(["check", str(cfg), "--fail-on", "fix_config_key"])
    out = capsys.readouterr().out
    assert rc == 1 and "did you mean 'learning_rate'?" in out


def test_misspelt_key_inside_a_canonical_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"optimizer": {"lr": 5e-5}, "lora": {"r": 8, "alpha": 16, "targt_modules": ["q"]}}))
    _, data = check(capsys, str(cfg))
    rec = actions(data)["fix_config_key"]
    assert (rec["evidence"]["key"], rec["evidence"]["closest"], rec["evidence"]["where"]) == \
        ("targt_modules", "target_modules", "lora.extras")


def test_a_real_training_args_dump_has_no_misspellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), learning_rate=5e-5, max_steps=10,
                                          report_to="none", use_cpu=True)
    path = tmp_path / "training_args.json"
    path.write_text(args.to_json_string())
    _, data = check(capsys, "--training", str(path), "--task", "sst2", "--r", "8", "--alpha", "16")
    assert "fix_config_key" not in actions(data)


# -- target order -------------------------------------------------------------------------------------------
def test_peft_target_order_is_stable_across_processes(tmp_path: Path, synthetic_adapter_dir: Path) -> None:
    cfg = json.loads((synthetic_adapter_dir / "adapter_config.json").read_text())
    cfg["target_modules"] = ["v_proj", "o_proj", "q_proj", "k_proj"]  # as PEFT may write a set
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-m", "gradience", "check", "--peft-dir", str(tmp_path), "--json"],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        seen.add(tuple(json.loads(done.stdout)["config"]["lora"]["target_modules"]))
    assert seen == {("k_proj", "o_proj", "q_proj", "v_proj")}


def test_user_given_target_order_is_kept_and_repeats_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    _, data = check(capsys, "--targets", "v_proj", "q_proj,v_proj", "--r", "8", "--alpha", "16")
    assert data["config"]["lora"]["target_modules"] == ["v_proj", "q_proj"]
