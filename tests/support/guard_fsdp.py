"""The Guard's runtime on a real FSDP-sharded PEFT model, for `torchrun --nproc_per_node 2` (gloo, CPU).

Why not the HF Trainer: accelerate turns FSDP on only for GPU-type distributed runs (accelerate/state.py: a
CPU run stays MULTI_CPU, i.e. DDP), so the Trainer cannot run FSDP on this CPU-only machine. This loop drives
the very GuardRuntime that GradienceCallback drives (same hooks in the same order: step_begin, backward,
pre_optimizer_step, optimizer.step, step_end) around torch's FullyShardedDataParallel(use_orig_params=True),
with a trainer stand-in exposing what the runtime reads (``_tr_loss``, ``is_fsdp_enabled``, ``args``).

Rank 0 gets NaN activations at step ``--nan-step``. Each rank writes ``rank<N>.json``: per step a SHA-256 of the
FULL LoRA parameters (gathered with summon_full_params) and of its OWN shards (the optimizer's tensors), the
number of trained elements it holds, and the guard's events. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--nan-step", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import DataCollatorWithPadding

    from gradience.integrations.guard import GuardRuntime, GuardSettings, step_signals
    from support.tiny_cls import tiny_lora_classifier

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    _, tokenizer, peft_model, train = tiny_lora_classifier()
    model = FSDP(peft_model, use_orig_params=True, device_id=torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (args.max_steps + 1))
    trainer = SimpleNamespace(_tr_loss=torch.zeros(()), accelerator=None, is_fsdp_enabled=True,
                              args=SimpleNamespace(logging_nan_inf_filter=False))
    guard = GuardRuntime(GuardSettings(snapshot_every=2))
    guard.begin(trainer, optimizer, scheduler, 0)
    control = SimpleNamespace(should_training_stop=False)

    nan_now = {"on": False}
    inner = peft_model.base_model.model

    def nan_hook(mod: Any, inp: Any, out: Any) -> Any:
        return out * float("nan") if nan_now["on"] else None

    inner.distilbert.embeddings.register_forward_hook(nan_hook)
    collate = DataCollatorWithPadding(tokenizer)
    norms: dict[str, float | None] = {}
    full: dict[int, str] = {}
    shard: dict[int, str] = {}
    model.train()
    for step in range(1, args.max_steps + 1):
        nan_now["on"] = rank == 0 and step == args.nan_step
        guard.step_begin()
        lo = (step * 2 + rank) * 8 % (len(train) - 8)  # each rank its own batch, as a distributed sampler does
        batch = collate(train[lo:lo + 8])
        loss = model(**batch).loss
        loss.backward()
        trainer._tr_loss += loss.detach()
        if step == 2:  # the guard's sharded norm against FSDP's own total norm over all shards
            norms["guard"] = step_signals(params, None, sharded=True)[1]
            norms["fsdp"] = float(model.clip_grad_norm_(float("inf")))
        guard.pre_optimizer_step(step - 1, control)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        guard.step_end(step)
        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().clone().numpy().tobytes())
        shard[step] = h.hexdigest()
        g = hashlib.sha256()
        with FSDP.summon_full_params(model, writeback=False):
            for name, p in model.named_parameters():
                if p.requires_grad:
                    g.update(name.encode())
                    g.update(p.detach().clone().numpy().tobytes())
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        full[step] = g.hexdigest()
    out = {"full": full, "shard": shard, "events": guard.events, "finite": finite,
           "local_trained_numel": sum(int(p.numel()) for p in params),
           "total_trained_numel": sum(int(p.numel()) for p in peft_model.parameters() if p.requires_grad),
           "sharded": guard.sharded, "fsdp": type(model).__name__, "norms": norms}
    with FSDP.summon_full_params(model, writeback=False):
        out["total_trained_numel"] = sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"rank{rank}.json", "w") as fh:
        json.dump(out, fh, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
