"""Training one bench arm: a real ``Trainer`` run with the Gradience callback, the adapter saved atomically.

The same function runs in-process (the default) and inside every process of ``accelerate launch`` (the
``--launcher accelerate`` path, via ``python -m gradience.bench.worker SPEC.json``): DDP is the Trainer's own,
and only the main process writes the adapter and the run log.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.bench.config import BenchConfig
from gradience.bench.tasks import PreparedTask, load_base_model
from gradience.errors import InputError


@dataclass
class LoraSpec:
    """The LoRA an arm trains with: PEFT's LoraConfig fields that the bench varies."""

    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | None = None
    dropout: float = 0.0
    use_rslora: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def scaled_alpha(alpha: float, r_from: int, r_to: int, use_rslora: bool) -> float:
    """The alpha that keeps a module's scale s when its rank changes (α/r, or α/√r with rsLoRA)."""
    value = alpha * (math.sqrt(r_to / r_from) if use_rslora else r_to / r_from)
    return float(round(value)) if math.isclose(value, round(value), rel_tol=1e-12, abs_tol=1e-12) else value


def _peft_alpha(alpha: float) -> Any:
    return int(alpha) if float(alpha).is_integer() else alpha


def _accuracy(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.asarray(logits).argmax(axis=-1)
    return {"accuracy": float((predictions == np.asarray(labels)).mean())}


def train_arm(task: PreparedTask, cfg: BenchConfig, seed: int, spec: LoraSpec, arm_dir: Path,
              device: str = "cpu") -> Path:
    """Train a fresh LoRA on the shared base; returns ``arm_dir/adapter`` (written by the main process)."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from gradience.toy.run import save_adapter

    transformers.logging.set_verbosity_error()
    transformers.set_seed(seed)
    model = load_base_model(task, "cpu" if device == "cpu" else device)
    task_type = TaskType.SEQ_CLS if task.kind == "classification" else TaskType.CAUSAL_LM
    lora = LoraConfig(task_type=task_type, r=spec.r, lora_alpha=_peft_alpha(spec.alpha),
                      rank_pattern=dict(spec.rank_pattern),
                      alpha_pattern={k: _peft_alpha(v) for k, v in spec.alpha_pattern.items()},
                      target_modules=spec.target_modules or task.default_targets, lora_dropout=spec.dropout,
                      use_rslora=spec.use_rslora)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"cannot apply LoRA: {exc}", path="lora.target_modules") from None

    training_dir = arm_dir / "training"
    device_kwargs: dict[str, Any] = {"use_cpu": True} if device == "cpu" else {}
    if cfg.gradient_checkpointing:  # model.gradient_checkpointing: memory for compute, same results
        # (newer transformers name it activation_checkpointing and warn on the old names)
        new = "activation_checkpointing" in getattr(TrainingArguments, "__dataclass_fields__", {})
        prefix = "activation" if new else "gradient"
        device_kwargs.update({f"{prefix}_checkpointing": True,
                              f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    if device != "cpu" and cfg.torch_dtype in ("bf16", "bfloat16", "fp16", "float16"):
        # a half-precision base trains under autocast, as the reference does (gsm8k_causal_lm.py: bf16=True);
        # PEFT keeps the LoRA factors themselves in float32
        device_kwargs["bf16" if cfg.torch_dtype.startswith("b") else "fp16"] = True
    args = TrainingArguments(
        output_dir=str(training_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), lr_scheduler_type="linear",
        logging_steps=min(cfg.logging_steps, cfg.max_steps), eval_strategy="steps",
        eval_steps=min(cfg.eval_steps, cfg.max_steps), save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, disable_tqdm=True, dataloader_num_workers=0, **device_kwargs)
    collator = (DataCollatorWithPadding(task.tokenizer) if task.kind == "classification"
                else DataCollatorForLanguageModeling(task.tokenizer, mlm=False))
    callback = GradienceCallback(GradienceCallbackConfig(
        output_dir=str(arm_dir), model_name=task.model_name, dataset_name=task.dataset_name, eval_split="test",
        train_eval_dataset=task.train_set, train_eval_samples=min(200, len(task.train_set)),
        meta={"bench": True, "seed": seed, "lora": spec.to_dict()}))
    trainer = Trainer(model=peft_model, args=args, train_dataset=task.train_set, eval_dataset=task.eval_set,
                      data_collator=collator,
                      compute_metrics=_accuracy if task.kind == "classification" else None,
                      callbacks=[callback])
    callback.attach(trainer)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    with callback.guard():
        trainer.train()
    adapter_dir = arm_dir / "adapter"
    if trainer.is_world_process_zero():
        save_adapter(peft_model, adapter_dir, save_embedding_layers=False)  # never a hub lookup
        shutil.rmtree(training_dir, ignore_errors=True)
    return adapter_dir
