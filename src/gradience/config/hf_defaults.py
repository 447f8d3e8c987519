"""Well-known defaults of Hugging Face ``TrainingArguments`` and the field names of PEFT's ``LoraConfig``.

Why a static table: ``monitor`` must stay torch/transformers-free, yet a run log written by an older callback
carries the whole ``TrainingArguments.to_dict()`` (~110 keys) in ``config.training.extras``. Keys whose value
equals the default below say nothing about the run, so ``monitor --json`` leaves them out (``--verbose`` keeps
the full set). New callbacks drop default-valued keys themselves, against the live ``TrainingArguments`` class.
The same names let ``check`` tell a misspelt key (``learnin_rate``) from a legitimate HF / PEFT one.

Values are those of transformers 5.23 (``TrainingArguments(output_dir=...).to_dict()``); keys whose default
depends on the run (``output_dir``, ``hub_token``, ``logging_dir``) are not listed. A test compares the table
with the installed transformers when it is importable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    'per_device_train_batch_size': 8,
    'num_train_epochs': 3.0,
    'max_steps': -1,
    'learning_rate': 5e-05,
    'lr_scheduler_type': 'linear',
    'lr_scheduler_kwargs': None,
    'warmup_steps': 0,
    'optim': 'adamw_torch_fused',
    'optim_args': None,
    'weight_decay': 0.0,
    'adam_beta1': 0.9,
    'adam_beta2': 0.999,
    'adam_epsilon': 1e-08,
    'optim_target_modules': None,
    'gradient_accumulation_steps': 1,
    'average_tokens_across_devices': True,
    'max_grad_norm': 1.0,
    'label_smoothing_factor': 0.0,
    'bf16': False,
    'fp16': False,
    'bf16_full_eval': False,
    'fp16_full_eval': False,
    'tf32': None,
    'activation_checkpointing': False,
    'activation_checkpointing_kwargs': None,
    'gradient_checkpointing': False,
    'gradient_checkpointing_kwargs': None,
    'torch_compile': False,
    'torch_compile_backend': None,
    'torch_compile_mode': None,
    'use_liger_kernel': False,
    'liger_kernel_config': None,
    'use_cache': False,
    'neftune_noise_alpha': None,
    'torch_empty_cache_steps': None,
    'auto_find_batch_size': False,
    'logging_strategy': 'steps',
    'logging_steps': 500,
    'logging_first_step': False,
    'log_on_each_node': True,
    'logging_nan_inf_filter': True,
    'include_num_input_tokens_seen': 'no',
    'log_level': 'passive',
    'log_level_replica': 'warning',
    'disable_tqdm': False,
    'report_to': [],
    'run_name': None,
    'project': 'huggingface',
    'trackio_space_id': None,
    'trackio_bucket_id': None,
    'trackio_static_space_id': None,
    'eval_strategy': 'no',
    'eval_steps': None,
    'eval_delay': 0,
    'per_device_eval_batch_size': 8,
    'prediction_loss_only': False,
    'eval_on_start': False,
    'eval_do_concat_batches': True,
    'eval_use_gather_object': False,
    'eval_accumulation_steps': None,
    'include_for_metrics': [],
    'batch_eval_metrics': False,
    'save_only_model': False,
    'save_strategy': 'steps',
    'save_steps': 500,
    'save_on_each_node': False,
    'save_total_limit': None,
    'enable_jit_checkpoint': False,
    'push_to_hub': False,
    'hub_private_repo': None,
    'hub_model_id': None,
    'hub_strategy': 'every_save',
    'hub_always_push': False,
    'hub_revision': None,
    'load_best_model_at_end': False,
    'metric_for_best_model': None,
    'greater_is_better': None,
    'ignore_data_skip': False,
    'restore_callback_states_from_checkpoint': False,
    'full_determinism': False,
    'seed': 42,
    'data_seed': None,
    'use_cpu': False,
    'accelerator_config': {'split_batches': False, 'dispatch_batches': None, 'even_batches': True, 'use_seedable_sampler': True, 'non_blocking': False, 'gradient_accumulation_kwargs': None},
    'parallelism_config': None,
    'dataloader_drop_last': False,
    'dataloader_num_workers': 0,
    'dataloader_pin_memory': True,
    'dataloader_persistent_workers': False,
    'dataloader_prefetch_factor': None,
    'dataloader_multiprocessing_context': None,
    'dataloader_in_order': True,
    'remove_unused_columns': True,
    'label_names': None,
    'train_sampling_strategy': 'random',
    'length_column_name': 'length',
    'ddp_find_unused_parameters': None,
    'ddp_bucket_cap_mb': None,
    'ddp_broadcast_buffers': None,
    'ddp_static_graph': None,
    'ddp_backend': None,
    'ddp_timeout': 1800,
    'fsdp': None,
    'fsdp_config': None,
    'deepspeed': None,
    'debug': [],
    'skip_memory_metrics': True,
    'do_train': False,
    'do_eval': False,
    'do_predict': False,
    'resume_from_checkpoint': None,
    'local_rank': -1,
}

# Keys of older transformers (4.x) TrainingArguments dumps, with their defaults there.
LEGACY_TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    "overwrite_output_dir": False,
    "evaluation_strategy": "no",
    "no_cuda": False,
    "use_mps_device": False,
    "fp16_opt_level": "O1",
    "half_precision_backend": "auto",
    "tpu_num_cores": None,
    "tpu_metrics_debug": False,
    "past_index": -1,
    "jit_mode_eval": False,
    "use_ipex": False,
    "save_safetensors": True,
    "push_to_hub_model_id": None,
    "push_to_hub_organization": None,
    "mp_parameters": "",
    "ray_scope": "last",
    "dispatch_batches": None,
    "split_batches": None,
    "include_tokens_per_second": False,
    "torchdynamo": None,
    "logging_dir": None,
    "warmup_ratio": 0.0,
}

# Run-specific TrainingArguments keys that are never defaults and never typos.
TRAINING_ARGS_RUN_KEYS = frozenset({"output_dir", "hub_token", "logging_dir"})

PEFT_LORA_KEYS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
})

# Every key name a HF / PEFT dump may legitimately hold (``check`` does not call these misspellings).
KNOWN_FOREIGN_KEYS = frozenset(TRAINING_ARGS_DEFAULTS) | frozenset(LEGACY_TRAINING_ARGS_DEFAULTS) \
    | TRAINING_ARGS_RUN_KEYS | PEFT_LORA_KEYS


def _same(a: Any, b: Any) -> bool:
    """Equality as JSON would see it (1 == 1.0, tuples as lists), without bool/int confusion."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # exotic values compare unequal
        return False


def drop_defaults(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the keys whose value equals the default in ``defaults`` (unknown keys are kept)."""
    return {k: v for k, v in values.items() if not (k in defaults and _same(v, defaults[k]))}


def drop_training_args_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a TrainingArguments dump or a snapshot's ``training.extras``) without well-known defaults."""
    return drop_defaults(drop_defaults(values, TRAINING_ARGS_DEFAULTS), LEGACY_TRAINING_ARGS_DEFAULTS)
