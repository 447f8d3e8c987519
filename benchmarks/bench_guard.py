"""Cost of the Guard (SPEC §16): off must cost nothing per step; on, what a step and a snapshot cost.

    python benchmarks/bench_guard.py [--runs 5] [--steps 60] [--snapshots 5] [--skip-7b]

1. **Toy run** (the tiny LoRA classifier of the toy run, ``logging_steps=1``, no eval, no train-end audit), in
   three modes interleaved so machine-load drift hits them alike: ``none`` (no callback, the baseline),
   ``guard off`` (GradienceCallback with the default config) and ``guard on`` (``guard=True``, defaults:
   snapshot every 10 steps). Median [min-max] ``trainer.train()`` seconds and the overhead versus the baseline.
2. **Hook cost, measured directly** (load-robust): the three per-step hooks the guard uses
   (``on_step_begin`` / ``on_pre_optimizer_step`` / ``on_step_end``) called in a tight loop with the guard off
   (they must be attribute checks only: no tensor work) and on (the grad-norm + one host sync over the toy's
   trainable gradients).
3. **7B-shaped r16 LoRA state** (synthetic: 224 pairs, Llama-2-7B q/k/v/o 4096x4096 and gate/up/down
   4096<->11008 at r=16, fp32 = 40.0 M params, 153 MiB; plus AdamW's exp_avg/exp_avg_sq after one real step,
   2x that): one snapshot into fresh CPU buffers, into reused ring buffers (steady state), a restore, and the
   per-step checks (grad norm over 224x2 gradients); amortized per step at the default snapshot interval.
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


def toy_runs(runs: int, steps: int) -> dict[str, list[float]]:
    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from toy_trainer import make_toy_run

    toy_run, _ = make_toy_run(steps)

    def one_run(mode: str, out: str) -> float:
        callbacks: list[Any] = []
        if mode != "none":
            callbacks.append(GradienceCallback(GradienceCallbackConfig(
                model_name="tiny", audit_on_train_end=False, guard=(mode == "guard on"))))
        return toy_run(callbacks, out)

    modes = ("none", "guard off", "guard on")
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        one_run("none", tmp + "/warmup")
        for i in range(runs):
            for mode in modes:
                times[mode].append(one_run(mode, f"{tmp}/{i}-{mode.replace(' ', '_')}"))
    return times


def hook_costs(n: int = 20000) -> dict[str, float]:
    """Microseconds per optimizer step spent in the guard's three hooks, guard off and on (toy model)."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import TrainerControl

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from gradience.toy.model import build_tiny_classifier

    model = get_peft_model(build_tiny_classifier(200, 2, seed=0),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                      target_modules=["q_lin", "k_lin", "v_lin", "out_lin"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    control = TrainerControl()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, guard in (("off", False), ("on", True)):
            cb = GradienceCallback(GradienceCallbackConfig(output_dir=tmp, filename=f"{label}.jsonl",
                                                           audit_on_train_end=False, guard=guard))
            trainer = SimpleNamespace(_tr_loss=torch.tensor(0.0), accelerator=None, args=None, optimizer=opt,
                                      lr_scheduler=None)
            cb.attach(trainer)
            state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=0, num_train_epochs=0)
            from transformers import TrainingArguments

            args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=True)
            cb.on_train_begin(args, state, control, model=model, optimizer=opt, lr_scheduler=None)
            reps = n if not guard else n // 10
            start = time.perf_counter()
            for step in range(reps):
                state.global_step = step
                cb.on_step_begin(args, state, control)
                if guard:  # the Trainer's loss accumulator moves (only the guard reads it)
                    trainer._tr_loss += 0.5
                cb.on_pre_optimizer_step(args, state, control)
                state.global_step = step + 1
                cb.on_step_end(args, state, control)
            out[label] = 1e6 * (time.perf_counter() - start) / reps
            cb.end_run("ok")
    out["trainable_params"] = float(sum(p.numel() for p in params))
    return out


