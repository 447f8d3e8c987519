"""Will the compressed adapter load *correctly* in PEFT, vLLM and llama.cpp? Rules from their loading code.

Each rule below names the engine behaviour it encodes. The verdict is about the output written by compress
(one ``lora_alpha``, per-module ranks in ``rank_pattern``, ``use_rslora: false``, scale absorbed so that
α/k_i is right for every module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OutputFacts:
    """What the engines look at in the written adapter."""

    ranks: Sequence[int]          # per module, as written
    config_r: int
    rank_pattern: Mapping[str, int]
    has_modules_to_save: bool     # non-LoRA tensors (modules_to_save copies, heads) in the file
    has_lora_bias: bool           # lora_B biases (PEFT lora_bias=True)
    dora: bool
    kinds: frozenset[str]         # linear / embedding / conv


def _verdict(problems: list[str], ok_reason: str) -> dict[str, Any]:
    return {"ok": not problems, "reason": "; ".join(problems) if problems else ok_reason}


def portability(facts: OutputFacts) -> dict[str, dict[str, Any]]:
    """{engine: {ok, reason}} for ``peft``, ``vllm`` and ``llama_cpp``."""
    uniform = len(set(facts.ranks)) <= 1 and not facts.rank_pattern
    max_r = max(facts.ranks, default=facts.config_r)

    # PEFT: LoraModel builds each module with rank_pattern's rank (else r) and alpha_pattern's alpha (else
    # lora_alpha), scale = alpha / r_i (use_rslora false); modules_to_save, DoRA magnitudes, embedding and conv
    # LoRA and lora_B biases are all part of its format. The test suite loads every output with
    # PeftModel.from_pretrained and compares get_delta_weight with the truncated SVD.
    peft = _verdict([], "PEFT reads rank_pattern and scales each module by lora_alpha/r_i, which the factors "
                        "were written for")

    vllm_problems: list[str] = []
    # vLLM (vllm/lora/peft_helper.py, PEFTHelper): only r, lora_alpha, use_rslora, use_dora, modules_to_save,
    # bias ... are read from adapter_config.json (rank_pattern / alpha_pattern are dropped), and one scaling
    # factor lora_alpha / r is applied to every module: modules whose rank differs from r would be mis-scaled.
    if not uniform:
        vllm_problems.append(f"ranks differ per module ({min(facts.ranks)}..{max_r}) but vLLM ignores rank_pattern "
                             "and scales every module by lora_alpha/r; rerun with --uniform")
    # vLLM PEFTHelper._validate_features: "vLLM only supports modules_to_save being None."
    if facts.has_modules_to_save:
        vllm_problems.append("the adapter has modules_to_save / non-LoRA tensors, which vLLM rejects")
    # vLLM PEFTHelper._validate_features: "vLLM does not yet support DoRA."
    if facts.dora:
        vllm_problems.append("DoRA adapters are rejected by vLLM")
    # vLLM PEFTHelper.validate_legal: bias != "none" needs the server's bias support.
    if facts.has_lora_bias:
        vllm_problems.append("lora_B biases need vLLM's LoRA bias support enabled")
    # vLLM serves LoRA on the language model's linear layers; conv LoRA has no vLLM layer to attach to.
    if "conv" in facts.kinds:
        vllm_problems.append("conv LoRA layers are not supported by vLLM")
    vllm = _verdict(vllm_problems, f"one rank everywhere (r={max_r}); serve with --max-lora-rank >= {max_r} "
                                   "(vLLM's validate_legal rejects r above max_lora_rank)")

    cpp_problems: list[str] = []
    # llama.cpp convert_lora_to_gguf.py: every tensor must be a lora_A/lora_B (or lora_embedding_A/B) factor;
    # anything else except layer norms stops the conversion ("Unexpected name ...: Not a lora_A or lora_B
    # tensor") -- modules_to_save copies, DoRA magnitude vectors and lora_B biases included.
    if facts.has_modules_to_save:
        cpp_problems.append("non-LoRA tensors (modules_to_save, heads) stop convert_lora_to_gguf.py")
    if facts.dora:
        cpp_problems.append("DoRA magnitude vectors are not lora_A/lora_B tensors; convert_lora_to_gguf.py "
                            "rejects them")
    if facts.has_lora_bias:
        cpp_problems.append("lora_B biases are not lora_A/lora_B tensors; convert_lora_to_gguf.py rejects them")
    # llama.cpp maps language-model weights to GGUF names; conv layers have no mapping.
    if "conv" in facts.kinds:
        cpp_problems.append("conv LoRA layers have no GGUF mapping in llama.cpp")
    # llama.cpp stores the config's lora_alpha once and, at run time, scales each tensor pair by
    # alpha / rank with the rank read from the tensor (llama-adapter.cpp), so per-module ranks are fine and
    # use_rslora / alpha_pattern (ignored there) are not needed: the output has neither.
    llama_cpp = _verdict(cpp_problems, "llama.cpp takes each module's rank from its tensors and scales by "
                                       "lora_alpha/rank, which matches the written factors")
    return {"peft": peft, "vllm": vllm, "llama_cpp": llama_cpp}
