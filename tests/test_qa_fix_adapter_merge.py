"""QA findings A1-A3 (adapter reading), C1 (compress --format alone) and M1-M3 (merge), issues 19 and 21.

Each refusal is one line ``gradience <cmd>: error: <file>: <problem>`` with exit 2, naming the file at fault; the
conversion's ΔW is checked against a dense numpy ΔW = scale · lora_bᵀ · lora_aᵀ of the MLX factors written here
(mlx-lm's ``LoRALinear.fuse``), and against PEFT's own ``get_delta_weight`` on a tiny Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.cli.main import main
from support import synthetic

SCALE = 3.0
# the tiny Llama of tests/support/tiny_models.py: hidden 32, intermediate 64, 2 KV heads (v_proj 32 -> 16)
MLX_TARGETS = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (32, 16), "mlp.down_proj": (64, 32)}


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith(f"gradience {argv[0]}: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    return err


def _mlx(path: Path, *, rank: int = 4, config_rank: int | None = None, scale: object = SCALE,
         seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """An mlx-lm adapter dir (lora_a (in, r), lora_b (r, out)); returns the dense ΔW (out, in) per module."""
    rng = np.random.default_rng(seed)
    tensors, deltas = {}, {}
    for layer in range(2):
        for name, (d_in, d_out) in MLX_TARGETS.items():
            key = f"model.layers.{layer}.{name}"
            a = rng.standard_normal((d_in, rank)).astype(np.float32)
            b = (rng.standard_normal((rank, d_out)) * 0.05).astype(np.float32)
            tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = a, b
            deltas[key] = SCALE * b.T.astype(np.float64) @ a.T.astype(np.float64)
    path.mkdir(parents=True)
    synthetic.write_safetensors(path / "adapters.safetensors", tensors)
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": config_rank or rank, "scale": scale, "dropout": 0.0}}))
    return path, deltas


def _peft(path: Path, seed: int = 1) -> Path:
    return synthetic.write_synthetic_adapter(path, layers=2, targets=synthetic.llama_targets(32, 64), r=4,
                                             alpha=8, seed=seed, base_model_name_or_path="tiny/base")


# -- adapter ---------------------------------------------------------------------------------------------------
def test_a_file_for_peft_dir_hints_only_what_every_command_takes(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ad = _peft(tmp_path / "ad")
    weights = ad / "adapter_model.safetensors"
    for argv in (["verify", "--peft-dir", str(weights), "--base-model", str(tmp_path)],
                 ["merge", str(weights), str(ad), "--out", str(tmp_path / "m")],
                 ["export", "--peft-dir", str(weights), "--to", "gguf", "--base-model", str(tmp_path),
                  "--out", str(tmp_path / "x.gguf")]):
        err = _err(capsys, argv)
        assert "is a file, not a directory: pass the adapter's directory" in err and "--weights" not in err, err


def test_mlx_config_errors_name_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlx, _ = _mlx(tmp_path / "mlx", scale="big")
    err = _err(capsys, ["audit", str(mlx)])
    assert err == (f"gradience audit: error: {mlx / 'adapter_config.json'}: MLX adapter config "
                   "lora_parameters.scale is 'big', not a finite number")


def test_mlx_rank_mismatch_is_one_grouped_warning(tmp_path: Path) -> None:
    mlx, _ = _mlx(tmp_path / "mlx", rank=4, config_rank=7)
    issues = [i for i in load_adapter(str(mlx)).issues if i.code == "rank_mismatch"]
    assert len(issues) == 1
    assert issues[0].message.startswith("6 of 6 module(s) have factors of rank 4, not lora_parameters.rank=7 (e.g. "
                                        "model.layers.0.mlp.down_proj: r=4)"), issues[0].message
    assert len(issues[0].modules or []) == 6


# -- compress --format alone -----------------------------------------------------------------------------------
def test_format_alone_converts_with_delta_w_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlx, deltas = _mlx(tmp_path / "mlx", rank=4)
    out = tmp_path / "peft"
    assert main(["compress", str(mlx), "--out", str(out), "--format", "peft", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "every module keeps its rank" in doc["policy"]["conversion"]
    from safetensors.numpy import load_file

    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(deltas) == 6
    for module, dw in deltas.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        r = cfg["rank_pattern"].get(module, cfg["r"])
        assert a.shape[0] == r == 4                                      # every module keeps its rank
        got = cfg["lora_alpha"] / r * b @ a
        assert np.linalg.norm(got - dw) / np.linalg.norm(dw) < 1e-6, module


@pytest.mark.slow
def test_format_alone_output_loads_in_peft(tmp_path: Path, tiny_llama_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mlx, deltas = _mlx(tmp_path / "mlx", rank=4)
    out = tmp_path / "peft"
    assert main(["compress", str(mlx), "--out", str(out), "--format", "peft"]) == 0
    capsys.readouterr()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(out))
    seen = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = name.removeprefix("base_model.model.")
                got = module.get_delta_weight("default").double().numpy()
                assert np.linalg.norm(got - deltas[key]) / np.linalg.norm(deltas[key]) < 1e-5, key
                seen += 1
    assert seen == len(deltas)


# -- merge -----------------------------------------------------------------------------------------------------
def test_merge_nan_names_the_adapter_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _peft(tmp_path / "good")
    bad = _peft(tmp_path / "bad", seed=2)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    for argv in (["merge", str(good), str(bad)], ["merge", str(bad), str(good), "--method", "ties"]):
        err = _err(capsys, [*argv, "--out", str(tmp_path / "m")])
        assert err.startswith(f"gradience merge: error: {bad / 'adapter_model.safetensors'}: module "), err
        assert "NaN or Inf" in err


def test_merge_refuses_the_same_adapter_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = _peft(tmp_path / "ad")
    copy = tmp_path / "copy"
    shutil.copytree(ad, copy)
    for other in (ad, copy):   # same path, and the same bytes under another path
        err = _err(capsys, ["merge", str(ad), str(other), "--out", str(tmp_path / "m")])
        assert "adapters 1 and 2 are the same adapter" in err and "adds its update twice" in err, err
        assert not (tmp_path / "m").exists()
    # explicit weights: merged, with a warning (0.5 + 0.5 of one adapter is the adapter)
    assert main(["merge", str(ad), str(copy), "--out", str(tmp_path / "m"), "--weights", "0.5,0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(i["code"] == "duplicate_input" and i["severity"] == "warning" for i in doc["issues"])


def test_merge_of_an_mlx_adapter_names_the_conversion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlx, _ = _mlx(tmp_path / "mlx")
    ad = _peft(tmp_path / "ad")
    err = _err(capsys, ["merge", str(ad), str(mlx), "--out", str(tmp_path / "m")])
    assert f"gradience compress {mlx} --out {mlx}-peft --format peft" in err, err
