#!/usr/bin/env python
"""Minimal Hugging Face Trainer + LoRA run with ``GradienceCallback`` (offline, CPU, seconds).

    python examples/trainer_callback.py --out runs/callback_example
    gradience monitor runs/callback_example/run.jsonl

Uses the toy's locally built tiny model and shipped data so it runs anywhere; with your own model and
dataset only the ``GradienceCallback(...)`` lines matter.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig, TaskType, get_peft_model
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
from gradience.toy.dataset import load_builtin
from gradience.toy.model import build_tiny_classifier, build_word_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/callback_example")
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args()

    data = load_builtin()
    tokenizer = build_word_tokenizer(data.train_texts)
    model = get_peft_model(build_tiny_classifier(len(tokenizer), 2, seed=0),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                      target_modules=["q_lin", "k_lin", "v_lin", "out_lin"]))

    def encode(texts: list[str], labels: list[int]) -> list[dict]:
        enc = tokenizer(texts, truncation=True, max_length=32)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]

    train, test = encode(data.train_texts, data.train_labels), encode(data.test_texts, data.test_labels)

    # The integration: one callback; the train-eval subset gives `gradience monitor` its train/test gap.
    callback = GradienceCallback(GradienceCallbackConfig(
        output_dir=args.out, model_name="tiny-distilbert (random init)", dataset_name=data.name,
        task_profile="easy_classification", train_eval_dataset=train, train_eval_samples=128))

    training_args = TrainingArguments(output_dir=args.out, max_steps=args.max_steps, learning_rate=5e-3,
                                      warmup_steps=10, per_device_train_batch_size=16, logging_steps=5, eval_strategy="steps",
                                      eval_steps=25, save_strategy="no", report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
    with callback.guard():  # a crash still ends the run log with run_end(status="error")
        trainer.train()
    print(f"telemetry written to {callback.path} (run {callback.run_id})")


if __name__ == "__main__":
    main()
