"""MLX-LM adapters: adapters written in mlx-lm's documented layout (lora_a (in, r), lora_b (r, out), scale used
as is; LoRASwitchLinear (E, r, in)/(E, out, r); LoRAEmbedding; DoRA m), read by audit against the dense update
each layer's ``fuse`` adds; with mlx-lm itself where it installs (fuse() of real LoRA layers); hostile configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit.core import AuditOptions, run_audit
from gradience.errors import InputError
from gradience.io.safetensors_write import TensorSpec, write_safetensors

SCALE = 20.0


def _write(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, "F32", v.shape, lambda v=v: np.ascontiguousarray(v, np.float32)) for k, v in
             tensors.items()]
    write_safetensors(path / "adapters.safetensors", specs, {})
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _config(rank: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": "mlx-community/tiny", "fine_tune_type": "lora", "num_layers": 2,
            "lora_parameters": {"rank": rank, "scale": SCALE, "dropout": 0.0}, **extra}


def _documented(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two blocks of q_proj (32→32) and down_proj (48→32), one MoE switch layer, one embedding: and the ΔW each
    mlx-lm ``fuse`` adds (LoRALinear: (scale·lora_b.T) @ lora_a.T; switch: scale·lora_b[e] @ lora_a[e];
    embedding: scale·lora_a @ lora_b)."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    for layer in range(2):
        for name, d_in, d_out in (("self_attn.q_proj", 32, 32), ("mlp.down_proj", 48, 32)):
            key = f"model.layers.{layer}.{name}"
            a, b = rng.standard_normal((d_in, 4)), rng.standard_normal((4, d_out)) * 0.01
            tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = a, b
            deltas[key] = (SCALE * b.T) @ a.T
    sw = "model.layers.1.mlp.switch_mlp.up_proj"
    a3, b3 = rng.standard_normal((3, 4, 32)), rng.standard_normal((3, 48, 4)) * 0.01
    tensors[f"{sw}.lora_a"], tensors[f"{sw}.lora_b"] = a3, b3
    for e in range(3):
        deltas[f"{sw}[{e}]"] = SCALE * b3[e] @ a3[e]
    emb = "model.embed_tokens"
    ea, eb = rng.standard_normal((64, 4)), rng.standard_normal((4, 32)) * 0.01
    tensors[f"{emb}.lora_a"], tensors[f"{emb}.lora_b"] = ea, eb
    deltas[emb] = SCALE * ea @ eb
    return _write(tmp_path / "mlx", tensors, _config()), deltas


def test_documented_layout_matches_fuse(tmp_path: Path) -> None:
    path, deltas = _documented(tmp_path)
    loaded = load_adapter(str(path))
    assert loaded.config["format"] == "mlx" and loaded.config["lora_alpha"] == SCALE * 4
    pairs = {p.name: p for p in loaded.pairs}
    assert set(pairs) == set(deltas)
    for name, delta in deltas.items():
        pair = pairs[name]
        assert pair.scale == SCALE
        a, b = pair.load_factors()
        np.testing.assert_allclose(pair.scale * (b.astype(np.float64) @ a), delta, rtol=1e-5, atol=1e-6)
    rows = {r["name"]: r for r in run_audit(loaded, AuditOptions(udr=False)).to_summary()["layers"]}
    for name, delta in deltas.items():
        assert rows[name]["delta_sigma_max"] == pytest.approx(np.linalg.svd(delta, compute_uv=False)[0], rel=1e-5)
    assert rows["model.layers.1.mlp.switch_mlp.up_proj[2]"]["expert"] == 2
    assert rows["model.embed_tokens"]["module_type"] == "embed"


def test_dora_magnitude_is_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    key = "model.layers.0.self_attn.v_proj"
    m = rng.uniform(0.5, 1.5, 16)
    path = _write(tmp_path, {f"{key}.lora_a": rng.standard_normal((32, 4)), f"{key}.lora_b": rng.standard_normal(
        (4, 16)), f"{key}.m": m}, _config(fine_tune_type="dora"))
    (pair,) = load_adapter(str(path)).pairs
    assert pair.dora and pair.d_out == 16
    np.testing.assert_allclose(pair.load_magnitude(), m, rtol=1e-6)


@pytest.mark.parametrize("config,tensors,needle", [
    ({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "alpha": 16}}, None, "scale"),
    (None, None, "lora_parameters"),
    (_config(), {"model.layers.0.q_proj.lora_a": (32, 4), "model.layers.0.q_proj.lora_b": (5, 32)}, "fit neither"),
    (_config(1), {"model.layers.0.experts.lora_a": (5000, 1, 4), "model.layers.0.experts.lora_b": (5000, 4, 1)},
     "5000 experts"),
])
def test_hostile_mlx_adapters(tmp_path: Path, config: dict | None, tensors: dict | None, needle: str) -> None:
    shapes = tensors or {"model.layers.0.q_proj.lora_a": (32, 4), "model.layers.0.q_proj.lora_b": (4, 32)}
    path = _write(tmp_path, {k: np.zeros(s) for k, s in shapes.items()}, config)
    with pytest.raises(InputError) as err:
        load_adapter(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "gradience", "audit", str(path), "--no-udr"],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("gradience audit: error: ")


def test_with_mlx_lm_itself(tmp_path: Path) -> None:
    """mlx-lm's own LoRA layers on a tiny Llama (built from ModelArgs, no download), saved the way its trainer
    saves them; each layer's fuse() minus the base weight is the ΔW we read."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=3, intermediate_size=48,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=2)
    model = llama.Model(args)
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(0)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.01
            before = np.array(module.linear.weight)
            expected[name] = np.array(module.fuse().weight).astype(np.float64) - before
    out = tmp_path / "mlx_lm"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": params, "model": "tiny"}))
    pairs = {p.name: p for p in load_adapter(str(out)).pairs}
    assert set(pairs) == set(expected) and all(".layers.0." not in n for n in pairs)  # last 2 of 3 blocks
    for name, delta in expected.items():
        a, b = pairs[name].load_factors()
        np.testing.assert_allclose(pairs[name].scale * (b.astype(np.float64) @ a), delta, atol=2e-6)
