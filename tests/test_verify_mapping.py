"""``gradience verify --peft-dir --base-model [--engine]``: does every LoRA pair land on a base weight?"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.cli.main import main
from gradience.errors import InputError
from gradience.io.safetensors import SafetensorsFile
from gradience.verify import verify_mapping
from support import verify_triples as vt
from support.synthetic import write_safetensors


def _pair(tmp_path: Path, **adapter_kw: object) -> tuple[Path, Path]:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter", **adapter_kw)  # type: ignore[arg-type]
    return tmp_path / "base", tmp_path / "adapter"


def _rename_base(base: Path, rename: dict[str, str]) -> None:
    src = SafetensorsFile(base / "model.safetensors")
    tensors = {}
    for name in src.tensors:
        new = name
        for old, repl in rename.items():
            if new.startswith(old):
                new = repl + new[len(old):]
        tensors[new] = np.array(src.read_f32(name))
    src.close()
    write_safetensors(base / "model.safetensors", tensors, dtype="BF16")


@pytest.mark.parametrize("engine", ["peft", "vllm", "llama.cpp"])
def test_every_pair_resolves(tmp_path: Path, engine: str) -> None:
    if engine == "llama.cpp":
        pytest.importorskip("gguf")
    base, adapter = _pair(tmp_path)
    doc = verify_mapping(load_adapter(str(adapter)), str(base), engine)
    assert doc["schema"] == "gradience.verify/v1" and doc["mode"] == "mapping" and doc["ok"] is True
    assert doc["summary"] == {"modules": 7, "resolved": 7, "errors": 0, "warnings": 0}
    rows = {r["name"]: r for r in doc["modules"]}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["base_tensor"] == "model.layers.0.self_attn.q_proj.weight"
    expected = {"peft": "model.layers.0.self_attn.q_proj", "vllm": "model.layers.0.self_attn.qkv_proj",
                "llama.cpp": "blk.0.attn_q.weight"}[engine]
    assert q["engine_name"] == expected
    assert all(r["source"] for r in doc["modules"]) and doc["rules"]
    if engine == "vllm":
        assert rows["model.layers.0.mlp.up_proj"]["engine_name"] == "model.layers.0.mlp.gate_up_proj"
        assert doc["limits"]["serve_with_max_lora_rank"] == 8


def test_vl_wrapper_prefix_is_an_error_for_vllm_and_a_warning_for_peft(tmp_path: Path) -> None:
    """The served model names its layers model.language_model.layers.N (a VL model); the adapter was trained on
    the bare language model: vLLM matches full paths and never applies these pairs (issues 48019, 55193)."""
    base, adapter = _pair(tmp_path)
    _rename_base(base, {"model.layers.": "model.language_model.layers."})
    with pytest.raises(InputError, match="never be applied"):  # no pair resolves: a hard error
        verify_mapping(load_adapter(str(adapter)), str(base), "vllm")
    peft = verify_mapping(load_adapter(str(adapter)), str(base), "peft")
    assert peft["summary"]["warnings"] == 7 and peft["summary"]["errors"] == 0
    if pytest.importorskip("gguf"):
        cpp = verify_mapping(load_adapter(str(adapter)), str(base), "llama.cpp")
        # the converter rewrites model.language_model. to model. before its tensor map
        assert cpp["ok"] is True and cpp["modules"][0]["engine_name"].startswith("blk.0.")


def test_unmapped_module_is_an_error_and_wrong_base_is_a_hard_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = _pair(tmp_path)
    src = SafetensorsFile(adapter / "adapter_model.safetensors")
    tensors = {k: np.array(src.read_f32(k)) for k in src.tensors}
    src.close()
    tensors["base_model.model.model.layers.0.mlp.extra_proj.lora_A.weight"] = np.ones((8, vt.HIDDEN), np.float32)
    tensors["base_model.model.model.layers.0.mlp.extra_proj.lora_B.weight"] = np.ones((vt.HIDDEN, 8), np.float32)
    write_safetensors(adapter / "adapter_model.safetensors", tensors)
    doc = verify_mapping(load_adapter(str(adapter)), str(base), "peft")
    rows = {r["name"]: r for r in doc["modules"]}
    assert rows["model.layers.0.mlp.extra_proj"]["status"] == "error"
    assert doc["ok"] is False and any(i["code"] == "unmapped_module" for i in doc["issues"])
    assert main(["verify", "--peft-dir", str(adapter), "--base-model", str(base), "--fail-on", "not_exact"]) == 1
    capsys.readouterr()
    # a base of another size: no pair fits, which is a hard error (exit 2), not a report
    other = tmp_path / "other"
    vt.make_base(other)
    _rename_base(other, {"model.layers.0.": "model.layers.9."})
    assert main(["verify", "--peft-dir", str(adapter), "--base-model", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradience verify: error: ") and "none of the adapter's" in err and err.count("\n") == 1


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    base, adapter = _pair(tmp_path)
    src = SafetensorsFile(base / "model.safetensors")
    tensors = {k: np.array(src.read_f32(k)) for k in src.tensors}
    src.close()
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((vt.INTERMEDIATE // 2, vt.HIDDEN), np.float32)
    write_safetensors(base / "model.safetensors", tensors)
    doc = verify_mapping(load_adapter(str(adapter)), str(base), "vllm")
    row = next(r for r in doc["modules"] if r["name"].endswith("up_proj"))
    assert row["status"] == "error" and "shape" in row["detail"]


def test_engine_features_come_from_the_engine_table(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    base, adapter = _pair(tmp_path, use_rslora=True)
    doc = verify_mapping(load_adapter(str(adapter)), str(base), "llama.cpp")
    assert doc["engine_verdict"]["ok"] is False and doc["engine_verdict"]["rules"] == ["llama_cpp.scale"]
    issue = next(i for i in doc["issues"] if i["code"] == "engine_unsupported")
    assert "export --to gguf" in issue["message"]
    from gradience.engines import evaluate, facts_from_config

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert doc["engine_verdict"]["reason"] == evaluate(facts_from_config(cfg, [8] * 7))["llama_cpp"]["reason"]


def test_cli_engine_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = _pair(tmp_path)
    assert main(["verify", "--peft-dir", str(adapter), "--base-model", str(base), "--engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "qkv_proj" in out and "--max-lora-rank 8" in out
    assert main(["verify", "--peft-dir", str(adapter), "--base-model", str(base), "--engine", "tgi"]) == 2
    assert "--engine must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_real_peft_adapter_maps_under_each_engine(tiny_llama_dir: Path, llama_adapter_dir: Path) -> None:
    pytest.importorskip("gguf")
    for engine in ("peft", "vllm", "llama.cpp"):
        doc = verify_mapping(load_adapter(str(llama_adapter_dir)), str(tiny_llama_dir), engine)
        assert doc["ok"] is True and doc["summary"]["resolved"] == 14, engine
