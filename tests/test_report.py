"""``gradience report``: what the page shows, that it is escaped, deterministic, self-contained and small.

Inputs are real: synthetic PEFT-layout safetensors adapters (tests/support/synthetic.py) with a base
checkpoint written the same way, telemetry written by ``TelemetryWriter``, real PEFT adapters from the session
fixtures. Numbers on the page are checked against an independent computation (numpy SVD of the dense update).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from support import synthetic

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

HIDDEN, INTER = 64, 128   # small dims; the page's size and layout depend on layers and r, not on d


# -- input builders (shared with test_report_browser.py) ---------------------------------------------------
def write_base(out: Path, layers: int, targets: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """A base checkpoint (config.json + model.safetensors) holding the weights the adapter's modules name."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for leaf, (d_out, d_in) in targets.items():
            block = "mlp" if leaf in synthetic.MLP_LEAVES else "self_attn"
            tensors[f"model.layers.{i}.{block}.{leaf}.weight"] = (
                rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    synthetic.write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return out


def make_seven_b_shaped(root: Path) -> dict[str, Path]:
    """Llama-7B layout (32 blocks x q/k/v/o/gate/up/down = 224 pairs, r=16) with small dims, and its base."""
    targets = synthetic.llama_targets(HIDDEN, INTER)
    adapter = synthetic.write_synthetic_adapter(root / "adapter7b", layers=32, targets=targets, r=16, alpha=32,
                                                seed=3, exponent_range=(0.2, 3.0))
    base = write_base(root / "base7b", 32, targets)
    return {"adapter": adapter, "base": base}


def write_run(path: Path, *, steps: int, nan_steps: tuple[int, ...] = (), spike_steps: tuple[int, ...] = (),
              explode_steps: tuple[int, ...] = (), overfit: bool = False, eval_every: int = 100,
              names: dict[str, str] | None = None) -> Path:
    """A telemetry log as the callback writes it: run_start, train_steps, train/test evals, audit, run_end."""
    from gradience.telemetry import TelemetryWriter
    from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig

    names = names or {}
    rng = np.random.default_rng(0)
    config = ConfigSnapshot(model_name=names.get("model", "tiny-llama"), dataset_name=names.get("dataset", "toy"),
                            task_profile="easy_classification",
                            optimizer=OptimizerConfig(name="adamw_torch", lr=2e-4, weight_decay=0.0),
                            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    with TelemetryWriter(path, run_id="run-0001", append=False) as w:
        w.run_start(config)
        for step in range(1, steps + 1):
            loss = 0.4 + 2.0 * math.exp(-step / (steps / 5)) + 0.03 * float(rng.standard_normal())
            if step in spike_steps:
                loss *= 8.0
            if step in nan_steps:
                loss = math.nan
            grad = 1.0 + 0.1 * float(rng.standard_normal())
            if step in explode_steps:
                grad = 80.0
            warm = max(1, steps // 10)
            lr = 2e-4 * min(1.0, step / warm) * (1.0 - 0.9 * max(0, step - warm) / steps)
            w.train_step(step, loss=loss, lr=lr, grad_norm=grad, epoch=step / steps)
            if step % eval_every == 0:
                base_loss = 0.45 + 2.0 * math.exp(-step / (steps / 5))
                test = base_loss * 1.1 + (0.6 * max(0.0, step / steps - 0.6) if overfit else 0.0)
                w.eval(step, "train", {"loss": base_loss, "accuracy": min(0.99, 0.5 + step / steps / 2), "n": 200})
                w.eval(step, "test", {"loss": test, "accuracy": min(0.95, 0.5 + step / steps / 2.5), "n": 500})
        w.metrics("lora_audit", {"stable_rank_mean": 1.8, "utilization_mean": 0.11, "energy_rank_90_p50": 3,
                                 "energy_rank_90_p90": 6, "suggested_r_global_median": 4,
                                 "suggested_r_global_90": 8, "total_lora_params": 1_000_000,
                                 "adapter": {"r": 16}}, step=steps)
        w.alert("warning", "loss_spike", names.get("alert", "loss spiked"), {"step": 10}, step=10)
        w.run_end("ok", step=steps)
    return path


def make_nan_spike_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_run(root / "run.jsonl", steps=3000, nan_steps=(700, 701, 1900), spike_steps=(1200, 2500),
                     explode_steps=(1500,), overfit=True)


@pytest.fixture(scope="session")
def seven_b_shaped(fixture_root: Path) -> dict[str, Path]:
    return make_seven_b_shaped(fixture_root / "report_7b")


@pytest.fixture(scope="session")
def nan_spike_run(fixture_root: Path) -> Path:
    return make_nan_spike_run(fixture_root / "report_nan_run")
