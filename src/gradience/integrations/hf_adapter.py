"""Audit of the in-memory LoRA adapter of a PEFT / transformers-PEFT model (the callback's train-end audit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradience.integrations.hf_values import _plain


def _adapter_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(LoRA tensors, adapter config dict) of the active adapter of a PEFT or transformers-PEFT model."""
    if model is None:
        return None
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config:
        return None
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        name = model.active_adapter
    else:  # transformers' own PEFT integration (model.add_adapter)
        active = model.active_adapters() if callable(getattr(model, "active_adapters", None)) else []
        name = active[0] if active else next(iter(peft_config))
    # save_embedding_layers=False: only LoRA factors are audited, and PEFT's "auto" may query the Hub about
    # the base model's config.
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    config = peft_config.get(name) or next(iter(peft_config.values()))
    return dict(state), _plain(config.to_dict())


def _peft_config_dict(model: Any) -> dict[str, Any] | None:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config:
        return None
    name = getattr(model, "active_adapter", None)
    if not isinstance(name, str) or name not in peft_config:
        name = next(iter(peft_config))
    return _plain(peft_config[name].to_dict())


def audit_model_adapter(model: Any, include_layers: bool = False) -> dict[str, Any] | None:
    """Audit the in-memory LoRA adapter of ``model`` (no files): the ``lora_audit`` metrics payload.

    Returns None when the model has no PEFT adapter. Raises ``ValueError`` when the weights are sharded
    away from this process (DeepSpeed ZeRO-3 / FSDP without a full state dict).
    """
    found = _adapter_state(model)
    if found is None:
        return None
    state, config = found
    from gradience.audit import audit_state_dict

    tensors = {}
    for key, tensor in state.items():
        if "lora_" not in key:  # modules_to_save heads etc. are not part of the LoRA audit
            continue
        if tensor.numel() == 0:
            raise ValueError(f"adapter tensor {key} is empty in this process (sharded by ZeRO-3/FSDP?); "
                             "run `gradience audit` on the saved adapter instead")
        tensors[key] = tensor.detach().to("cpu").float().numpy()
    if not tensors:
        return None
    summary: dict[str, Any] = audit_state_dict(tensors, config).to_summary(include_layers=include_layers)
    return summary
