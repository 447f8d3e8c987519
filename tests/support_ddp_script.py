"""A tiny Trainer + LoRA run with GradienceCallback, for `torchrun --nproc_per_node 2` (gloo, CPU).

Used by tests/test_integration_ddp.py (one run file, one run, whatever the world size) and by
benchmarks/bench_hf_callback_overhead.py (``--no-callback`` for the baseline). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--no-callback", action="store_true")
    parser.add_argument("--timing-file", default=None, help="append {'callback', 'train_s'} as JSON here")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from support.tiny_cls import tiny_lora_classifier

    transformers.logging.set_verbosity_error()
    data, tokenizer, model, train = tiny_lora_classifier()
    test = train[:64]
    callbacks = [] if args.no_callback else [GradienceCallback(GradienceCallbackConfig(
        dataset_name=data.name, model_name="tiny-distilbert", task_profile="easy_classification",
        train_eval_samples=32))]
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=2, eval_strategy="steps", eval_steps=6, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if args.timing_file and trainer.is_world_process_zero():
        with open(args.timing_file, "a") as fh:
            fh.write(json.dumps({"callback": not args.no_callback, "train_s": seconds}) + "\n")


if __name__ == "__main__":
    main()
