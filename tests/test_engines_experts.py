"""Engine rows for MoE expert LoRA (PEFT target_parameters): which engines serve a stack, with cited sources.

Hand-built facts check each row fires exactly where the engine source says it fails (vLLM reads only the
gate_up_proj + down_proj pair of nested wrappers; llama.cpp's converter cannot map a stack), that adapters
without experts keep their verdicts unchanged, and vLLM's pattern mapping of the stacks' module names. The
last test runs compress on a real PEFT MoE adapter and reads the verdict it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradience.cli.main import main
from gradience.engines import evaluate, facts_from_config, rule_sources
from gradience.engines.vllm import rank_and_scaling

_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
_STACKS = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]


def test_both_stacks_serve_in_vllm_not_in_llama_cpp() -> None:
    verdict = evaluate(facts_from_config(_CONFIG, [4] * 5, expert_parameters=_STACKS))
    assert verdict["peft"]["ok"] and "caveats" not in verdict["peft"]  # no rank_pattern: no PEFT warning
    assert verdict["vllm"]["ok"] and "gate_up_proj/down_proj" in verdict["vllm"]["reason"]
    assert verdict["vllm"]["caveats"] and "is_transposed" in verdict["vllm"]["caveats"][0]
    assert not verdict["llama_cpp"]["ok"] and verdict["llama_cpp"]["rules"] == ["llama_cpp.experts"]
    sources = rule_sources()
    assert "_stack_moe_lora_weights" in sources["vllm.experts_pair"]["source"]
    assert "get_base_tensor_name" in sources["llama_cpp.experts"]["source"]


def test_one_stack_per_module_fails_vllm() -> None:
    config = dict(_CONFIG, target_parameters=["mlp.experts.down_proj"])
    only_down = [s for s in _STACKS if s.endswith("down_proj")]
    verdict = evaluate(facts_from_config(config, [4] * 3, expert_parameters=only_down))
    assert not verdict["vllm"]["ok"] and verdict["vllm"]["rules"] == ["vllm.experts_pair"]
    assert "model.layers.0.mlp.experts adapts down_proj" in verdict["vllm"]["reason"]
    # from the config alone (verify reads an adapter on disk): the same row fires
    verdict = evaluate(facts_from_config(config, [4] * 3))
    assert verdict["vllm"]["rules"] == ["vllm.experts_pair"]
    # another architecture's names (w1/w2/w3): not vLLM's pair either
    verdict = evaluate(facts_from_config(dict(_CONFIG, target_parameters=["experts.w1", "experts.w2"]), [4]))
    assert verdict["vllm"]["rules"] == ["vllm.experts_pair"]


def test_rank_pattern_on_stacks() -> None:
    config = dict(_CONFIG, rank_pattern={"model.layers.0.mlp.experts.gate_up_proj": 2})
    verdict = evaluate(facts_from_config(config, [4, 2, 4], expert_parameters=_STACKS))
    assert verdict["vllm"]["ok"] and verdict["vllm"]["rules"] == ["vllm.rank_pattern"]
    assert any("_create_and_replace" in note for note in verdict["peft"]["caveats"])
    # vLLM names the stacks experts.base_layer (gate_up_proj) / experts (down_proj) and maps them back
    # (PEFTHelper.get_rank_and_scaling): r=16, alpha=32 with gate_up_proj at rank 2 -> (2, 16.0) there only
    pattern = {"experts.gate_up_proj": 2}
    assert rank_and_scaling("model.layers.0.mlp.experts.base_layer", 16, 32, pattern, {}) == (2, 16.0)
    assert rank_and_scaling("model.layers.0.mlp.experts", 16, 32, pattern, {}) == (16, 2.0)
    assert rank_and_scaling("model.layers.0.mlp.experts", 16, 32, {"experts.down_proj": 2}, {}) == (2, 16.0)
    # older vLLM: one lora_alpha/r, the non-uniform stacks are flagged by the existing legacy row
    old = evaluate(facts_from_config(config, [4, 2, 4], expert_parameters=_STACKS), {"vllm": "0.10.2"})
    assert "vllm.rank_pattern_legacy" in old["vllm"]["rules"]


def test_ordinary_adapter_unchanged() -> None:
    verdict = evaluate(facts_from_config({"r": 8, "lora_alpha": 16}, [8, 8]))
    assert all(v["ok"] and "caveats" not in v for v in verdict.values())


def test_compress_names_the_expert_hazards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    from support.moe_models import make_moe_adapter

    make_moe_adapter("qwen3_moe", tmp_path / "in")
    assert main(["compress", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--energy", "0.9",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    port = doc["portability"]
    assert port["llama_cpp"]["rules"] == ["llama_cpp.experts"] and not port["llama_cpp"]["ok"]
    assert port["vllm"]["ok"] and port["vllm"]["caveats"]
    assert json.loads((tmp_path / "out" / "compress.json").read_text())["portability"] == port


def test_positional_layout_fails_vllm() -> None:
    """Qwen3-MoE-shaped stacks (hidden H=16, intermediate I=12): PEFT 0.21 stores gate_up_proj as A (r·E, H),
    B (2I, r·E) and down_proj as A (r·E, I), B (H, r·E), which vLLM's w13/w2 buffers take; the positional layout
    (A as wide as the parameter's first dimension) does not load there (vLLM PRs 41384, 52194)."""
    hidden, inter = 16, 12
    swapped = [("model.layers.0.mlp.experts.gate_up_proj", hidden, 2 * inter),
               ("model.layers.0.mlp.experts.down_proj", inter, hidden)]
    positional = [("model.layers.0.mlp.experts.gate_up_proj", 2 * inter, hidden),
                  ("model.layers.0.mlp.experts.down_proj", hidden, inter)]
    names = [s[0] for s in swapped]
    assert evaluate(facts_from_config(_CONFIG, [4], expert_parameters=names, expert_shapes=swapped))["vllm"]["ok"]
    bad = evaluate(facts_from_config(_CONFIG, [4], expert_parameters=names, expert_shapes=positional))["vllm"]
    assert not bad["ok"] and bad["rules"] == ["vllm.experts_layout"] and "model.layers.0.mlp.experts" in bad["reason"]
    # hidden = 2·intermediate (the case a width-only check confuses): still told apart
    square = [("m.experts.gate_up_proj", 24, 24), ("m.experts.down_proj", 12, 24)]
    flipped = [("m.experts.gate_up_proj", 24, 24), ("m.experts.down_proj", 24, 12)]
    assert evaluate(facts_from_config(_CONFIG, [4], expert_shapes=square))["vllm"]["ok"]
    assert evaluate(facts_from_config(_CONFIG, [4], expert_shapes=flipped))["vllm"]["rules"] == ["vllm.experts_layout"]
