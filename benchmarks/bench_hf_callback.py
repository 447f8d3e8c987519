"""Overhead of GradienceCallback on a tiny Hugging Face Trainer run (SPEC §8: "negligible overhead").

    python benchmarks/bench_hf_callback.py [--runs 5] [--steps 60]

Trains the toy's tiny LoRA classifier in this process with ``logging_steps=1`` (a telemetry record every
step: the worst case) and no evaluation, in three modes, interleaved so machine-load drift hits them alike:

- ``none``: no callback (baseline);
- ``callback``: GradienceCallback without the train-end audit (the per-step cost);
- ``callback+audit``: the default, adding the one in-memory LoRA audit at train end.

Prints the median [min-max] ``trainer.train()`` seconds per mode, the overhead versus the baseline (in % and
ms per step) and the 1-minute load average (on a 2-core machine, trust the min column when it is high).
The train-eval subset is not measured here: it is extra evaluation the user asks for, costing what an
evaluation of that many samples costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    opts = ap.parse_args()

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from toy_trainer import make_toy_run

    warnings.simplefilter("ignore")
    toy_run, dataset_name = make_toy_run(opts.steps)

    def one_run(mode: str, out: str) -> float:
        callbacks: list[Any] = []
        if mode != "none":
            callbacks.append(GradienceCallback(GradienceCallbackConfig(
                model_name="tiny", dataset_name=dataset_name, audit_on_train_end=(mode == "callback+audit"))))
        return toy_run(callbacks, out)

    modes = ("none", "callback", "callback+audit")
    times: dict[str, list[float]] = {m: [] for m in modes}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one_run("none", tmp + "/warmup")
        for i in range(opts.runs):
            for mode in modes:
                times[mode].append(one_run(mode, f"{tmp}/{mode}-{i}"))
        hook_us, audit_ms = _hook_costs(tmp, GradienceCallback, GradienceCallbackConfig)
    base = statistics.median(times["none"])
    base_min = min(times["none"])
    print(f"GradienceCallback overhead: tiny LoRA classifier, {opts.steps} steps, a log every step, "
          f"{opts.runs} runs per mode (load avg {load_start:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"{'mode':<16} {'median s':>9} {'[min-max]':>16} {'overhead':>9} {'ms/step':>8} {'min-vs-min':>10}")
    for mode in modes:
        med = statistics.median(times[mode])
        over = med - base
        print(f"{mode:<16} {med:9.3f} [{min(times[mode]):6.3f}-{max(times[mode]):6.3f}] "
              f"{100 * over / base:8.1f}% {1000 * over / opts.steps:8.2f} "
              f"{100 * (min(times[mode]) - base_min) / base_min:9.1f}%")
    step_ms = 1000 * min(times["none"]) / opts.steps
    print(f"direct cost: on_log -> train_step record {hook_us:.1f} us/step "
          f"({100 * hook_us / 1000 / step_ms:.3f}% of the fastest baseline step, {step_ms:.1f} ms); "
          f"train-end audit {audit_ms:.1f} ms once")
    return 0


def _hook_costs(tmp: str, callback_cls: Any, config_cls: Any) -> tuple[float, float]:
    """Load-robust figures: the callback's own time per logged step, and the train-end audit, measured
    directly (many calls) rather than as the difference of two noisy training runs."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from gradience.integrations.hf import audit_model_adapter

    cb = callback_cls(config_cls(output_dir=tmp, filename="hooks.jsonl", audit_on_train_end=False))
    args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=True)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    cb.on_train_begin(args, state, None, model=None)
    logs = {"loss": 0.6931, "grad_norm": 1.25, "learning_rate": 5e-3, "epoch": 0.5}
    n = 20000
    start = time.perf_counter()
    for step in range(n):
        state.global_step = step
        cb.on_log(args, state, None, logs=logs)
    hook_us = 1e6 * (time.perf_counter() - start) / n
    cb.end_run("ok")

    return hook_us, _audit_ms(audit_model_adapter)


def _audit_ms(audit_model_adapter: Any) -> float:
    from peft import LoraConfig, TaskType, get_peft_model

    from gradience.toy.model import build_tiny_classifier

    model = get_peft_model(build_tiny_classifier(200, 2, seed=0),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_lin", "k_lin", "v_lin", "out_lin"]))
    audit_model_adapter(model)
    runs = []
    for _ in range(20):
        start = time.perf_counter()
        audit_model_adapter(model)
        runs.append(time.perf_counter() - start)
    return 1000 * statistics.median(runs)


if __name__ == "__main__":
    sys.exit(main())
