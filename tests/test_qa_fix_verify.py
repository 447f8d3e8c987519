"""QA findings V1-V7 on ``gradience verify`` (issue 20): each bad input is one line on stderr naming the file, exit 2,
in the words of what was passed (a merged checkpoint is not a "base model"); a model GGUF is not an adapter; an
MLX-LM adapter is flagged for engines that load only PEFT's layout; GGUF shapes are checked against --base-model.
Inputs are real files: synthetic Llama checkpoints (tests/support/verify_triples.py) and GGUFs written by
``gradience export`` or by the ``gguf`` package's own writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gradience.cli.main import main
from support import verify_triples as vt
from support.synthetic import write_safetensors


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("gradience verify: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    return err


@pytest.fixture()
def triple(tmp_path: Path) -> tuple[Path, Path]:
    vt.make_base(tmp_path / "base", dtype="F32")
    vt.make_adapter(tmp_path / "ad", r=4, alpha=8)
    return tmp_path / "base", tmp_path / "ad"


def test_merged_path_errors_in_its_own_words(tmp_path: Path, triple: tuple[Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    base, ad = triple
    rest = ["--base-model", str(base), "--peft-dir", str(ad)]
    missing = tmp_path / "nope"
    err = _err(capsys, ["verify", "--merged", str(missing), *rest])      # V1
    assert err == f"gradience verify: error: {missing}: merged checkpoint not found: no such directory"
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    err = _err(capsys, ["verify", "--merged", str(a_file), *rest])       # V2: a file
    assert err.endswith(f"{a_file}: merged checkpoint must be a directory (of safetensors files and config.json)")
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    err = _err(capsys, ["verify", "--merged", str(tmp_path / "loop1"), *rest])   # V2: a symlink loop
    assert err.endswith("loop1: merged checkpoint: cannot access: Too many levels of symbolic links"), err
    for e in (err,):
        assert "base model" not in e and "hub id" not in e


def test_truncated_merged_checkpoint_names_the_path_once(tmp_path: Path, triple: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    base, ad = triple
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text((base / "config.json").read_text())
    data = (base / "model.safetensors").read_bytes()
    (merged / "model.safetensors").write_bytes(data[: len(data) // 2])           # V3: truncated
    err = _err(capsys, ["verify", "--merged", str(merged), "--base-model", str(base), "--peft-dir", str(ad)])
    path = str(merged / "model.safetensors")
    assert err.count(path) == 1 and "merged checkpoint is unusable" in err and "truncated" in err, err


gguf = pytest.importorskip("gguf")


def _model_gguf(path: Path) -> Path:
    """A (tiny) model GGUF, written by the gguf package: general.type 'model', plain weight tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_that_is_not_an_adapter(tmp_path: Path, triple: tuple[Path, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _base, ad = triple
    model = _model_gguf(tmp_path / "model.gguf")
    err = _err(capsys, ["verify", "--gguf", str(model), "--peft-dir", str(ad)])  # V4: no table, exit 2
    assert err.startswith(f"gradience verify: error: {model}: not a LoRA adapter GGUF (general.type 'model'"), err
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    err = _err(capsys, ["verify", "--gguf", str(empty), "--peft-dir", str(ad)])  # V5
    assert err.endswith(f"{empty}: empty file (0 bytes): not a GGUF") and "mmap" not in err
    a_dir = tmp_path / "d.gguf"
    a_dir.mkdir()
    err = _err(capsys, ["verify", "--gguf", str(a_dir), "--peft-dir", str(ad)])
    assert err.endswith("is a directory, not a file") and "IsADirectoryError" not in err


def test_gguf_shapes_checked_against_the_base(tmp_path: Path, triple: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base, ad = triple
    out = tmp_path / "a.gguf"
    assert main(["export", "--peft-dir", str(ad), "--to", "gguf", "--base-model", str(base), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", "--gguf", str(out), "--peft-dir", str(ad), "--base-model", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    # V7: the same family at another size (every weight twice as wide): each module is a mismatch, none "exact"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((base / "config.json").read_text())
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    shapes = {n: t.shape for n, t in BaseWeights(resolve_base(str(base))).tensors.items()}
    write_safetensors(other / "model.safetensors",
                      {n: np.zeros((s[0], 2 * s[1]) if len(s) == 2 else s, np.float32) for n, s in shapes.items()})
    rc = main(["verify", "--gguf", str(out), "--peft-dir", str(ad), "--base-model", str(other), "--json",
               "--fail-on", "not_exact"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["ok"] is False
    assert {m["verdict"] for m in doc["modules"]} == {"mismatch"}
    assert all("has shape" in m["detail"] for m in doc["modules"])
    assert doc["summary"]["extra_in_gguf"] == 0     # the GGUF's pairs are accounted for, not "extra"


def test_mlx_adapter_flagged_for_peft_layout_engines(tmp_path: Path, triple: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """V6: vLLM, PEFT and llama.cpp's converter read adapter_model.safetensors + adapter_config.json only."""
    base, _ad = triple
    rng = np.random.default_rng(0)
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    tensors = {}
    for name, leaf in zip(vt.module_names(), vt.TARGETS, strict=True):
        d_out, d_in = vt.TARGETS[leaf]
        tensors[name + ".lora_a"] = rng.normal(size=(d_in, 4))
        tensors[name + ".lora_b"] = rng.normal(size=(4, d_out))
    write_safetensors(mlx / "adapters.safetensors", tensors)
    (mlx / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": -1,
                                                         "lora_parameters": {"rank": 4, "scale": 2.0}}))
    for engine, rule in (("vllm", "vllm.format"), ("peft", "peft.format"), ("llama.cpp", "llama_cpp.format")):
        rc = main(["verify", "--peft-dir", str(mlx), "--base-model", str(base), "--engine", engine, "--json",
                   "--fail-on", "error"])
        doc = json.loads(capsys.readouterr().out)
        assert rc == 1 and doc["ok"] is False, engine
        assert rule in doc["engine_verdict"]["rules"]
        issue = next(i for i in doc["issues"] if i["code"] == "engine_unsupported")
        assert f"gradience compress {mlx} --out {mlx}-peft --format peft" in issue["message"]
    # and the command it names works: the converted adapter passes the same check
    assert main(["compress", str(mlx), "--out", f"{mlx}-peft", "--format", "peft", "--json"]) == 0
    capsys.readouterr()
    assert main(["verify", "--peft-dir", f"{mlx}-peft", "--base-model", str(base), "--engine", "vllm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
