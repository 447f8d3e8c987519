"""Every pre-flight rule of SPEC §7 on both sides of its threshold, per profile, plus report shape."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gradience.config import snapshot_from_sources
from gradience.policy import thresholds as T
from gradience.policy.check_rules import ACTIONS, analyze_targets, check_config, resolve_task_profile
from gradience.telemetry.types import SEVERITY_RANK, Recommendation

# A config that fires nothing in any profile's conditional rules.
CLEAN = {"lr": 2e-4, "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"],
         "lora_dropout": 0.05, "weight_decay": 0.0}


def recs(profile: str, **changes: Any) -> dict[str, Recommendation]:
    config = {**CLEAN, "task_profile": profile}
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    report = check_config(snapshot_from_sources(config=config))
    by_action = {r.action: r for r in report.recommendations}
    assert len(by_action) == len(report.recommendations)  # one per action
    return by_action


_DROP = object()


def test_clean_config_is_ok_for_classification_and_reasoning() -> None:
    for profile in ("easy_classification", "hard_reasoning"):
        got = recs(profile)
        assert list(got) == ["config_ok"]
        assert got["config_ok"].severity == "info"


def test_config_ok_never_accompanies_another_rule() -> None:
    for profile in ("easy_classification", "hard_reasoning", "generation", "unknown"):
        got = recs(profile, lr=1.0)
        assert "config_ok" not in got and "fix_lr_units" in got


# --- every profile ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["easy_classification", "hard_reasoning", "generation", "unknown"])
def test_universal_rules_fire_in_every_profile(profile: str) -> None:
    assert recs(profile, weight_decay=-0.01)["fix_weight_decay"].severity == "error"
    assert "fix_weight_decay" not in recs(profile, weight_decay=0.0)
    assert recs(profile, lr=0.0)["fix_lr_units"].severity == "error"
    assert recs(profile, lr=-1e-4)["fix_lr_units"].severity == "error"
    assert recs(profile, lr=2e-2)["fix_lr_units"].severity == "error"
    assert "fix_lr_units" not in recs(profile, lr=T.LR_MAX_SANE)
    assert recs(profile, alpha=_DROP)["set_alpha"].severity == "warning"
    assert recs(profile, lora_dropout=1.0)["fix_dropout"].severity == "error"
    assert recs(profile, lora_dropout=-0.1)["fix_dropout"].severity == "error"
    assert "fix_dropout" not in recs(profile, lora_dropout=0.0)
    assert "fix_dropout" not in recs(profile, lora_dropout=0.99)
    assert recs(profile, r=0)["fix_rank"].severity == "error"
    assert recs(profile, r=-4)["fix_rank"].severity == "error"
    assert recs(profile, r=8.5)["fix_rank"].severity == "error"
    assert "fix_rank" not in recs(profile, r=1)
    assert recs(profile, use_rslora=True, r=8)["review_rslora"].severity == "info"
    assert "review_rslora" not in recs(profile, use_rslora=True, r=16)
    assert "review_rslora" not in recs(profile, use_rslora=False, r=8)
    assert recs(profile, targets=["q_proj", "frobnicator"])["review_targets"].severity == "info"


def test_units_error_evidence_and_suppression_of_profile_lr_rules() -> None:
    got = recs("hard_reasoning", lr=5.0)
    assert got["fix_lr_units"].evidence["lr"] == 5.0
    assert got["fix_lr_units"].evidence["max_sane"] == T.LR_MAX_SANE
    assert "lower_lr" not in got  # one mistake, one message


def test_set_alpha_evidence_is_the_implied_default_scale() -> None:
    rec = recs("easy_classification", alpha=_DROP, r=4)["set_alpha"]
    assert rec.evidence["default_alpha"] == 8.0
    assert rec.evidence["implied_alpha_over_r"] == pytest.approx(8.0 / 4)


def test_rslora_evidence_scales() -> None:
    rec = recs("easy_classification", use_rslora=True, r=4, alpha=8)["review_rslora"]
    assert rec.evidence["scale_rslora"] == pytest.approx(8 / math.sqrt(4))
    assert rec.evidence["scale_plain"] == pytest.approx(8 / 4)


def test_review_targets_lists_only_unrecognized() -> None:
    rec = recs("easy_classification", targets=["q_proj", "frobnicator", "lm_head"])["review_targets"]
    assert rec.evidence["unrecognized"] == ["frobnicator", "lm_head"]


# --- learning rate (every profile; Schulman et al. 2025) ---------------------------------------------------
@pytest.mark.parametrize("profile", ["easy_classification", "hard_reasoning", "generation", "unknown"])
def test_lr_warns_only_on_clearly_harmful_values(profile: str) -> None:
    for lr in (T.LR_FULL_FT_MAX * 1.01, *T.LR_LORA_BAND, T.LR_LORA_HARMFUL_HIGH):  # the whole band is quiet
        got = recs(profile, lr=lr)
        assert "lower_lr" not in got and "raise_lr" not in got, lr
    high = recs(profile, lr=1.1e-3)["lower_lr"]
    assert high.severity == "warning" and high.evidence["threshold"] == T.LR_LORA_HARMFUL_HIGH
    assert "LoRA Without Regret" in (high.source or "")
    low = recs(profile, lr=T.LR_FULL_FT_MAX)["raise_lr"]
    assert low.severity == "warning" and low.evidence["suggested_lr"] == T.LR_LORA_SUGGESTED


def test_lr_bound_scales_with_the_model_size() -> None:
    # Unknown size and >= 1B: 1e-3; known < 1B: 3e-3 (from --model-size / config key, or the name).
    assert "lower_lr" in recs("hard_reasoning", lr=2e-3, model_name="meta-llama/Llama-2-7b-hf")
    small = recs("hard_reasoning", lr=2e-3, model_name="HuggingFaceTB/SmolLM2-135M")
    assert "lower_lr" not in small
    fired = recs("hard_reasoning", lr=4e-3, model_size="135M")["lower_lr"]
    assert fired.evidence["threshold"] == T.LR_LORA_HARMFUL_HIGH_SMALL and fired.evidence["model_params"] == 135e6
    assert "lower_lr" in recs("hard_reasoning", lr=2e-3, model_size="1B")   # 1B is not "< 1B"


def test_hard_reasoning_lr_unset_suggests_the_lora_band() -> None:
    rec = recs("hard_reasoning", lr=_DROP)["set_lr"]
    assert rec.severity == "warning" and rec.evidence["suggested_lr"] == T.LR_LORA_SUGGESTED == 2e-4


# --- targets (every profile; QLoRA, Biderman 2024, Schulman 2025) ---------------------------------------------
@pytest.mark.parametrize("profile", ["easy_classification", "hard_reasoning", "generation", "unknown"])
def test_attention_only_gets_add_mlp_targets(profile: str) -> None:
    rec = recs(profile, targets=["q_proj", "v_proj"])["add_mlp_targets"]
    assert rec.severity == "info" and rec.evidence["suggested_targets"] == "all-linear"
    assert "QLoRA" in (rec.source or "") and "Learns Less" in (rec.source or "")
    for targets in (["q_proj", "v_proj", "up_proj"], ["gate_proj", "up_proj", "down_proj"], ["all-linear"]):
        assert "add_mlp_targets" not in recs(profile, targets=targets), targets


@pytest.mark.parametrize("profile", ["easy_classification", "hard_reasoning", "generation", "unknown"])
def test_retired_rules_never_fire(profile: str) -> None:
    from gradience.policy.check_rules import RETIRED_ACTIONS

    cases = [{"targets": ["q_proj", "v_proj", "up_proj"]}, {"targets": ["gate_proj", "up_proj"]},
             {"targets": ["q_lin", "lin1"]}, {"lr": 8e-5}, {"lr": 2e-4, "alpha": 16, "r": 8}, {"lr": 6e-4}]
    for changes in cases:
        assert not set(RETIRED_ACTIONS) & set(recs(profile, **changes)), changes
    assert set(RETIRED_ACTIONS) <= set(ACTIONS)  # still accepted by --fail-on


def test_hard_reasoning_targets_unset_suggest_all_linear() -> None:
    for targets in ([], _DROP):
        rec = recs("hard_reasoning", targets=targets)["add_targets"]
        assert rec.severity == "warning" and "all-linear" in rec.message


def test_hard_reasoning_rank() -> None:
    assert recs("hard_reasoning", r=_DROP)["set_rank"].evidence["suggested_r"] == T.R_DEFAULT_SUGGESTION
    assert "consider_reduce_rank" not in recs("hard_reasoning", r=16, alpha=16)
    soft = recs("hard_reasoning", r=17, alpha=17)["consider_reduce_rank"]
    strong = recs("hard_reasoning", r=32, alpha=32)["consider_reduce_rank"]
    assert soft.severity == strong.severity == "info"
    assert strong.confidence > soft.confidence
    assert recs("hard_reasoning", r=31, alpha=31)["consider_reduce_rank"].confidence == soft.confidence


# --- easy_classification ----------------------------------------------------------------------------------
def test_easy_classification_rules() -> None:
    big = recs("easy_classification", r=32, alpha=64)["reduce_rank"]
    assert big.severity == "info" and big.evidence["suggested_r"] == [4, 8]
    assert "reduce_rank" not in recs("easy_classification", r=16, alpha=32)
    assert "reduce_rank" not in recs("hard_reasoning", r=32, alpha=64)  # profile-specific
    # Reasoning-only rules stay quiet for classification.
    quiet = recs("easy_classification", lr=_DROP, r=_DROP, targets=[])
    assert not {"set_lr", "set_rank", "add_targets"} & set(quiet)


# --- generation / unknown ---------------------------------------------------------------------------------
def test_generation_calibration() -> None:
    got = recs("generation")
    assert got["calibration_probe"].evidence["suggested_lr"] == T.LR_GENERATION_SUGGESTED
    assert got["calibration_probe"].evidence["suggested_targets"] == "attention+mlp"
    assert "lower_lr" not in got


def test_unknown_profile_suggests_the_probe() -> None:
    got = recs("unknown")
    probe = got["calibration_probe"]
    assert probe.evidence["suggested_r"] == 8 and probe.evidence["suggested_lr"] == T.LR_LORA_SUGGESTED
    assert probe.evidence["suggested_targets"] == "all-linear"


# --- profile resolution and report -------------------------------------------------------------------------
def test_profile_explicit_beats_inference() -> None:
    snap = snapshot_from_sources(config={"dataset_name": "gsm8k", "task_profile": "generation"})
    assert resolve_task_profile(snap) == ("generation", False)
    snap = snapshot_from_sources(config={"dataset_name": "gsm8k"})
    assert resolve_task_profile(snap) == ("hard_reasoning", True)
    assert resolve_task_profile(snapshot_from_sources(config={"dataset_name": "my-data"})) == ("unknown", True)


def test_report_order_and_shape() -> None:
    snap = snapshot_from_sources(config={"dataset": "gsm8k", "lr": 3e-4, "r": 64, "weight_decay": -1,
                                         "targets": "q_proj,up_proj,zzz"})
    report = check_config(snap)
    ranks = [SEVERITY_RANK[r.severity] for r in report.recommendations]
    assert ranks == sorted(ranks, reverse=True)
    for rec in report.recommendations:
        assert rec.action in ACTIONS
        assert 0.0 <= rec.confidence <= 1.0
        assert rec.message and rec.rationale and rec.scope and rec.evidence and rec.source
    data = report.to_dict()
    assert data["schema"] == "gradience.check/v1"
    assert data["task_profile"] == {"name": "hard_reasoning", "inferred": True}
    assert [r["action"] for r in data["recommendations"]] == [r.action for r in report.recommendations]
    assert data["config"]["optimizer"]["lr"] == 3e-4


@pytest.mark.parametrize(("targets", "model", "attn", "mlp", "unrecognized"), [
    (["q_proj", "v_proj"], None, True, False, []),
    (["c_attn"], "gpt2", True, False, []),
    (["c_proj"], "gpt2", True, True, []),          # bare c_proj matches attn.c_proj and mlp.c_proj
    (["dense"], "bert-base-uncased", True, True, []),
    (["dense"], "tiiuae/falcon-7b", True, False, []),
    (["all-linear"], None, True, True, []),
    ([r".*\.(q_proj|v_proj)$"], None, True, False, []),
    ([r".*mlp\.(up|down)_proj"], None, False, True, []),
    (["weird_thing"], None, False, False, ["weird_thing"]),
])
def test_analyze_targets(targets: list[str], model: str | None, attn: bool, mlp: bool,
                         unrecognized: list[str]) -> None:
    t = analyze_targets(targets, model)
    assert (t.has_attn, t.has_mlp, t.unrecognized) == (attn, mlp, unrecognized)


def test_snapshot_read_back_from_a_log_with_strings_does_not_crash() -> None:
    from gradience.telemetry.types import ConfigSnapshot

    snap = ConfigSnapshot.from_dict({"dataset_name": "gsm8k",
                                     "optimizer": {"lr": "3e-4", "weight_decay": "-0.1"},
                                     "lora": {"r": "64", "alpha": "oops", "target_modules": "q_proj,up_proj"}})
    got = {r.action: r for r in check_config(snap).recommendations}
    assert {"fix_weight_decay", "consider_reduce_rank", "set_alpha"} <= set(got)
