"""A ``--fail-on`` gate never passes by default (SPEC §3.4): rules on metrics that could not be computed are
exit 2 naming the rule and why, for audit and monitor alike; computable rules still give 0 / 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.errors import InputError
from gradience.gates import Gate, missing_metric_error, parse_gates, require_available
from gradience.telemetry import TelemetryWriter
from support import synthetic

TARGETS = {"q_proj": (32, 32), "v_proj": (32, 32)}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return synthetic.write_synthetic_adapter(tmp_path / "a", layers=2, targets=TARGETS, r=4, alpha=8)


def test_shared_helper_names_rule_and_reason() -> None:
    gate = parse_gates("udr>1.0")[0]
    err = missing_metric_error(gate, "no base model")
    assert "'udr>1.0'" in str(err) and "no base model" in str(err) and "udr" in str(err)
    require_available([gate], lambda g: None)  # available: no error
    with pytest.raises(InputError, match=r"rule 'udr>1\.0' cannot be evaluated: udr was not computed \(why\)"):
        require_available([Gate("x>1", "x", ">", 1.0), gate], lambda g: "why" if g.metric == "udr" else None)


@pytest.mark.parametrize("rule", ["udr>1.0", "udr_median>1.0", "sdi>-1", "fraction_udr_gt_0_3>0", "udr_f<2"])
def test_udr_rule_with_no_udr_is_exit_2(adapter: Path, capsys: pytest.CaptureFixture[str], rule: str) -> None:
    rc, out, err = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--fail-on", rule)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and f"'{rule}'" in err and "--no-udr" in err and "never passes" in err


def test_udr_rule_without_resolvable_base_is_exit_2(adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the adapter names no base model and none is given: UDR is skipped with an info issue; the gate must not pass
    rc, out, err = cli(capsys, "audit", "--peft-dir", str(adapter), "--json", "--fail-on", "udr_median>1.0")
    assert rc == 2 and out == "" and "'udr_median>1.0'" in err and "base_model_unresolved" in err
    named = synthetic.write_synthetic_adapter(adapter.parent / "named", layers=1, targets=TARGETS, r=4, alpha=8,
                                              base_model_name_or_path="org/not-in-any-cache")
    rc, _, err = cli(capsys, "audit", "--peft-dir", str(named), "--fail-on", "udr>1.0")
    assert rc == 2 and "org/not-in-any-cache" in err and "--base-model" in err


def test_metric_null_for_every_layer_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = synthetic.write_synthetic_adapter(tmp_path / "nan", layers=1, targets=TARGETS, r=4, alpha=8)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {}
    for leaf in TARGETS:
        tensors[f"{prefix}.{leaf}.lora_A.weight"] = np.full((4, 32), np.nan, dtype=np.float32)
        tensors[f"{prefix}.{leaf}.lora_B.weight"] = np.ones((32, 4), dtype=np.float32)
    synthetic.write_safetensors(d / "adapter_model.safetensors", tensors)
    rc, out, err = cli(capsys, "audit", "--peft-dir", str(d), "--no-udr", "--fail-on", "utilization<0.25")
    assert rc == 2 and out == "" and "'utilization<0.25'" in err and "NaN/Inf" in err
    rc, _, err = cli(capsys, "audit", "--peft-dir", str(d), "--no-udr", "--fail-on", "stable_rank_mean<1")
    assert rc == 2 and "'stable_rank_mean<1'" in err
    # the flags stay decidable: this adapter does have non-finite layers
    rc, _, err = cli(capsys, "audit", "--peft-dir", str(d), "--no-udr", "--fail-on", "non_finite")
    assert rc == 1 and "2 layers have NaN/Inf weights" in err


def test_computable_rules_still_decide(adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--json")
    data = json.loads(out)
    worst = min(row["utilization"] for row in data["layers"])
    assert cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--fail-on", f"utilization<{worst - 1e-9}")[0] == 0
    rc, _, err = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--fail-on", f"utilization<{worst + 1e-9}")
    assert rc == 1 and "met by 1 of 4 layers" in err


def test_udr_rule_with_a_real_base_is_evaluated(tiny_llama_dir: Path, llama_adapter_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    common = ["audit", "--peft-dir", str(llama_adapter_dir), "--base-model", str(tiny_llama_dir),
              "--base-norms-cache", str(tmp_path / "norms.json")]
    rc, out, _ = cli(capsys, *common, "--json")
    median = json.loads(out)["udr_median"]
    assert rc == 0 and median is not None and median > 0
    assert cli(capsys, *common, "--fail-on", f"udr_median>{median * 1.01}")[0] == 0
    rc, _, err = cli(capsys, *common, "--fail-on", f"udr_median>{median * 0.99}")
    assert rc == 1 and "udr_median" in err


# ---- monitor ---------------------------------------------------------------------------------------------------
def _log(path: Path, *, test_eval: bool = True, audit: bool = True, steps: bool = True) -> Path:
    with TelemetryWriter(path) as tw:
        tw.run_start({"model_name": "m", "lr": 5e-5})
        if steps:
            for s in range(1, 11):
                tw.train_step(s, loss=1.0 - 0.01 * s, grad_norm=1.0)
        tw.eval(10, "train", {"loss": math.log(1.5), "accuracy": 0.7})
        if test_eval:
            tw.eval(10, "test", {"loss": math.log(2.4), "accuracy": 0.6})
        if audit:
            tw.metrics("lora_audit", {"utilization_mean": 0.1, "stable_rank_mean": 1.2, "adapter": {"r": 16}},
                       step=10)
    return path


@pytest.mark.parametrize(("rule", "needle"), [
    ("gap>1.5", "no test/val/eval split eval"),
    ("test_acc<0.5", "no test/val/eval split eval"),
    ("memorization_detected", "no test/val/eval split eval"),
    ("early_stop_at", "no test/val/eval split eval"),
])
def test_monitor_gate_on_absent_eval_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str,
                                               needle: str) -> None:
    path = _log(tmp_path / "run.jsonl", test_eval=False)
    rc, out, err = cli(capsys, "monitor", str(path), "--fail-on", rule)
    assert rc == 2 and out == "" and f"'{rule}'" in err and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("rule", ["utilization<0.25", "compress_rank", "udr_median>0.1"])
def test_monitor_gate_on_absent_audit_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str) -> None:
    rc, _, err = cli(capsys, "monitor", str(_log(tmp_path / "run.jsonl", audit=False)), "--fail-on", rule)
    assert rc == 2 and f"'{rule}'" in err and "lora_audit" in err and "--append" in err


def test_monitor_udr_rule_on_an_audit_without_udr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "monitor", str(_log(tmp_path / "run.jsonl")), "--fail-on", "udr_median>0.1")
    assert rc == 2 and "no udr_median" in err and "--base-model" in err


def test_monitor_gate_on_absent_steps_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path / "run.jsonl", steps=False)
    for rule in ("nan_losses>0", "nan_loss", "grad_norm_max>10"):
        rc, _, err = cli(capsys, "monitor", str(path), "--fail-on", rule)
        assert rc == 2 and "train_step" in err, rule


def test_monitor_available_rules_decide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path / "run.jsonl")
    gap = 2.4 / 1.5
    assert cli(capsys, "monitor", str(path), "--fail-on", f"gap>{gap + 0.01}")[0] == 0
    rc, _, err = cli(capsys, "monitor", str(path), "--fail-on", f"gap>{gap - 0.01}")
    assert rc == 1 and "gap = 1.6" in err
    assert cli(capsys, "monitor", str(path), "--fail-on", "utilization<0.05")[0] == 0
    assert cli(capsys, "monitor", str(path), "--fail-on", "utilization<0.25")[0] == 1
    assert cli(capsys, "monitor", str(path), "--fail-on", "nan_loss,nan_losses>0")[0] == 0
    assert cli(capsys, "monitor", str(path), "--fail-on", "memorization_detected")[0] == 1  # gap 1.6 >= 1.5


# ---- check ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "rule", "needle"), [
    (["--r", "16", "--alpha", "32", "--targets", "q_proj"], "lower_lr", "the config gives no learning rate"),
    (["--lr", "1e-4", "--targets", "q_proj"], "consider_reduce_rank", "the config gives no LoRA rank"),
    (["--lr", "1e-4", "--r", "8", "--alpha", "16"], "prefer_attention_only", "the config gives no target modules"),
])
def test_check_action_gate_on_an_absent_value_is_exit_2(capsys: pytest.CaptureFixture[str], args: list[str],
                                                        rule: str, needle: str) -> None:
    rc, out, err = cli(capsys, "check", *args, "--task", "gsm8k", "--fail-on", rule)
    assert rc == 2 and out == "" and f"'{rule}'" in err and needle in err and err.count("\n") == 1


def test_check_gates_that_can_be_decided_still_decide(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["check", "--r", "16", "--alpha", "32", "--targets", "q_proj", "v_proj", "--task", "gsm8k"]
    assert cli(capsys, *base, "--lr", "2e-3", "--fail-on", "lower_lr")[0] == 1       # lr > 1e-3 (issue 18)
    assert cli(capsys, *base, "--lr", "5e-4", "--fail-on", "lower_lr")[0] == 0
    assert cli(capsys, *base, "--fail-on", "set_lr")[0] == 1                          # fires because lr is unset
    assert cli(capsys, *base, "--fail-on", "warning")[0] == 1                         # severities always decide
