"""QA pass over ``gradience export --to gguf``: hostile inputs found by trying it as a new user (issue 20).

Each test is one finding: before the fix the command wrote a file (or a misleading line); now it is one
``gradience export: error: <file>: <problem>`` line, exit 2, and nothing is left at the output path.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from gradience.cli.main import main
from gradience.io.safetensors import SafetensorsFile
from support import verify_triples as vt
from support.synthetic import write_safetensors


def _export(tmp_path: Path, adapter: Path, base: Path, out: Path, *extra: str) -> int:
    return main(["export", "--peft-dir", str(adapter), "--to", "gguf", "--base-model", str(base), "--out", str(out),
                 *extra])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("gradience export: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_adapter_of_another_size_is_refused_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a GGUF was written whose down_proj factors (256 x 512) do not fit the base's (256 x 1024) weight.
    vt.make_base(tmp_path / "base", weights={
        "model.layers.0.mlp.down_proj.weight": np.zeros((vt.HIDDEN, 2 * vt.INTERMEDIATE), np.float32)})
    vt.make_adapter(tmp_path / "adapter")
    out = tmp_path / "a.gguf"
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", out) == 2
    err = _one_error_line(capsys)
    assert "adapter_model.safetensors: module model.layers.0.mlp.down_proj" in err
    assert f"[{vt.HIDDEN}, {2 * vt.INTERMEDIATE}]" in err and "wrong base model" in err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]


def test_non_finite_factors_are_refused_and_no_partial_file(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Before: NaN factors were written silently; llama.cpp would then compute NaN logits.
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    src = SafetensorsFile(path)
    tensors = {k: np.array(src.read_f32(k)) for k in src.tensors}
    del src
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    tensors[key][3, 1] = np.nan
    write_safetensors(path, tensors)
    out = tmp_path / "out" / "a.gguf"
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", out) == 2
    err = _one_error_line(capsys)
    assert "module model.layers.0.mlp.up_proj" in err and "NaN" in err
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []   # no staging leftovers


def test_directory_output_says_so_even_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "output exists; pass --force", and with --force only then "output is a directory".
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    (tmp_path / "outdir").mkdir()
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", tmp_path / "outdir") == 2
    assert "output is a directory" in _one_error_line(capsys)


def test_dangling_symlink_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a dangling symlink at the output path was silently replaced by the GGUF.
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    link = tmp_path / "a.gguf"
    link.symlink_to(tmp_path / "nowhere")
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", link) == 2
    assert "--force" in _one_error_line(capsys)
    assert link.is_symlink()
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", link, "--force") == 0
    assert link.is_file() and not link.is_symlink()


def test_adapter_for_another_model_names_the_adapter_file(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "module ... resolves to no weight of the base model (missing)" with no file named.
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    src = SafetensorsFile(tmp_path / "adapter" / "adapter_model.safetensors")
    renamed = {k.replace("model.layers.0.", "transformer.h.0."): np.array(src.read_f32(k)) for k in src.tensors}
    del src
    write_safetensors(tmp_path / "adapter" / "adapter_model.safetensors", renamed)
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", tmp_path / "a.gguf") == 2
    err = _one_error_line(capsys)
    assert "adapter_model.safetensors: module transformer.h.0." in err
    assert "base model the adapter was trained on" in err


def test_suggested_verify_command_runs_as_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the hint dropped --base-model (verify then guessed the head counts) and did not quote paths.
    d = tmp_path / "my dir"
    vt.make_base(d / "base")
    vt.make_adapter(d / "adapter", use_rslora=True)
    out = d / "a b.gguf"
    assert _export(tmp_path, d / "adapter", d / "base", out) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check it: ")]
    assert len(hint) == 1
    argv = shlex.split(hint[0].removeprefix("check it: "))
    assert argv[:2] == ["gradience", "verify"] and "--base-model" in argv
    assert main([*argv[1:], "--fail-on", "not_exact", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and not any(i.get("code") == "heads_inferred" for i in doc.get("issues", []))


def test_several_adapters_in_one_directory_need_adapter_name(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the top-level adapter was exported without a word, and the hint did not name the adapter.
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "multi", r=8, alpha=16)
    vt.make_adapter(tmp_path / "multi" / "second", r=4, alpha=4, seed=7)
    out = tmp_path / "a.gguf"
    assert _export(tmp_path, tmp_path / "multi", tmp_path / "base", out) == 2
    err = _one_error_line(capsys)
    assert "several adapters found (default, second)" in err and "--adapter-name" in err
    assert not out.exists()
    assert _export(tmp_path, tmp_path / "multi", tmp_path / "base", out, "--adapter-name", "second") == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("check it: "))
    argv = shlex.split(hint.removeprefix("check it: "))
    assert argv[argv.index("--adapter-name") + 1] == "second"
    assert main([*argv[1:], "--fail-on", "not_exact"]) == 0
    capsys.readouterr()
    import gguf

    alpha = gguf.GGUFReader(str(out)).fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(4.0)                                  # the second adapter's, not the first's


def test_alpha_beyond_float32_is_refused_not_written_as_inf(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Before: lora_alpha 1e45 was stored as adapter.lora.alpha = inf (a float32 key); now it is baked into B,
    # whose values then overflow float32: one line naming the adapter file, no file written.
    import json

    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = 1e45
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "a.gguf"
    assert _export(tmp_path, tmp_path / "adapter", tmp_path / "base", out) == 2
    err = _one_error_line(capsys)
    assert "adapter_model.safetensors: blk.0." in err and "float32 range" in err
    assert not out.exists()
