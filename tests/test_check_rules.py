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
CLEAN = {"lr": 5e-5, "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "lora_dropout": 0.05,
         "weight_decay": 0.0}


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


# --- hard_reasoning ---------------------------------------------------------------------------------------
def test_hard_reasoning_lr_bands() -> None:
    assert recs("hard_reasoning", lr=_DROP)["set_lr"].severity == "warning"
    assert recs("hard_reasoning", lr=_DROP)["set_lr"].evidence["suggested_lr"] == T.LR_CONSERVATIVE
    high = recs("hard_reasoning", lr=1.5e-4)
    assert high["lower_lr"].severity == "warning" and "consider_lower_lr" not in high
    at_high = recs("hard_reasoning", lr=T.LR_HIGH)
    assert "lower_lr" not in at_high and at_high["consider_lower_lr"].severity == "info"
    assert "consider_lower_lr" in recs("hard_reasoning", lr=6e-5)
    at_conservative = recs("hard_reasoning", lr=T.LR_CONSERVATIVE)
    assert "consider_lower_lr" not in at_conservative and "lower_lr" not in at_conservative


def test_hard_reasoning_targets() -> None:
    assert recs("hard_reasoning", targets=[])["add_targets"].severity == "warning"
    assert recs("hard_reasoning", targets=_DROP)["add_targets"].severity == "warning"
    both = recs("hard_reasoning", targets=["q_proj", "v_proj", "up_proj"])
    assert both["prefer_attention_only"].severity == "info" and "add_attention_targets" not in both
    mlp_only = recs("hard_reasoning", targets=["gate_proj", "up_proj", "down_proj"])
    assert mlp_only["add_attention_targets"].severity == "warning"
    assert "prefer_attention_only" not in recs("hard_reasoning", targets=["q_proj", "k_proj"])


def test_hard_reasoning_rank() -> None:
    assert recs("hard_reasoning", r=_DROP)["set_rank"].evidence["suggested_r"] == T.R_DEFAULT_SUGGESTION
    assert "consider_reduce_rank" not in recs("hard_reasoning", r=16, alpha=16)
    soft = recs("hard_reasoning", r=17, alpha=17)["consider_reduce_rank"]
    strong = recs("hard_reasoning", r=32, alpha=32)["consider_reduce_rank"]
    assert soft.severity == strong.severity == "info"
    assert strong.confidence > soft.confidence
    assert recs("hard_reasoning", r=31, alpha=31)["consider_reduce_rank"].confidence == soft.confidence


def test_hard_reasoning_alpha_over_r_at_high_lr() -> None:
    fired = recs("hard_reasoning", lr=2e-4, r=8, alpha=8)["reduce_alpha_or_lr"]
    assert fired.evidence["alpha_over_r"] == 1.0 and fired.evidence["lr"] == 2e-4
    assert "reduce_alpha_or_lr" not in recs("hard_reasoning", lr=2e-4, r=8, alpha=7.9)
    assert "reduce_alpha_or_lr" not in recs("hard_reasoning", lr=T.LR_HIGH, r=8, alpha=16)


# --- easy_classification ----------------------------------------------------------------------------------
def test_easy_classification_rules() -> None:
    big = recs("easy_classification", r=32, alpha=64)["reduce_rank"]
    assert big.severity == "info" and big.evidence["suggested_r"] == [4, 8]
    assert "reduce_rank" not in recs("easy_classification", r=16, alpha=32)
    assert "reduce_rank" not in recs("hard_reasoning", r=32, alpha=64)  # profile-specific
    assert recs("easy_classification", targets=["q_lin", "lin1"])["prefer_attention_only"].severity == "info"
    assert recs("easy_classification", lr=6e-4)["lower_lr"].severity == "warning"
    assert "lower_lr" not in recs("easy_classification", lr=T.LR_EASY_CLASSIFICATION_MAX)
    # Reasoning-only rules stay quiet for classification.
    quiet = recs("easy_classification", lr=_DROP, r=_DROP, targets=[])
    assert not {"set_lr", "set_rank", "add_targets"} & set(quiet)


# --- generation / unknown ---------------------------------------------------------------------------------
def test_generation_calibration_and_lr() -> None:
    got = recs("generation")
    assert got["calibration_probe"].evidence["suggested_lr"] == T.LR_GENERATION_SUGGESTED
    assert got["calibration_probe"].evidence["suggested_targets"] == "attention+mlp"
    assert "lower_lr" not in got
    assert recs("generation", lr=4e-4)["lower_lr"].severity == "warning"
    assert "lower_lr" not in recs("generation", lr=T.LR_GENERATION_HIGH)


def test_unknown_profile_suggests_the_probe() -> None:
    got = recs("unknown")
    probe = got["calibration_probe"]
    assert probe.evidence["suggested_r"] == 8 and probe.evidence["suggested_lr"] == 5e-5
    assert probe.evidence["suggested_targets"] == "attention-only"
    assert "prefer_attention_only" not in got


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
        assert rec.message and rec.rationale and rec.scope and rec.evidence
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
    assert {"lower_lr", "fix_weight_decay", "consider_reduce_rank", "set_alpha", "prefer_attention_only"} <= set(got)
