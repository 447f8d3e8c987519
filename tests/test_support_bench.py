"""The benchmark tooling works: adapters have SPEC §11's sizes, regeneration is recipe-driven, the bench runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support.synthetic import read_safetensors_header

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import make_adapters  # noqa: E402


def expected_data_bytes(name: str) -> int:
    _, layers, targets, r, dtype = make_adapters.ADAPTERS[name]
    itemsize = {"F32": 4, "BF16": 2}[dtype]
    return layers * sum(r * (d_out + d_in) for d_out, d_in in targets.values()) * itemsize


@pytest.mark.parametrize(("name", "mib"), [("tiny_r8", 0.6), ("llama7b_r16_f32", 153), ("llama7b_r64_f32", 610),
                                           ("llama70b_r16_f32", 790), ("llama7b_r16_bf16", 76.3)])
def test_recipes_have_spec_sizes(name, mib):
    """File sizes of SPEC §11's table follow from the recipes (computed, not generated: 70B is 790 MiB)."""
    assert expected_data_bytes(name) / 2**20 == pytest.approx(mib, rel=0.01, abs=0.05)


def test_llama_shapes():
    _, layers, targets, _, _ = make_adapters.ADAPTERS["llama70b_r16_f32"]
    assert layers == 80 and targets["k_proj"] == (1024, 8192) and targets["down_proj"] == (8192, 28672)
    _, layers, targets, _, _ = make_adapters.ADAPTERS["llama7b_r64_f32"]
    assert layers == 32 and len(targets) == 7 and targets["gate_proj"] == (11008, 4096)


def test_ensure_adapter_generates_once_and_follows_recipe(tmp_path):
    out, generated = make_adapters.ensure_adapter("tiny_r8", tmp_path)
    assert generated
    weights = out / "adapter_model.safetensors"
    header = read_safetensors_header(weights)
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    assert weights.stat().st_size == 8 + header_len + expected_data_bytes("tiny_r8")
    assert len([k for k in header if k != "__metadata__"]) == 2 * make_adapters.pair_count("tiny_r8")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "gpt2"
    assert make_adapters.ensure_adapter("tiny_r8", tmp_path) == (out, False)
    recipe = json.loads((out / make_adapters.RECIPE_FILE).read_text())
    recipe["r"] = 4
    (out / make_adapters.RECIPE_FILE).write_text(json.dumps(recipe))
    assert make_adapters.ensure_adapter("tiny_r8", tmp_path) == (out, True)


def test_bf16_recipe_writes_bf16(tmp_path):
    """A bf16 benchmark adapter really holds BF16 tensors (checked on a cut-down recipe of the same kind)."""
    from support.synthetic import write_synthetic_adapter

    _, _, targets, r, dtype = make_adapters.ADAPTERS["llama7b_r16_bf16"]
    small = {k: (d_out // 64, d_in // 64) for k, (d_out, d_in) in targets.items()}
    out = write_synthetic_adapter(tmp_path / "a", layers=1, targets=small, r=r, alpha=2 * r, dtype=dtype)
    header = read_safetensors_header(out / "adapter_model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert np.prod(header["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]["shape"]) == 172 * r


@pytest.mark.slow
def test_bench_audit_runs_end_to_end(tmp_path):
    """One real run of the audit benchmark on the tiny adapter: figures present, no torch in the command."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_audit.py"), "--only", "tiny_r8", "--runs", "1",
                           "--data-dir", str(tmp_path / "data"), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    row = results["adapters"]["tiny_r8"]
    assert "error" not in row["process"], row["process"]
    assert "error" not in row["in_process"], row["in_process"]
    assert row["process"]["wall_s"] > 0 and row["process"]["peak_rss_mib"] > 10
    assert row["in_process"]["audit_s"] > 0 and row["in_process"]["read_s"] > 0
    assert results["import"]["n_modules"] > 50 and results["import"]["numpy_s"] is not None
    assert results["import"]["heavy_imported"] == []
    assert "whole process" in proc.stdout and "tiny_r8" in proc.stdout
