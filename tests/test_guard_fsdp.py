"""The Guard under FSDP (torchrun, 2 processes, gloo, CPU, the tiny PEFT classifier): each rank snapshots and
restores its own shards, the decision is all-reduced, and an injected NaN on one rank is rolled back by both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.ddp import run_torchrun

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support" / "guard_fsdp.py"


@pytest.mark.slow
def test_fsdp_ranks_roll_back_their_shards_together(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_torchrun(SCRIPT, ["--out", str(out), "--max-steps", "10", "--nan-step", "5"], tmp_path, timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Really sharded: each rank's optimizer holds a different part of the LoRA parameters, together all of them.
    assert all(r["fsdp"] == "FullyShardedDataParallel" and r["sharded"] for r in ranks)
    assert 0 < ranks[0]["local_trained_numel"] < ranks[0]["total_trained_numel"]
    assert ranks[0]["local_trained_numel"] + ranks[1]["local_trained_numel"] == ranks[0]["total_trained_numel"]
    assert ranks[0]["shard"]["1"] != ranks[1]["shard"]["1"]
    # The NaN came from rank 0 only; both ranks rolled back at the same step to the same snapshot.
    for r in ranks:
        assert [(e["action"], e["step"], e["restored_step"]) for e in r["events"]] == [("rollback", 5, 4)]
    assert ranks[0]["events"][0]["new_lr"] == ranks[1]["events"][0]["new_lr"]
    # The full (gathered) LoRA parameters agree bit for bit on both ranks at every step ...
    assert ranks[0]["full"] == ranks[1]["full"] and len(ranks[0]["full"]) == 10
    # ... the rejected step left every shard as the snapshot of step 4 had it, and training went on, finite.
    for r in ranks:
        assert r["shard"]["5"] == r["shard"]["4"] and r["full"]["5"] == r["full"]["4"]
        assert r["shard"]["6"] != r["shard"]["5"] and r["finite"]
    # The guard's grad norm over shards is FSDP's own total norm (not the DDP mean of per-rank norms).
    for r in ranks:
        assert r["norms"]["guard"] == pytest.approx(r["norms"]["fsdp"], rel=1e-5)


def _callback_on(trainer: object) -> object:
    from types import SimpleNamespace

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig

    cb = GradienceCallback(GradienceCallbackConfig(guard=True, audit_on_train_end=False))
    cb.trainer = trainer
    cb._guard_begin(SimpleNamespace(), SimpleNamespace(global_step=0), {})
    return cb


def test_deepspeed_stays_refused_fsdp_is_guarded() -> None:
    import warnings
    from types import SimpleNamespace

    import torch

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    base = {"optimizer": opt, "lr_scheduler": None, "_tr_loss": torch.zeros(()), "accelerator": None,
            "args": SimpleNamespace(logging_nan_inf_filter=False)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = _callback_on(SimpleNamespace(is_deepspeed_enabled=True, **base))
    assert cb.rollback_guard is None  # type: ignore[attr-defined]
    msgs = [str(w.message) for w in caught if "guard disabled" in str(w.message)]
    assert len(msgs) == 1 and "DeepSpeed" in msgs[0] and "\n" not in msgs[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = _callback_on(SimpleNamespace(is_fsdp_enabled=True, **base))
    runtime = cb.rollback_guard  # type: ignore[attr-defined]
    assert runtime is not None and runtime.sharded and runtime.describe()["sharded"] is True
    assert not [w for w in caught if "guard disabled" in str(w.message)]
