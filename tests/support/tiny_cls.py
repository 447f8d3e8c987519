"""The tiny LoRA sequence classifier and its first 256 tokenized examples, as the DDP test scripts train it
(one copy, so the callback and Guard runs under torchrun train the same model)."""

from __future__ import annotations

from typing import Any


def tiny_lora_classifier(n_train: int = 256) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """(data, tokenizer, PEFT model with r=4 on q_lin/v_lin, train examples) — all built locally, offline."""
    from peft import LoraConfig, TaskType, get_peft_model

    from gradience.toy.dataset import load_builtin
    from gradience.toy.model import build_tiny_classifier, build_word_tokenizer

    data = load_builtin()
    tokenizer = build_word_tokenizer(data.train_texts)
    model = get_peft_model(build_tiny_classifier(len(tokenizer), 2, seed=0),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                      target_modules=["q_lin", "v_lin"]))
    enc = tokenizer(data.train_texts[:n_train], truncation=True, max_length=32)
    train = [{"input_ids": i, "attention_mask": m, "labels": y}
             for i, m, y in zip(enc["input_ids"], enc["attention_mask"], data.train_labels[:n_train], strict=True)]
    return data, tokenizer, model, train
