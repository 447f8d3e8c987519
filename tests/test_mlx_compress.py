"""``compress --format mlx|peft`` (issue 21 item 3): the written adapter's ΔW per module equals the dense numpy
truncation of the input's ΔW, read back (a) from the raw file in the target's documented layout, (b) by real PEFT
on a tiny Llama (``get_delta_weight``), (c) by mlx-lm itself (``load_adapters`` on a tiny mlx-lm Llama, the
LoRA layer's forward minus its base equals x·ΔWᵀ) where mlx installs. Refusals are one line, exit 2.

References are independent of our reader: MLX ΔW = scale · lora_bᵀ · lora_aᵀ from the numpy arrays we wrote
(mlx-lm's ``LoRALinear.fuse``), PEFT ΔW from PEFT's own ``get_delta_weight``, truncation by ``np.linalg.svd``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.io.safetensors_write import TensorSpec, write_safetensors
from support.hostile import adapter_with_tensors, pair
from support.tiny_models import VOCAB_SIZE

SCALE = 20.0
# the tiny Llama of tests/support/tiny_models.py: hidden 32, intermediate 64, 2 KV heads (v_proj 32 -> 16)
TARGETS = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (32, 16), "mlp.down_proj": (64, 32)}


def _dense_truncation(dw: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _write_mlx(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    specs = [TensorSpec(k, "F32", v.shape, lambda v=v: np.ascontiguousarray(v, np.float32)) for k, v in tensors.items()]
    write_safetensors(path / "adapters.safetensors", specs, {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def mlx_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """mlx-lm's documented layout on the tiny Llama's shapes: rank 6, scale 20, a decaying spectrum (so energy
    policies choose different k per module); the dense ΔW = scale · lora_bᵀ · lora_aᵀ of the stored float32."""
    rng = np.random.default_rng(0)
    tensors, deltas = {}, {}
    for layer in range(2):
        for i, (name, (d_in, d_out)) in enumerate(TARGETS.items()):
            key = f"model.layers.{layer}.{name}"
            decay = (0.3 + 0.1 * i + 0.1 * layer) ** np.arange(6)
            a = (rng.standard_normal((d_in, 6)) * decay).astype(np.float32)
            b = (rng.standard_normal((6, d_out)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = a, b
            deltas[key] = SCALE * b.T.astype(np.float64) @ a.T.astype(np.float64)
    config = {"model": "mlx-community/tiny-llama", "fine_tune_type": "lora", "num_layers": 2,
              "lora_parameters": {"rank": 6, "scale": SCALE, "dropout": 0.0}}
    return _write_mlx(tmp_path_factory.mktemp("mlx") / "in", tensors, config), deltas


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A real PEFT adapter on the tiny Llama with rank_pattern and alpha_pattern (three different scales), random
    decaying factors; the reference ΔW is PEFT's own get_delta_weight."""
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=6, lora_alpha=12, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "down_proj"],
                                            rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 30}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                axis = 0 if "lora_A" in name else 1
                shape = [1, 1]
                shape[axis] = -1
                decay = 0.5 ** torch.arange(param.shape[axis], dtype=torch.float32)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3 * decay.reshape(shape))
    out = tmp_path_factory.mktemp("peft") / "in"
    model.save_pretrained(str(out))
    return out, _peft_deltas(model)


def _peft_deltas(model: Any) -> dict[str, np.ndarray]:
    import torch
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            with torch.no_grad():
                dw = module.get_delta_weight("default").detach().to(torch.float64).numpy()
            deltas[name.removeprefix("base_model.model.")] = dw
    return deltas


