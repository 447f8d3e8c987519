"""check rules from evidence (issue 18): model facts (size, recurrent layers, experts), the recurrent-model and MoE
rules, rsLoRA at high rank, and alpha on an adapter that `gradience compress` really wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests.support.synthetic import write_synthetic_adapter

from gradience.cli.main import main
from gradience.config import snapshot_from_sources
from gradience.errors import InputError
from gradience.policy import sources as S
from gradience.policy import thresholds as T
from gradience.policy.check_rules import ACTION_SOURCES, ACTIONS, RETIRED_ACTIONS, CheckContext, check_config
from gradience.policy.model_facts import model_facts, parse_model_size, size_from_name, ssm_targets


def actions(config: dict[str, Any], context: CheckContext | None = None) -> dict[str, Any]:
    report = check_config(snapshot_from_sources(config=config), context=context)
    return {r.action: r for r in report.recommendations}


def check_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main(["check", *argv, "--json"])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


# -- every rule has a source; retired ids stay accepted ------------------------------------------------------
def test_every_live_action_has_a_citation() -> None:
    live = set(ACTIONS) - set(RETIRED_ACTIONS)
    assert live <= set(ACTION_SOURCES)
    assert not set(RETIRED_ACTIONS) & set(ACTION_SOURCES)
    for action, src in ACTION_SOURCES.items():  # a paper (with its year), an engine file, or the sanity label
        assert src == S.HEURISTIC or re.search(r"\b20[12]\d\b", src) or ".py" in src, action


# -- model size -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "params"), [
    ("7B", 7e9), ("1.5b", 1.5e9), ("135M", 135e6), ("7e9", 7e9), (" 70 B ", 70e9), (123456789, 123456789.0),
])
def test_parse_model_size(text: Any, params: float) -> None:
    assert parse_model_size(text) == pytest.approx(params)


@pytest.mark.parametrize("bad", ["abc", "-7B", "0", "7Q", True, "1e40", float("nan")])
def test_parse_model_size_rejects_nonsense(bad: Any) -> None:
    with pytest.raises(InputError):
        parse_model_size(bad)


@pytest.mark.parametrize(("name", "params"), [
    ("meta-llama/Llama-2-7b-hf", 7e9), ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9), ("HuggingFaceTB/SmolLM2-135M", 135e6),
    ("mistralai/Mixtral-8x7B-v0.1", 56e9), ("distilbert-base-uncased", None), ("gpt2", None), (None, None),
    ("Qwen/Qwen3-Next-80B-A3B-Instruct", 80e9),
])
def test_size_from_name(name: str | None, params: float | None) -> None:
    got = size_from_name(name)
    assert got == (pytest.approx(params) if params is not None else None)


def test_size_from_a_local_config_json_and_flag_precedence(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # A Llama-shaped config: 16 layers x (4·2048² + 3·2048·8192) + 32000·2048 = 1.1B (estimated, > 1B).
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 2048,
                                                   "num_hidden_layers": 16, "intermediate_size": 8192,
                                                   "vocab_size": 32000}))
    expected = 16 * (4 * 2048**2 + 3 * 2048 * 8192) + 32000 * 2048
    rc, data = check_json(capsys, "--model", str(model), "--lr", "2e-3", "--r", "8", "--alpha", "16")
    assert data["model"]["params"] == expected and data["model"]["params_source"].startswith("config.json")
    assert any(r["action"] == "lower_lr" for r in data["recommendations"])
    # The flag wins: a 135M model at 2e-3 is inside the small-model bound.
    rc, data = check_json(capsys, "--model", str(model), "--model-size", "135M", "--lr", "2e-3", "--r", "8",
                          "--alpha", "16")
    assert rc == 0 and data["model"]["params"] == 135e6 and data["model"]["params_source"] == "--model-size"
    assert not any(r["action"] == "lower_lr" for r in data["recommendations"])
    rc = main(["check", "--model-size", "lots", "--lr", "1e-4"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "model size 'lots'" in err


# -- recurrent / state-space models (Galim et al. 2024) ---------------------------------------------------------
@pytest.mark.parametrize(("name", "config", "recurrent"), [
    ("ai21labs/Jamba-v0.1", {}, True),
    ("state-spaces/mamba-130m-hf", {}, True),
    ("tiiuae/Falcon-H1-7B-Instruct", {}, True),
    ("x", {"model_type": "nemotron_h"}, True),
    ("x", {"model_type": "qwen3_next"}, True),
    ("x", {"model_type": "custom", "layers_block_type": ["mamba", "attention"]}, True),
    ("x", {"model_type": "custom", "layer_types": ["linear_attention", "full_attention"]}, True),
    ("x", {"model_type": "custom", "hybrid_override_pattern": "M-M*-"}, True),
    ("meta-llama/Llama-2-7b-hf", {"model_type": "llama", "layer_types": ["full_attention"]}, False),
])
def test_recurrent_architectures_are_recognised(name: str, config: dict[str, Any], recurrent: bool) -> None:
    facts = model_facts(name, config=config)
    assert facts.recurrent is recurrent and (facts.recurrent_reason is not None) is recurrent


def test_ssm_target_matching() -> None:
    assert ssm_targets(["in_proj", "out_proj", "q_proj"]) == []
    assert ssm_targets(["x_proj", "in_proj"]) == ["x_proj"]
    assert ssm_targets([r".*mamba\.(dt_proj|out_proj)"]) == [r".*mamba\.(dt_proj|out_proj)"]
    assert ssm_targets(["all-linear"]) == ["all-linear"]
    assert ssm_targets(None, ["model.layers.0.mamba.A_log"]) == ["model.layers.0.mamba.A_log"]


def test_avoid_ssm_targets_only_on_recurrent_models() -> None:
    base = {"lr": 2e-4, "r": 8, "alpha": 16, "model_name": "ai21labs/Jamba-v0.1"}
    rec = actions({**base, "targets": ["in_proj", "x_proj", "dt_proj", "out_proj"]})["avoid_ssm_targets"]
    assert rec.severity == "warning" and rec.evidence["targets"] == ["x_proj", "dt_proj"]
    assert rec.source == S.GALIM_2024
    assert "avoid_ssm_targets" in actions({**base, "targets": ["all-linear"]})
    assert "avoid_ssm_targets" not in actions({**base, "targets": ["in_proj", "out_proj", "q_proj", "up_proj"]})
    # The same names on a transformer are ordinary linears: no warning.
    llama = {**base, "model_name": "meta-llama/Llama-2-7b-hf", "targets": ["all-linear"]}
    assert "avoid_ssm_targets" not in actions(llama)


# -- MoE (PEFT docs: effective_r = max(1, r // num_experts)) ----------------------------------------------------
def test_reduce_expert_rank_follows_the_peft_guidance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 8,
                                                   "hidden_size": 64, "num_hidden_layers": 2}))
    peft = tmp_path / "adapter_config.json"
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
           "base_model_name_or_path": str(model)}
    peft.write_text(json.dumps(cfg))
    _, data = check_json(capsys, "--peft", str(peft), "--lr", "2e-4")
    rec = next(r for r in data["recommendations"] if r["action"] == "reduce_expert_rank")
    assert rec["evidence"]["suggested_expert_r"] == 16 // 8 and rec["evidence"]["num_experts"] == 8
    assert rec["source"] == S.PEFT_MOE_DOCS and data["model"]["num_experts"] == 8
    # With the documented rank_pattern in place the rule is satisfied.
    peft.write_text(json.dumps({**cfg, "rank_pattern": {"experts.gate_up_proj": 2, "experts.down_proj": 2}}))
    _, data = check_json(capsys, "--peft", str(peft), "--lr", "2e-4")
    assert not any(r["action"] == "reduce_expert_rank" for r in data["recommendations"])
    # A dense model with the same targets: nothing to divide.
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    peft.write_text(json.dumps(cfg))
    _, data = check_json(capsys, "--peft", str(peft), "--lr", "2e-4")
    assert not any(r["action"] == "reduce_expert_rank" for r in data["recommendations"])


# -- alpha / rank ---------------------------------------------------------------------------------------------
def test_rslora_suggested_at_high_rank_only() -> None:
    base = {"lr": 2e-4, "targets": ["all-linear"]}
    rec = actions({**base, "r": T.R_RSLORA_SUGGEST, "alpha": 2 * T.R_RSLORA_SUGGEST})["consider_rslora"]
    assert rec.severity == "info" and rec.source == S.KALAJDZIEVSKI_2023
    assert "consider_rslora" not in actions({**base, "r": T.R_RSLORA_SUGGEST - 1, "alpha": 2 * 63})
    assert "consider_rslora" not in actions({**base, "r": 128, "alpha": 22, "use_rslora": True})


def test_fix_alpha_scale_suggests_alpha_2r() -> None:
    rec = actions({"lr": 2e-4, "r": 32, "alpha": 8, "targets": ["all-linear"]})["fix_alpha_scale"]
    assert rec.evidence["suggested_alpha"] == 64 and "alpha = 2r" in rec.message


def _compressed_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    src = write_synthetic_adapter(tmp_path / "src", layers=2, targets={"q_proj": (32, 32), "v_proj": (32, 32)},
                                  r=16, alpha=16)
    out = tmp_path / "small"
    assert main(["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "1"]) == 0
    capsys.readouterr()
    return out


def test_compressed_adapter_alpha_is_a_serving_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _compressed_adapter(tmp_path, capsys)
    written = json.loads((out / "adapter_config.json").read_text())
    scale = written["lora_alpha"] / 1
    assert scale >= T.ALPHA_SCALE_EXTREME_HIGH  # the extreme the issue reported (alpha=16 at r=1)
    _, data = check_json(capsys, "--peft-dir", str(out), "--lr", "2e-4")
    got = {r["action"]: r for r in data["recommendations"]}
    assert "fix_alpha_scale" not in got
    assert got["alpha_is_serving_scale"]["evidence"]["compressed"]["by"] == "compress.json"
    assert data["compressed_adapter"]["path"].endswith("compress.json")
    # Without compress.json the safetensors __metadata__ still says who wrote it.
    (out / "compress.json").unlink()
    _, data = check_json(capsys, "--peft-dir", str(out), "--lr", "2e-4")
    got = {r["action"]: r for r in data["recommendations"]}
    assert "fix_alpha_scale" not in got and got["alpha_is_serving_scale"]["evidence"]["compressed"]["by"] == \
        "safetensors __metadata__"
    # Control: the same config on an adapter compress did not write is a mistake.
    plain = write_synthetic_adapter(tmp_path / "plain", layers=1, targets={"q_proj": (32, 32)}, r=1,
                                    alpha=written["lora_alpha"])
    _, data = check_json(capsys, "--peft-dir", str(plain), "--lr", "2e-4")
    assert any(r["action"] == "fix_alpha_scale" for r in data["recommendations"])


def test_new_action_gates_need_their_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--r", "8", "--alpha", "16", "--fail-on", "raise_lr"]) == 2    # no lr: cannot decide
    assert main(["check", "--r", "8", "--alpha", "16", "--lr", "1e-5", "--fail-on", "raise_lr"]) == 1
    assert main(["check", "--r", "8", "--alpha", "16", "--lr", "2e-4", "--fail-on", "raise_lr"]) == 0
    assert main(["check", "--lr", "2e-4", "--r", "8", "--alpha", "16", "--fail-on", "add_mlp_targets"]) == 2
    assert main(["check", "--lr", "2e-4", "--r", "8", "--alpha", "16", "--targets", "q_proj",
                 "--fail-on", "add_mlp_targets"]) == 1
    assert main(["check", "--lr", "2e-4", "--r", "8", "--alpha", "16", "--targets", "q_proj",
                 "--fail-on", "prefer_attention_only"]) == 0   # retired: accepted, never met
    capsys.readouterr()


def test_size_from_the_base_saved_beside_the_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The toy run's layout: <run>/peft beside <run>/base (config.json + model.safetensors).
    peft = write_synthetic_adapter(tmp_path / "run" / "peft", layers=1, targets={"q_proj": (32, 32)}, r=4, alpha=8,
                                   base_model_name_or_path="gradience/tiny-model")
    base = tmp_path / "run" / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                  "intermediate_size": 128, "vocab_size": 100}))
    (base / "model.safetensors").write_bytes(b"")   # only its presence marks a saved base
    _, data = check_json(capsys, "--peft-dir", str(peft), "--lr", "2e-3")
    assert data["model"]["params"] == 2 * (4 * 64 * 64 + 3 * 64 * 128) + 100 * 64
    assert data["model"]["config_path"] == str(base / "config.json")
    assert not any(r["action"] == "lower_lr" for r in data["recommendations"])   # < 1B: 2e-3 is inside 3e-3
