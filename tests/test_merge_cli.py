"""merge CLI: refusals are one line on stderr with exit 2 (mismatched inputs, DoRA, mutated-base inits, other
bases, bad flags, unsafe OUT), --force where it means something, text/JSON output, atomic OUT, light core."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradience.cli.main import main
from support import synthetic

TARGETS = synthetic.llama_targets(32, 64)


def _adapter(path: Path, **kw: object) -> Path:
    args: dict[str, object] = {"layers": 2, "targets": TARGETS, "r": 4, "alpha": 8,
                               "base_model_name_or_path": "tiny/base"}
    args.update(kw)
    return synthetic.write_synthetic_adapter(path, **args)  # type: ignore[arg-type]


@pytest.fixture()
def two(tmp_path: Path) -> tuple[Path, Path]:
    return _adapter(tmp_path / "a", seed=1), _adapter(tmp_path / "b", seed=2, r=2, alpha=4)


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("gradience merge: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    return err


def _set_config(path: Path, **changes: object) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def test_refusals_are_one_line_exit_2(two: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two
    out = str(tmp_path / "o")
    base = ["merge", str(a), str(b), "--out", out]
    assert "at least two" in _err(capsys, ["merge", str(a), "--out", out])
    assert "--out" in _err(capsys, ["merge", str(a), str(b)])
    assert "2 adapter(s)" in _err(capsys, [*base, "--weights", "1,2,3"])
    assert "numbers" in _err(capsys, [*base, "--weights", "1,x"])
    assert "finite" in _err(capsys, [*base, "--weights", "1,nan"])
    assert "cat" in _err(capsys, [*base, "--method", "cat", "--rank", "2"])
    assert "--density" in _err(capsys, [*base, "--method", "ties", "--density", "0"])
    assert "--drop-rate" in _err(capsys, [*base, "--method", "dare", "--drop-rate", "1"])
    assert "fraction" in _err(capsys, [*base, "--method", "svd", "--energy", "2"])
    assert "invalid choice" in _err(capsys, [*base, "--method", "magic"])
    assert "needs a policy" in _err(capsys, [*base, "--uniform"])
    assert "inside it" in _err(capsys, ["merge", str(a), str(b), "--out", str(a / "sub")])
    assert "directory not found" in _err(capsys, ["merge", str(a), str(tmp_path / "nope"), "--out", out])
    assert not Path(out).exists()


def test_mismatched_and_unmergeable_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _adapter(tmp_path / "a", seed=1)
    out = str(tmp_path / "o")
    wide = _adapter(tmp_path / "wide", targets=synthetic.llama_targets(48, 64), seed=3)
    assert "different models" in _err(capsys, ["merge", str(a), str(wide), "--out", out])
    other = _adapter(tmp_path / "other", seed=4, base_model_name_or_path="another/base")
    assert "base_model_name_or_path" in _err(capsys, ["merge", str(a), str(other), "--out", out])
    assert main(["merge", str(a), str(other), "--out", out, "--force"]) == 0  # same model under two names
    assert "base models differ" in json.loads((Path(out) / "merge.json").read_text())["issues"][0]["message"]
    capsys.readouterr()
    dora = _adapter(tmp_path / "dora", seed=5, config_overrides={"use_dora": True})
    assert "DoRA" in _err(capsys, ["merge", str(a), str(dora), "--out", str(tmp_path / "o2")])
    pissa = _adapter(tmp_path / "pissa", seed=6, config_overrides={"init_lora_weights": "pissa_niter_4"})
    assert "pissa" in _err(capsys, ["merge", str(a), str(pissa), "--out", str(tmp_path / "o2")])
    noalpha = _adapter(tmp_path / "noalpha", seed=7)
    _set_config(noalpha, lora_alpha=None)
    assert "lora_alpha" in _err(capsys, ["merge", str(a), str(noalpha), "--out", str(tmp_path / "o2")])
    noconf = _adapter(tmp_path / "noconf", seed=8)
    (noconf / "adapter_config.json").unlink()
    assert "adapter_config.json" in _err(capsys, ["merge", str(a), str(noconf), "--out", str(tmp_path / "o2")])
    nan = _adapter(tmp_path / "nan", seed=9)
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(nan / "adapter_model.safetensors")
    names = src.keys()
    tensors = {k: src.read_f32(k).copy() for k in names}
    src.close()
    tensors[names[0]][0, 0] = float("nan")
    synthetic.write_safetensors(nan / "adapter_model.safetensors", tensors)
    assert "NaN" in _err(capsys, ["merge", str(a), str(nan), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


def test_out_is_atomic_and_force_replaces_only_our_outputs(two: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two
    out = tmp_path / "out"
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("Most interfering modules") < text.index("Summary:")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "merge.json"]
    assert "not empty" in _err(capsys, ["merge", str(a), str(b), "--out", str(out)])
    assert main(["merge", str(a), str(b), "--out", str(out), "--force", "--method", "svd", "--rank", "3",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["ranks_after"] == [3]
    assert json.loads((out / "merge.json").read_text())["method"] == "svd"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _err(capsys, ["merge", str(a), str(b), "--out", str(foreign), "--force"])
    assert (foreign / "notes.txt").read_text() == "mine"


def test_dry_run_writes_nothing(two: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two
    out = tmp_path / "dry"
    assert main(["merge", str(a), str(b), "--out", str(out), "--dry-run", "--method", "dare", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not out.exists() and doc["output"]["written"] is False and doc["method_options"]["seed"] == 0
    assert all(r["sign_conflict_rate"] is not None for r in doc["modules"])


def test_dtype_bfloat16_and_non_lora_tensors(two: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two
    out = tmp_path / "bf"
    assert main(["merge", str(a), str(b), "--out", str(out), "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"]["tensor_dtypes"] == {"BF16": 2 * 7 * 2}
    head = synthetic.read_safetensors_header(out / "adapter_model.safetensors")
    assert {v["dtype"] for k, v in head.items() if k != "__metadata__"} == {"BF16"}
    # a modules_to_save copy cannot be merged as an update: refused, or dropped with --force
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(a / "adapter_model.safetensors")
    names = src.keys()
    tensors = {k: src.read_f32(k) for k in names}
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = tensors[next(iter(tensors))] * 0 + 1
    extra = tmp_path / "extra"
    shutil.copytree(a, extra)
    synthetic.write_safetensors(extra / "adapter_model.safetensors", tensors)
    assert "non-LoRA" in _err(capsys, ["merge", str(extra), str(b), "--out", str(tmp_path / "e")])
    assert main(["merge", str(extra), str(b), "--out", str(tmp_path / "e"), "--force"]) == 0
    head = synthetic.read_safetensors_header(tmp_path / "e" / "adapter_model.safetensors")
    assert not any("modules_to_save" in k for k in head)


@pytest.mark.slow
def test_light_core_never_imports_torch(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    code = ("import sys\nfrom gradience.cli.main import main\n"
            f"rc = main(['merge', {str(a)!r}, {str(b)!r}, '--out', {str(tmp_path / 'x')!r}, '--method', 'svd'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch imported'\n")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(tmp_path / "x")