def _compress(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main(["compress", str(src), "--out", str(out), "--json", *flags]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def _read(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # the safetensors package itself, not our reader

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def _expected(deltas: dict[str, np.ndarray], doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each module's dense truncation to the rank compress chose (padding keeps ΔW: min(r_after, r_before))."""
    return {row["name"]: _dense_truncation(deltas[row["name"]], min(row["r_after"], row["r_before"]))
            for row in doc["layers"]}


def _check_mlx_file(out: Path, expected: dict[str, np.ndarray]) -> dict[str, Any]:
    config = json.loads((out / "adapter_config.json").read_text())
    scale, rank = config["lora_parameters"]["scale"], config["lora_parameters"]["rank"]
    tensors = _read(out / "adapters.safetensors")
    assert set(tensors) == {f"{m}.{leaf}" for m in expected for leaf in ("lora_a", "lora_b")}
    for module, dw in expected.items():
        a, b = tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"]
        assert a.shape == (dw.shape[1], rank) and b.shape == (rank, dw.shape[0])  # one rank, (in, r)/(r, out)
        np.testing.assert_allclose(scale * b.T @ a.T, dw, rtol=1e-5, atol=1e-6 * np.abs(dw).max())
    return config


def _check_with_mlx_lm(out: Path, expected: dict[str, np.ndarray]) -> None:
    """mlx-lm loads OUT into a tiny mlx-lm Llama of the same shapes; each LoRA layer's output minus its base
    layer's is x·ΔWᵀ (zero for blocks the adapter does not cover)."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import load_adapters

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB_SIZE, num_key_value_heads=2,
                           tie_word_embeddings=False)
    model = llama.Model(args)
    load_adapters(model, str(out))
    rng = np.random.default_rng(5)
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        d_in = module.lora_a.shape[0]
        x = rng.standard_normal((3, d_in)).astype(np.float32)
        got = np.array(module(mx.array(x)) - module.linear(mx.array(x)), dtype=np.float64)
        dw = expected.get(name)
        if dw is None:
            np.testing.assert_array_equal(got, 0.0)
            continue
        seen.add(name)
        np.testing.assert_allclose(got, x.astype(np.float64) @ dw.T, rtol=1e-4, atol=1e-5 * np.abs(got).max())
    assert seen == set(expected)


# -- MLX in ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # mlx-lm / PEFT + transformers imports and a tiny model
def test_mlx_to_mlx_written_delta_equals_truncation(mlx_adapter: tuple[Path, dict[str, np.ndarray]],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, deltas = mlx_adapter
    doc = _compress(src, tmp_path / "out", capsys, "--energy", "0.97")  # default format: the input's (mlx)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors", "compress.json"]
    assert doc["output"]["format"] == "mlx" and doc["output"]["weights"] == "adapters.safetensors"
    assert doc["policy"]["uniform"] is True  # mlx-lm loads one rank
    ranks = {row["r_after"] for row in doc["layers"]}
    assert len(ranks) == 1 and ranks.pop() < 6
    config = _check_mlx_file(out, _expected(deltas, doc))
    assert config["lora_parameters"]["scale"] == SCALE and config["num_layers"] == 2
    assert config["model"] == "mlx-community/tiny-llama" and config["fine_tune_type"] == "lora"
    # the report's PEFT twin describes the written adapter: lora_alpha / r is the MLX scale
    assert doc["config"]["lora_alpha"] / doc["config"]["r"] == SCALE and doc["config"]["rank_pattern"] == {}
    assert json.loads((out / "compress.json").read_text())["output"]["format"] == "mlx"
    _check_with_mlx_lm(out, _expected(deltas, doc))


@pytest.mark.slow  # mlx-lm / PEFT + transformers imports and a tiny model
def test_mlx_to_peft_loads_in_peft(mlx_adapter: tuple[Path, dict[str, np.ndarray]], tiny_llama_dir: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src, deltas = mlx_adapter
    out = tmp_path / "peft"
    doc = _compress(src, out, capsys, "--energy", "0.97", "--format", "peft")
    assert doc["output"]["format"] == "peft" and (out / "adapter_model.safetensors").is_file()
    assert len({row["r_after"] for row in doc["layers"]}) > 1  # per-module ranks through rank_pattern
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "mlx-community/tiny-llama"
    assert "mlx" not in config and "format" not in config
    assert doc["config"]["target_modules"] == config["target_modules"] == sorted(deltas)  # exact module names
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).to(torch.float64)
    got = _peft_deltas(model)
    expected = _expected(deltas, doc)
    assert set(got) == set(expected)
    for module, dw in expected.items():
        np.testing.assert_allclose(got[module], dw, rtol=1e-5, atol=1e-6 * np.abs(dw).max())


# -- PEFT in -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # mlx-lm / PEFT + transformers imports and a tiny model
def test_peft_to_mlx_one_rank_one_scale(peft_adapter: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src, deltas = peft_adapter
    out = tmp_path / "mlx"
    doc = _compress(src, out, capsys, "--rank", "5", "--format", "mlx")
    # q_proj (r 6) truncated to 5, down_proj (r 4) zero-padded to 5; three input scales (2, 5, 3) folded into one
    assert {row["action"] for row in doc["layers"]} == {"truncated", "padded"}
    config = _check_mlx_file(out, _expected(deltas, doc))
    # scales 2 (q), 5 (v: alpha_pattern 30/6), 3 (down: 12/4), two modules each: the tie goes to the largest
    assert config["lora_parameters"]["rank"] == 5 and config["lora_parameters"]["scale"] == 5.0
    assert config["num_layers"] == -1 and config["fine_tune_type"] == "lora"
    assert sorted(config["lora_parameters"]["keys"]) == sorted(TARGETS)
    codes = {i["code"] for i in doc["issues"]}
    assert {"format_converted", "mlx_one_rank"} <= codes
    _check_with_mlx_lm(out, _expected(deltas, doc))


@pytest.mark.slow  # mlx-lm / PEFT + transformers imports and a tiny model
def test_peft_mlx_peft_round_trip_keeps_delta(peft_adapter: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT -> MLX at the largest rank (nothing truncated) -> PEFT: the raw factors give the input's ΔW back."""
    src, deltas = peft_adapter
    _compress(src, tmp_path / "mlx", capsys, "--rank", "6", "--format", "mlx")
    doc = _compress(tmp_path / "mlx", tmp_path / "back", capsys, "--rank", "6", "--format", "peft")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    tensors = _read(tmp_path / "back" / "adapter_model.safetensors")
    assert {row["name"] for row in doc["layers"]} == set(deltas)
    for module, dw in deltas.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_allclose(config["lora_alpha"] / config["r"] * b @ a, dw, rtol=1e-5,
                                   atol=1e-6 * np.abs(dw).max())


# -- refusals and atomic writes ------------------------------------------------------------------------------
def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["compress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradience compress: error: ")
    return err


def test_conversions_that_cannot_be_exact_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = adapter_with_tensors(tmp_path / "gpt2", pair("base_model.model.transformer.h.0.attn.c_attn", 4, 16, 48),
                                {"target_modules": ["c_attn"]})
    assert "model.layers.N" in _refused([str(gpt2), "--out", str(tmp_path / "o1"), "--rank", "2", "--format",
                                         "mlx"], capsys)
    rng = np.random.default_rng(0)
    key = "model.layers.0.self_attn.q_proj"
    dora = _write_mlx(tmp_path / "dora", {f"{key}.lora_a": rng.standard_normal((32, 4)),
                                          f"{key}.lora_b": rng.standard_normal((4, 32)), f"{key}.m": np.ones(32)},
                      {"fine_tune_type": "dora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 2.0}})
    assert "DoRA" in _refused([str(dora), "--out", str(tmp_path / "o2"), "--rank", "2", "--format", "peft"], capsys)
    emb = _write_mlx(tmp_path / "emb", {"model.embed_tokens.lora_a": rng.standard_normal((64, 4)),
                                        "model.embed_tokens.lora_b": rng.standard_normal((4, 32))},
                     {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 2.0}})
    assert "embedding" in _refused([str(emb), "--out", str(tmp_path / "o3"), "--rank", "2", "--format", "peft"],
                                   capsys)
    sw = "model.layers.0.mlp.switch_mlp.up_proj"
    moe = _write_mlx(tmp_path / "moe", {f"{sw}.lora_a": rng.standard_normal((3, 4, 16)),
                                        f"{sw}.lora_b": rng.standard_normal((3, 24, 4))},
                     {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 2.0}})
    assert "expert" in _refused([str(moe), "--out", str(tmp_path / "o4"), "--rank", "2", "--format", "peft"], capsys)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_mlx_output_is_written_atomically(mlx_adapter: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = mlx_adapter
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _refused([str(src), "--out", str(foreign), "--rank", "2", "--force"], capsys)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    _compress(src, out, capsys, "--rank", "2")
    doc = _compress(src, out, capsys, "--rank", "3", "--force")  # replaces our own earlier output whole
    assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 3
    assert doc["output"]["written"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no staging leftovers
    assert main(["compress", str(src), "--out", str(tmp_path / "plan"), "--rank", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Format:    mlx (adapters.safetensors)" in text and "mlx_output: MLX-LM output" in text
    assert not (tmp_path / "plan").exists()


def test_square_lora_a_and_switch_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lora_a (r, r) (d_in == r: the shape alone cannot say it is stored transposed) and a LoRASwitchLinear stack
    (E, r, in)/(E, out, r), ΔW_e = scale · lora_b[e] · lora_a[e]: truncated per module / per expert, written in
    mlx-lm's layout; the square module also as PEFT."""
    rng = np.random.default_rng(3)
    sq, sw = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.switch_mlp.up_proj"
    a_sq, b_sq = rng.standard_normal((4, 4)), rng.standard_normal((4, 16)) * 0.1
    a_sw = rng.standard_normal((3, 4, 16)) * (0.5 ** np.arange(4))[None, :, None]
    b_sw = rng.standard_normal((3, 24, 4)) * 0.1
    tensors = {f"{sq}.lora_a": a_sq, f"{sq}.lora_b": b_sq, f"{sw}.lora_a": a_sw, f"{sw}.lora_b": b_sw}
    src = _write_mlx(tmp_path / "in", tensors, {"fine_tune_type": "lora", "num_layers": 1,
                                                "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}})
    stored = {k: v.astype(np.float32).astype(np.float64) for k, v in tensors.items()}
    doc = _compress(src, tmp_path / "out", capsys, "--rank", "2")
    got = _read(tmp_path / "out" / "adapters.safetensors")
    assert got[f"{sq}.lora_a"].shape == (4, 2) and got[f"{sq}.lora_b"].shape == (2, 16)
    assert got[f"{sw}.lora_a"].shape == (3, 2, 16) and got[f"{sw}.lora_b"].shape == (3, 24, 2)
    scale = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    dw_sq = 2.0 * stored[f"{sq}.lora_b"].T @ stored[f"{sq}.lora_a"].T
    np.testing.assert_allclose(scale * got[f"{sq}.lora_b"].T @ got[f"{sq}.lora_a"].T, _dense_truncation(dw_sq, 2),
                               rtol=1e-5, atol=1e-6)
    for e in range(3):
        dw = 2.0 * stored[f"{sw}.lora_b"][e] @ stored[f"{sw}.lora_a"][e]
        np.testing.assert_allclose(scale * got[f"{sw}.lora_b"][e] @ got[f"{sw}.lora_a"][e], _dense_truncation(dw, 2),
                                   rtol=1e-5, atol=1e-6)
    assert {row["r_after"] for row in doc["layers"]} == {2}
    del tensors[f"{sw}.lora_a"], tensors[f"{sw}.lora_b"]
    src2 = _write_mlx(tmp_path / "in2", tensors, {"fine_tune_type": "lora", "num_layers": 1,
                                                  "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}})
    _compress(src2, tmp_path / "peft", capsys, "--rank", "2", "--format", "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    peft = _read(tmp_path / "peft" / "adapter_model.safetensors")
    a, b = peft[f"base_model.model.{sq}.lora_A.weight"], peft[f"base_model.model.{sq}.lora_B.weight"]
    np.testing.assert_allclose(config["lora_alpha"] / config["r"] * b @ a, _dense_truncation(dw_sq, 2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # mlx-lm / PEFT + transformers imports and a tiny model
def test_mlx_lm_switch_experts_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An adapter trained-shape by mlx-lm itself on a tiny Mixtral (LoRALinear q_proj + LoRASwitchLinear up_proj,
    3 experts), compressed to rank 2 and loaded back by mlx-lm's load_adapters: each layer's fuse() minus its base
    equals the dense truncation (per expert) of what the input's fuse() added."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

    args = mixtral.ModelArgs(model_type="mixtral", vocab_size=32, hidden_size=16, intermediate_size=24,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=3)
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "block_sparse_moe.switch_mlp.up_proj"]}

    def lora_deltas(model: Any) -> dict[str, np.ndarray]:
        return {name: np.array(m.fuse().weight, dtype=np.float64) - np.array(m.linear.weight, dtype=np.float64)
                for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))}

    mx.random.seed(0)
    model = mixtral.Model(args)
    model.freeze()
    linear_to_lora_layers(model, 1, params)
    for _, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASwitchLinear)):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    before = lora_deltas(model)
    src = tmp_path / "in"
    src.mkdir()
    mx.save_safetensors(str(src / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (src / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                         "lora_parameters": params}))
    doc = _compress(src, tmp_path / "out", capsys, "--rank", "2")
    assert {row.get("expert") for row in doc["layers"]} == {None, 0, 1, 2}
    fresh = mixtral.Model(args)
    load_adapters(fresh, str(tmp_path / "out"))
    after = lora_deltas(fresh)
    assert set(after) == set(before) and len(after) == 2
    for name, dw in before.items():
        want = (np.stack([_dense_truncation(d, 2) for d in dw]) if dw.ndim == 3 else _dense_truncation(dw, 2))
        np.testing.assert_allclose(after[name], want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def test_mlx_embedding_and_dora_written_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LoRAEmbedding (ΔW = scale · lora_a · lora_b, (n, dims)) truncated in its own layout; a DoRA module's m is
    copied byte for byte next to its truncated direction; a config without a rank is refused in one line."""
    rng = np.random.default_rng(4)
    emb, v = "model.embed_tokens", "model.layers.0.self_attn.v_proj"
    tensors = {f"{emb}.lora_a": rng.standard_normal((64, 4)), f"{emb}.lora_b": rng.standard_normal((4, 32)) * 0.1,
               f"{v}.lora_a": rng.standard_normal((32, 4)), f"{v}.lora_b": rng.standard_normal((4, 16)) * 0.1,
               f"{v}.m": rng.uniform(0.5, 1.5, 16)}
    config = {"fine_tune_type": "dora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}
    src = _write_mlx(tmp_path / "in", tensors, config)
    stored = {k: val.astype(np.float32).astype(np.float64) for k, val in tensors.items()}
    _compress(src, tmp_path / "out", capsys, "--rank", "2")
    got = _read(tmp_path / "out" / "adapters.safetensors")
    assert got[f"{emb}.lora_a"].shape == (64, 2) and got[f"{emb}.lora_b"].shape == (2, 32)
    want = _dense_truncation(3.0 * stored[f"{emb}.lora_a"] @ stored[f"{emb}.lora_b"], 2)
    np.testing.assert_allclose(3.0 * got[f"{emb}.lora_a"] @ got[f"{emb}.lora_b"], want, rtol=1e-5, atol=1e-6)
    want = _dense_truncation(3.0 * stored[f"{v}.lora_b"].T @ stored[f"{v}.lora_a"].T, 2)
    np.testing.assert_allclose(3.0 * got[f"{v}.lora_b"].T @ got[f"{v}.lora_a"].T, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[f"{v}.m"], stored[f"{v}.m"])
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    config["lora_parameters"] = {"scale": 3.0}
    (src / "adapter_config.json").write_text(json.dumps(config))
    assert "rank" in _refused([str(src), "--out", str(tmp_path / "o2"), "--rank", "2"], capsys)
