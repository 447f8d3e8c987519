"""Engine rows for MoE expert LoRA (PEFT ``target_parameters`` stacks), registered in the one table
(:mod:`gradience.engines.table`). Each row cites the engine source it encodes; what could not be pinned from the
sources is said in :data:`CAVEATS` rather than guessed.

Facts read (issue 21):

- PEFT 0.21 ``tuners/lora/layer.py`` ``ParamWrapper``: one rank r per stacked parameter, lora_A (r·E, in),
  lora_B (out, r·E), expert e = rows e·r.. of A and columns e, e+E, .. of B; in/out follow the model's
  ``is_transposed`` ((E, in, out), GPT-OSS) or are swapped ((E, out, in), Qwen3-MoE/Mixtral/OLMoE); scaling
  alpha/r or alpha/√r (rsLoRA) with r the *per-expert* rank. Two targets on one ``experts`` module nest two
  wrappers: keys ``experts.base_layer.lora_*`` (first registered parameter) and ``experts.lora_*``.
- vLLM ``vllm/lora/model_manager.py`` ``LoRAModelManager._stack_moe_lora_weights``: reads exactly that file
  format as ``experts.base_layer`` = gate_up_proj and ``experts`` = down_proj and asserts both are present
  ("FIXME Edge case where LoRA is not added to gate_up_proj or down_proj"); ``vllm/lora/peft_helper.py``
  ``PEFTHelper.get_rank_and_scaling`` maps those two names back to ``.gate_up_proj`` / ``.down_proj`` before
  matching rank_pattern/alpha_pattern, and scales with the per-expert rank (``_scaling``: alpha/r or
  alpha/√r), as PEFT does.
- llama.cpp ``convert_lora_to_gguf.py`` ``get_base_tensor_name`` / ``LoraModel.get_tensors``: the base tensor of
  ``…mlp.experts.lora_A.weight`` is taken to be ``…mlp.experts.weight`` (and ``…experts.base_layer.weight`` for
  the nested one), a name no checkpoint tensor has (the parameters are ``experts.gate_up_proj`` /
  ``experts.down_proj``), so ``ModelBase.map_tensor_name`` (convert_hf_to_gguf.py) stops the conversion; the
  2-D (r·E, in) factor has no expert axis for the 3-D ``ffn_*_exps`` tensors either.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from gradience.engines.facts import OutputFacts

VLLM_PAIR = ("gate_up_proj", "down_proj")  # the two parameters vLLM's 3-D expert path reads, in nesting order
SOURCE_PEFT = "peft/tuners/lora/layer.py ParamWrapper.update_layer / get_delta_weight"
SOURCE_VLLM_STACK = "vllm/lora/model_manager.py LoRAModelManager._stack_moe_lora_weights"
SOURCE_VLLM_SCALE = "vllm/lora/peft_helper.py PEFTHelper.get_rank_and_scaling"
SOURCE_CPP = "convert_lora_to_gguf.py get_base_tensor_name + LoraModel.get_tensors; convert_hf_to_gguf.py " \
             "ModelBase.map_tensor_name"
VERSIONS_VLLM = "main as read (FusedMoE3DWithLoRA); the first release with 3-D expert LoRA is not pinned here"


def expert_modules(f: OutputFacts) -> dict[str, list[str]]:
    """{experts module: its adapted parameter leaves} from the written stacks, else from target_parameters."""
    names = f.expert_parameters or f.target_parameters
    out: dict[str, list[str]] = defaultdict(list)
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf not in out[module]:
            out[module].append(leaf)
    return dict(out)


def vllm_expert_pair(f: OutputFacts, v: Any) -> str | None:
    """vLLM serves a stack only as the (gate_up_proj, down_proj) pair of nested wrappers."""
    bad = {m: leaves for m, leaves in expert_modules(f).items() if sorted(leaves) != sorted(VLLM_PAIR)}
    if not bad:
        return None
    module, leaves = next(iter(bad.items()))
    return (f"expert LoRA on {module or 'experts'} adapts {', '.join(leaves)}: vLLM reads PEFT expert stacks only "
            "as experts.base_layer = gate_up_proj plus experts = down_proj and asserts both "
            f"({SOURCE_VLLM_STACK}), so this adapter fails to load there")


def positional_layout(f: OutputFacts) -> list[str]:
    """Experts modules whose stacks are stored in the positional layout: lora_A's width is the parameter's dim 1
    of an (E, out, in) weight (PEFT before its is_transposed handling, the layout vLLM PRs 41384/52194 describe),
    i.e. gate_up_proj's A is 2·I wide and down_proj's A H wide, where vLLM's w13/w2 buffers (nn.Linear [out, in])
    expect H and I. Read from the shapes alone: with gate_up (in, out) and down (in, out), the layout vLLM reads
    has gate_up.in == down.out (H) and gate_up.out == 2·down.in (2I); the positional one has gate_up.in ==
    2·down.out and gate_up.out == down.in. The two never both hold for non-empty shapes."""
    shapes: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for name, d_in, d_out in f.expert_shapes:
        module, _, leaf = name.rpartition(".")
        shapes[module][leaf] = (d_in, d_out)
    out = []
    for module, leaves in shapes.items():
        if "gate_up_proj" not in leaves or "down_proj" not in leaves:
            continue
        (gu_in, gu_out), (dn_in, dn_out) = leaves["gate_up_proj"], leaves["down_proj"]
        if gu_in == 2 * dn_out and gu_out == dn_in and not (gu_in == dn_out and gu_out == 2 * dn_in):
            out.append(module)
    return out


def vllm_expert_layout(f: OutputFacts, v: Any) -> str | None:
    bad = positional_layout(f)
    if not bad:
        return None
    return (f"expert stacks of {bad[0]}{f' (+{len(bad) - 1} more)' if len(bad) > 1 else ''} are stored with lora_A "
            "as wide as the parameter's first dimension (gate_up_proj's A 2·intermediate wide, down_proj's A "
            "hidden wide: PEFT before its is_transposed handling); vLLM's fused-MoE LoRA buffers take A as "
            "(E, r, hidden) for w13 and (E, r, intermediate) for w2, so loading fails with a shape mismatch "
            f"({SOURCE_VLLM_STACK}; vLLM PRs 41384, 52194). Retrain or convert with a PEFT that swaps in/out for "
            "(E, out, in) parameters (0.21 does; the first such release is not pinned here)")


def cpp_experts(f: OutputFacts, v: Any) -> str | None:
    if not (f.expert_parameters or f.target_parameters):
        return None
    return ("MoE expert LoRA (PEFT target_parameters): convert_lora_to_gguf.py names the stack after its module "
            "(…experts.weight), which no base tensor has, and the stacked (r·E, in) factors have no expert axis; "
            "the conversion stops (ModelBase.map_tensor_name)")


# Facts about expert adapters that the sources read do not settle: reported with every verdict on an adapter
# with expert stacks, so nobody takes the verdict for more than it is.
CAVEATS: dict[str, tuple[str, ...]] = {
    "peft": (),  # see caveats(): PEFT 0.21's pattern warning
    "vllm": ("GPT-OSS-style transposed experts (is_transposed, (E, in, out)) interleave gate and up along "
             "gate_up_proj's output; vLLM de-interleaves them for GptOssForCausalLM in "
             "_convert_3d_to_2d_moe_lora (enable_mixed_moe_lora_format) only; whether the default 3-D path "
             "serves such an adapter exactly was not verified here",),
    "llama_cpp": (),
}


PEFT_PATTERN_WARNING = ("PEFT 0.21 warns that rank_pattern/alpha_pattern keys of expert parameters 'did not match "
                        "any targeted module and were ignored': its check (tuners_utils.py BaseTuner.inject_adapter) "
                        "looks at target_modules only; LoraModel._create_and_replace does apply them to the "
                        "ParamWrappers (tested: tests/test_moe_compress.py)")


def caveats(f: OutputFacts, engine: str) -> list[str]:
    if not (f.expert_parameters or f.target_parameters):
        return []
    out = list(CAVEATS.get(engine, ()))
    if engine == "peft" and (f.rank_pattern or f.alpha_pattern):
        out.append(PEFT_PATTERN_WARNING)
    return out


def vllm_ok_note(f: OutputFacts) -> str:
    """What the passing vLLM verdict adds for expert stacks (empty without them)."""
    if not (f.expert_parameters or f.target_parameters):
        return ""
    return ("; expert stacks: PEFTHelper.get_rank_and_scaling maps experts.base_layer/experts back to "
            "gate_up_proj/down_proj for rank_pattern/alpha_pattern and scales by the per-expert rank "
            "(alpha/r, alpha/√r with rsLoRA) as PEFT does")
