"""One timed toy Trainer run (tiny DistilBERT + LoRA on the shipped data), shared by the callback benchmarks.

``make_toy_run(steps)`` builds the data once and returns ``one_run(callbacks, out) -> seconds`` so each
benchmark only says which callbacks it compares (none, the callback, the callback with the Guard, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def make_toy_run(steps: int) -> tuple[Callable[[Sequence[Any], str], float], str]:
    """(one_run, dataset name): one_run trains a fresh LoRA for ``steps`` steps with the given callbacks."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from gradience.toy.dataset import load_builtin
    from gradience.toy.model import build_tiny_classifier, build_word_tokenizer

    transformers.logging.set_verbosity_error()
    data = load_builtin()
    tokenizer = build_word_tokenizer(data.train_texts)
    enc = tokenizer(data.train_texts, truncation=True, max_length=32)
    train = [{"input_ids": i, "attention_mask": m, "labels": y}
             for i, m, y in zip(enc["input_ids"], enc["attention_mask"], data.train_labels, strict=True)]

    def one_run(callbacks: Sequence[Any], out: str) -> float:
        model = get_peft_model(build_tiny_classifier(len(tokenizer), 2, seed=0),
                               LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                          target_modules=["q_lin", "k_lin", "v_lin", "out_lin"]))
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=5e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                                 report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks))
        trainer.remove_callback(transformers.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    return one_run, data.name
