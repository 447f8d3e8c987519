"""The one engine table (gradience.engines): every row, the vLLM helpers, and the light-core rule.

vLLM is not installed here: its rows are tested against the documented behaviour of vLLM 0.33.0's
``vllm/lora/peft_helper.py`` (PEFTHelper._validate_features / get_rank_and_scaling / validate_legal) —
re-read that file at every vLLM release and update gradience/engines/vllm.py with it. The pattern matching is
checked against PEFT's own ``get_pattern_key`` (which PEFTHelper says it mirrors).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from gradience.engines import (
    MAX_LORA_RANKS,
    RULES,
    OutputFacts,
    evaluate,
    facts_from_config,
    llama_cpp,
    next_allowed_max_lora_rank,
    parse_engine_versions,
    rule_sources,
    vllm,
)

PLAIN = OutputFacts(ranks=[4, 4], config_r=4, rank_pattern={}, has_modules_to_save=False, has_lora_bias=False,
                    dora=False, kinds=frozenset({"linear"}))
HETERO = replace(PLAIN, ranks=[2, 7], rank_pattern={"model.layers.0.self_attn.q_proj": 7})


def test_plain_adapter_is_ok_everywhere() -> None:
    v = evaluate(PLAIN)
    assert all(v[e]["ok"] for e in ("peft", "vllm", "llama_cpp"))
    assert v["vllm"]["version"] == ">= 0.33.0"
    assert "--max-lora-rank 8" in v["vllm"]["reason"]  # 4 is not an allowed value; 8 is the next one


def test_per_module_ranks_current_vllm_ok_legacy_needs_uniform() -> None:
    now = evaluate(HETERO)["vllm"]
    assert now["ok"] and now["rules"] == ["vllm.rank_pattern"] and "--uniform" not in now["reason"]
    assert "--max-lora-rank 8" in now["reason"]
    old = evaluate(HETERO, {"vllm": "0.10.2"})["vllm"]
    assert not old["ok"] and old["rules"] == ["vllm.rank_pattern_legacy"] and "--uniform" in old["reason"]
    assert old["version"] == "0.10.2"
    assert evaluate(PLAIN, {"vllm": "0.10.2"})["vllm"]["ok"]
    assert evaluate(HETERO, {"vllm": "0.33.0"})["vllm"]["ok"]


def test_modules_to_save_heads_allowed_by_current_vllm_only() -> None:
    head = replace(PLAIN, has_modules_to_save=True, modules_to_save=("score",),
                   non_lora_names=("base_model.model.score.weight",))
    assert evaluate(head)["vllm"]["ok"]
    assert not evaluate(head, {"vllm": "0.10.0"})["vllm"]["ok"]
    lm_head = replace(PLAIN, has_modules_to_save=True, modules_to_save=("lm_head",),
                      non_lora_names=("base_model.model.lm_head.weight",))
    v = evaluate(lm_head)
    assert not v["vllm"]["ok"] and "lm_head" in v["vllm"]["reason"] and v["vllm"]["rules"] == ["vllm.modules_to_save"]
    assert not v["llama_cpp"]["ok"] and v["llama_cpp"]["rules"] == ["llama_cpp.non_lora_tensor"]
    # only the flag known (old callers): conservative
    assert not evaluate(replace(PLAIN, has_modules_to_save=True))["vllm"]["ok"]


def test_llama_cpp_norm_is_dropped_at_run_time_not_stopped() -> None:
    norm = replace(PLAIN, has_modules_to_save=True, modules_to_save=("norm",),
                   non_lora_names=("base_model.model.model.norm.weight",))
    cpp = evaluate(norm)["llama_cpp"]
    assert not cpp["ok"] and cpp["rules"] == ["llama_cpp.norm_dropped"]
    assert "silently dropped at run time" in cpp["reason"] and "stop" not in cpp["reason"]


def test_bias_dora_conv_rsLoRA_rows() -> None:
    bias = evaluate(replace(PLAIN, has_lora_bias=True))
    assert not bias["vllm"]["ok"] and "rejected outright" in bias["vllm"]["reason"]
    assert bias["peft"]["ok"] and not bias["llama_cpp"]["ok"]
    base_bias = evaluate(replace(PLAIN, bias="lora_only"))["vllm"]
    assert not base_bias["ok"] and base_bias["rules"] == ["vllm.lora_bias"]
    dora = evaluate(replace(PLAIN, dora=True))
    assert [dora[e]["ok"] for e in ("peft", "vllm", "llama_cpp")] == [True, False, False]
    conv = evaluate(replace(PLAIN, kinds=frozenset({"conv", "linear"})))
    assert conv["vllm"]["rules"] == ["vllm.conv"] and conv["llama_cpp"]["rules"] == ["llama_cpp.conv"]
    rs = evaluate(replace(PLAIN, use_rslora=True))["llama_cpp"]
    assert not rs["ok"] and rs["rules"] == ["llama_cpp.scale"]
    big = evaluate(replace(PLAIN, ranks=[600], config_r=600))["vllm"]
    assert not big["ok"] and big["rules"] == ["vllm.max_lora_rank"]


def test_every_row_has_a_source_and_fires_somewhere() -> None:
    sources = rule_sources()
    fired: set[str] = set()
    cases = [PLAIN, HETERO, replace(PLAIN, has_lora_bias=True), replace(PLAIN, dora=True),
             replace(PLAIN, kinds=frozenset({"conv"})), replace(PLAIN, use_rslora=True),
             replace(PLAIN, ranks=[600], config_r=600),
             replace(PLAIN, has_modules_to_save=True, non_lora_names=("m.norm.weight", "m.lm_head.weight")),
             replace(PLAIN, target_parameters=("mlp.experts.w1",)),  # MoE expert rows (test_engines_experts.py)
             replace(PLAIN, expert_shapes=(("e.gate_up_proj", 24, 16), ("e.down_proj", 16, 12))),
             replace(PLAIN, adapter_format="mlx")]  # the *.format rows (tests/test_qa_fix_verify.py)
    for facts in cases:
        for version in (None, {"vllm": "0.9.0"}):
            for verdict in evaluate(facts, version).values():
                fired.update(verdict["rules"])
    for rule in RULES:
        assert rule.id in fired, rule.id
        assert rule.id in sources
        assert any(ext in sources[rule.id]["source"] for ext in (".py ", ".cpp ", ".h ")), rule.source


def test_next_allowed_max_lora_rank() -> None:
    assert MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [next_allowed_max_lora_rank(r) for r in (1, 2, 8, 9, 257, 320, 321, 512, 513)] == \
        [1, 8, 8, 16, 320, 320, 512, 512, None]


def test_versions_parse_and_refuse() -> None:
    assert vllm.parse_version("0.33.0") == (0, 33, 0)
    assert vllm.parse_version("v0.10.1.post1") == (0, 10, 1)
    assert vllm.parse_version("current") is None
    for bad in ("x", "1e9", "0." + "9" * 50):
        with pytest.raises(ValueError):
            parse_engine_versions({"vllm": bad})
    with pytest.raises(ValueError, match="unknown engine"):
        parse_engine_versions({"tgi": "1.0"})


@pytest.mark.slow
def test_vllm_pattern_matching_equals_peft_get_pattern_key() -> None:
    """PEFTHelper._match_pattern claims PEFT's get_pattern_key semantics; check ours against PEFT itself."""
    peft_other = pytest.importorskip("peft.utils.other")
    pattern = {"layers.1.mlp.down_proj": 3, "model.layers.0.self_attn.q_proj": 5, "q_proj": 7}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.10.self_attn.q_proj", "q_proj", "model.layers.0.self_attn.k_proj"):
        key = peft_other.get_pattern_key(list(pattern), name)
        want = pattern.get(key, 16)
        rank, scaling = vllm.rank_and_scaling(name, 16, 32, pattern, {"q_proj": 4.0})
        assert rank == want, name
        alpha = 4.0 if name.endswith("q_proj") else 32
        assert scaling == pytest.approx(alpha / want)
        # releases before 0.33.0: one lora_alpha/r everywhere
        assert vllm.rank_and_scaling(name, 16, 32, pattern, {}, version=(0, 10, 2)) == (16, 2.0)


def test_facts_from_config_and_llama_cpp_helpers() -> None:
    f = facts_from_config({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "modules_to_save": ["score"],
                           "use_rslora": False}, [8, 4], non_lora_names=["base_model.model.score.weight"])
    assert f.max_rank == 8 and not f.uniform and f.modules_to_save == ("score",)
    assert evaluate(f)["vllm"]["ok"]
    assert llama_cpp.gguf_pair_names("blk.0.attn_q.weight") == ("blk.0.attn_q.weight.lora_a",
                                                                "blk.0.attn_q.weight.lora_b")
    assert llama_cpp.runtime_scale(16.0, 4) == 4.0 and llama_cpp.runtime_scale(0.0, 4, 0.5) == 0.5


def test_engines_import_nothing_heavy() -> None:
    code = ("import sys, gradience.engines; "
            "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