def llama7b_state(snapshots: int) -> dict[str, float]:
    import torch

    from gradience.integrations.guard import TrainableState, step_signals

    torch.manual_seed(0)
    hidden, inter, r, layers = 4096, 11008, 16, 32
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]  # (out, in): q k v o gate up down
    params = []
    for _ in range(layers):
        for d_out, d_in in shapes:
            params.append(torch.nn.Parameter(torch.randn(r, d_in) * 0.01))   # lora_A
            params.append(torch.nn.Parameter(torch.zeros(d_out, r)))         # lora_B
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # real Adam state: step, exp_avg, exp_avg_sq per parameter
    numel = sum(p.numel() for p in params)
    ts = TrainableState(opt)
    state_bytes = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values()
                      if isinstance(t, torch.Tensor))
    param_bytes = numel * 4

    def timed(fn: Any, reps: int) -> list[float]:
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    fresh = timed(ts.capture, max(2, snapshots // 2))
    snap = ts.capture()
    reused = timed(lambda: ts.capture(snap), snapshots)
    restore = timed(lambda: ts.restore(snap), snapshots)
    signals = timed(lambda: step_signals(params, torch.tensor(0.5)), snapshots * 4)
    return {"pairs": len(params) / 2, "params": float(numel), "param_mib": param_bytes / 2**20,
            "state_mib": state_bytes / 2**20, "fresh_s": statistics.median(fresh),
            "reused_s": statistics.median(reused), "reused_min_s": min(reused),
            "restore_s": statistics.median(restore), "signals_s": statistics.median(signals)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    opts = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from gradience.policy import thresholds as T

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    load0 = os.getloadavg()[0]
    if not opts.skip_toy:
        times = toy_runs(opts.runs, opts.steps)
        base = statistics.median(times["none"])
        print(f"Guard overhead on the toy run: {opts.steps} steps, a log every step, {opts.runs} runs per mode")
        print(f"{'mode':<10} {'median s':>9} {'[min-max]':>17} {'vs none':>8} {'ms/step':>8}")
        for mode, xs in times.items():
            med = statistics.median(xs)
            print(f"{mode:<10} {med:9.3f} [{min(xs):6.3f}-{max(xs):6.3f}] {100 * (med - base) / base:7.1f}% "
                  f"{1000 * (med - base) / opts.steps:8.2f}")
        print(f"guard on vs guard off: {statistics.median(times['guard on']) / statistics.median(times['guard off']):.3f}x "
              f"(median), {min(times['guard on']) / min(times['guard off']):.3f}x (min)")
        step_ms = 1000 * min(times["none"]) / opts.steps
        print(f"fastest baseline step {step_ms:.1f} ms")
    hooks = hook_costs()
    print(f"hooks per step, measured directly: guard off {hooks['off']:.2f} us, guard on {hooks['on']:.1f} us "
          f"({hooks['trainable_params']:.0f} trainable params of the toy model; snapshots included at every "
          f"{T.GUARD_SNAPSHOT_EVERY} steps)")
    if not opts.skip_7b:
        s = llama7b_state(opts.snapshots)
        every = T.GUARD_SNAPSHOT_EVERY
        total_mib = s["param_mib"] + s["state_mib"]
        print(f"7B-shaped r16 LoRA state: {s['pairs']:.0f} pairs, {s['params'] / 1e6:.1f} M params "
              f"({s['param_mib']:.0f} MiB) + AdamW state {s['state_mib']:.0f} MiB = {total_mib:.0f} MiB per snapshot "
              f"(ring of {T.GUARD_RING}: {T.GUARD_RING * total_mib / 1024:.2f} GiB CPU RAM)")
        print(f"  snapshot into fresh buffers {s['fresh_s'] * 1000:.0f} ms; into reused ring buffers "
              f"{s['reused_s'] * 1000:.0f} ms median ({total_mib / 1024 / s['reused_s']:.2f} GiB/s), "
              f"min {s['reused_min_s'] * 1000:.0f} ms; restore {s['restore_s'] * 1000:.0f} ms")
        print(f"  per-step checks (grad norm over {2 * s['pairs']:.0f} gradients + one sync) "
              f"{s['signals_s'] * 1000:.1f} ms; snapshot amortized at every {every} steps "
              f"{s['reused_s'] * 1000 / every:.1f} ms/step")
    print(f"load avg {load0:.2f} -> {os.getloadavg()[0]:.2f} (2-core machine: trust min columns when high)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
