"""A guarded tiny Trainer + LoRA run for `torchrun --nproc_per_node 2` (gloo, CPU), with faults on ONE rank.

Rank 0 gets NaN activations at step ``--nan-step``; rank 1 gets a loss spike (logits x1000) at step
``--spike-step``. Each rank writes ``rank<N>.json`` with a SHA-256 of its trainable parameters at the end of
every step and the guard's actions, so tests/test_guard_ddp.py can check that no rank diverged.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--nan-step", type=int, default=5)
    parser.add_argument("--spike-step", type=int, default=10)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from support.tiny_cls import tiny_lora_classifier

    transformers.logging.set_verbosity_error()
    rank = int(os.environ.get("RANK", "0"))
    _, tokenizer, model, train = tiny_lora_classifier()

    class Fault(TrainerCallback):
        def __init__(self) -> None:
            self.kind: str | None = None
            self.hashes: dict[int, str] = {}

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            step = state.global_step + 1
            self.kind = ("nan" if rank == 0 and step == args.nan_step else
                         "spike" if rank == 1 and step == args.spike_step else None)

        def on_step_end(self, a: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            opt = getattr(optimizer, "optimizer", optimizer)
            h = hashlib.sha256()
            for g in opt.param_groups:
                for p in g["params"]:
                    h.update(p.detach().cpu().numpy().tobytes())
            self.hashes[state.global_step] = h.hexdigest()

    fault = Fault()
    cb = GradienceCallback(GradienceCallbackConfig(guard=True, guard_snapshot_every=2, audit_on_train_end=False))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[cb, fault])
    inner = trainer.model.base_model.model

    def nan_hook(mod: Any, inp: Any, out: Any) -> Any:
        return out * float("nan") if fault.kind == "nan" and mod.training else None

    def spike_hook(mod: Any, inp: Any, out: Any) -> Any:
        return out * 1000.0 if fault.kind == "spike" and mod.training else None

    inner.distilbert.embeddings.register_forward_hook(nan_hook)
    inner.classifier.register_forward_hook(spike_hook)
    trainer.train()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    events = cb.rollback_guard.events if cb.rollback_guard is not None else None
    with open(Path(args.out) / f"rank{rank}.json", "w") as fh:
        json.dump({"hashes": fault.hashes, "events": events, "final_step": trainer.state.global_step,
                   "finite": finite}, fh, default=str)


if __name__ == "__main__":
    main()
