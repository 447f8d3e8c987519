"""Tiny transformers MoE models (Qwen3-MoE: (E, out, in); GPT-OSS: (E, in, out), is_transposed) with PEFT
``target_parameters`` expert adapters, and PEFT's own per-expert ΔW as the independent reference (compress and
merge tests of MoE expert LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

E, R = 4, 4
MODELS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=12, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=E, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
}


def _base(model_type: str) -> Any:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=12,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, **MODELS[model_type])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def make_moe_adapter(model_type: str, out: Path, *, seed: int = 0, r: int = R, use_rslora: bool = False) -> None:
    """A PEFT target_parameters adapter whose experts have different spectra: expert e's rank-j direction is
    scaled by decay_e^j (so an energy policy asks a different k per expert) and expert E-1 is left untrained
    (B_e = 0, as PEFT's init leaves an expert no token was routed to)."""
    import peft
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    lora = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj"], use_rslora=use_rslora,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(_base(model_type), lora)
    gen = torch.Generator().manual_seed(seed)
    decays = [0.9, 0.3, 0.05, 1.0]
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, ParamWrapper):
                w_b = module.lora_B["default"].weight  # (out, r·E): expert e's rank-j column at j·E + e
                w_b.copy_(torch.randn(w_b.shape, generator=gen))
                module.lora_A["default"].weight.copy_(torch.randn(module.lora_A["default"].weight.shape,
                                                                  generator=gen))
                for e in range(module.num_experts):
                    for j in range(r):
                        w_b[:, j * module.num_experts + e] *= decays[e] ** j if e < module.num_experts - 1 else 0.0
    pm.save_pretrained(out)


def peft_expert_deltas(adapter: Path, model_type: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PEFT's get_delta_weight per expert, in (out, in) orientation, and each parameter's rank."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    pm = peft.PeftModel.from_pretrained(_base(model_type), str(adapter))
    deltas, ranks = {}, {}
    for name, module in pm.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        param = f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{module.parameter_name}"
        ranks[param] = module.r["default"]
        delta = module.get_delta_weight("default").detach().double().numpy()
        for e in range(module.num_experts):
            deltas[f"{param}[{e}]"] = delta[e] if module._did_swap_in_out_features else delta[e].T
    return deltas, ranks
