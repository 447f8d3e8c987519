#!/usr/bin/env python
"""A plain PyTorch training loop (no Trainer) logging Gradience telemetry with ``TelemetryWriter``.

    python examples/plain_pytorch_loop.py --out runs/plain_loop
    gradience monitor runs/plain_loop/run.jsonl

Offline and CPU-only: the toy's locally built tiny model and shipped sentiment data stand in for yours.
The pattern to copy is the ``with TelemetryWriter(...)`` block: run_start, train_step per step, eval on the
test split and on a train subset (so monitor can compute the gap), a lora_audit, and run_end (written for
you, with status "error", if the loop raises).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model

from gradience.integrations.hf import audit_model_adapter
from gradience.telemetry import TelemetryWriter
from gradience.telemetry.types import ConfigSnapshot, OptimizerConfig, TrainingConfig
from gradience.telemetry.types import LoraConfig as LoraSnapshot
from gradience.toy.dataset import load_builtin
from gradience.toy.model import build_tiny_classifier, build_word_tokenizer


def batches(tokenizer, texts, labels, size):
    for start in range(0, len(texts), size):
        enc = tokenizer(texts[start:start + size], padding=True, truncation=True, max_length=32,
                        return_tensors="pt")
        yield enc, torch.tensor(labels[start:start + size])


@torch.no_grad()
def evaluate(model, tokenizer, texts, labels):
    model.eval()
    loss_sum, correct = 0.0, 0
    for enc, y in batches(tokenizer, texts, labels, 64):
        logits = model(**enc).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return {"loss": loss_sum / len(texts), "accuracy": correct / len(texts), "n": len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plain_loop")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_builtin()
    tokenizer = build_word_tokenizer(data.train_texts)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["q_lin", "v_lin"])
    model = get_peft_model(build_tiny_classifier(len(tokenizer), 2, seed=0), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batch_size = 16

    snapshot = ConfigSnapshot(
        model_name="tiny-distilbert (random init)", dataset_name=data.name, task_profile="easy_classification",
        optimizer=OptimizerConfig(name="adamw_torch", lr=args.lr, weight_decay=0.01, betas=[0.9, 0.999],
                                  eps=1e-8),
        lora=LoraSnapshot(r=8, alpha=16, target_modules=["q_lin", "v_lin"], dropout=0.0, bias="none"),
        training=TrainingConfig(seed=0, batch_size=batch_size, gradient_accumulation=1, max_steps=args.steps,
                                dtype="float32"))

    with TelemetryWriter(Path(args.out) / "run.jsonl") as telemetry:
        telemetry.run_start(snapshot, {"source": "examples/plain_pytorch_loop.py"})
        step = 0
        while step < args.steps:
            for enc, y in batches(tokenizer, data.train_texts, data.train_labels, batch_size):
                step += 1
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                optimizer.zero_grad()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                telemetry.train_step(step, loss=loss.item(), lr=args.lr, grad_norm=float(grad_norm),
                                     epoch=step * batch_size / len(data.train_texts))
                if step % 20 == 0 or step == args.steps:
                    telemetry.eval(step, "test", evaluate(model, tokenizer, data.test_texts, data.test_labels))
                    telemetry.eval(step, "train", evaluate(model, tokenizer, data.train_texts[:200],
                                                           data.train_labels[:200]))
                if step == args.steps:
                    break
        audit = audit_model_adapter(model)
        if audit is not None:
            telemetry.metrics("lora_audit", audit, step=step)
        telemetry.run_end("ok", step=step)
    test = evaluate(model, tokenizer, data.test_texts, data.test_labels)
    print(f"telemetry written to {telemetry.path}; test acc {100 * test['accuracy']:.1f}%, "
          f"test ppl {math.exp(test['loss']):.2f}")


if __name__ == "__main__":
    main()
