"""compress CLI safety and refusals (numpy-only synthetic adapters, no torch): one-line errors with exit 2,
OUT checks, --force, --dry-run, atomic output, and the light-core import rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradience.cli.main import main
from gradience.io.safetensors import SafetensorsFile
from support import synthetic


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return synthetic.write_synthetic_adapter(tmp_path / "in", layers=2, targets=synthetic.llama_targets(32, 64),
                                             r=8, alpha=16)


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gradience compress: error:"), err
    assert "Traceback" not in err
    return err


def test_refusals_are_one_line_exit_2(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compress", "--peft-dir", str(adapter)]
    assert "no policy" in _err(capsys, [*base, "--out", str(tmp_path / "o")])
    assert "--out" in _err(capsys, [*base, "--rank", "2"])
    assert "input adapter directory" in _err(capsys, [*base, "--out", str(adapter), "--rank", "2"])
    assert "inside it" in _err(capsys, [*base, "--out", str(adapter / "sub"), "--rank", "2"])
    assert "inside --out" in _err(capsys, [*base, "--out", str(tmp_path), "--rank", "2", "--force"])
    assert "fraction" in _err(capsys, [*base, "--out", str(tmp_path / "o"), "--energy", "1.5"])
    assert "--budget" in _err(capsys, [*base, "--out", str(tmp_path / "o"), "--budget", "lots"])
    assert "below the minimum" in _err(capsys, [*base, "--out", str(tmp_path / "o"), "--budget", "10"])
    assert "not allowed with" in _err(capsys, [*base, "--out", str(tmp_path / "o"), "--rank", "2", "--energy", "0.9"])
    assert "directory not found" in _err(capsys, ["compress", "--peft-dir", str(tmp_path / "nope"), "--rank", "2",
                                                  "--out", str(tmp_path / "o")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a directory" in _err(capsys, [*base, "--out", str(afile), "--rank", "2"])
    assert not (tmp_path / "o").exists()


def test_non_empty_out_needs_force_and_is_replaced_whole(adapter: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2"]
    assert "--force" in _err(capsys, argv)
    assert (out / "old.txt").exists()
    # --force replaces only an earlier output of ours (one holding our compress.json)
    assert "not an earlier output of ours" in _err(capsys, [*argv, "--force"])
    assert (out / "old.txt").exists()
    (out / "compress.json").write_text(json.dumps({"schema": "gradience.compress/v1"}))
    assert main([*argv, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "compress.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left behind


def test_written_adapter_is_readable_as_any_file_the_user_makes(adapter: Path, tmp_path: Path) -> None:
    """A serving process under another account must be able to load it: no mkdtemp 0700 / mkstemp 0600."""
    old = os.umask(0o022)
    try:
        assert main(["compress", "--peft-dir", str(adapter), "--out", str(tmp_path / "out"), "--rank", "2"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "compress.json": 0o644}


def test_dry_run_writes_nothing_and_json_is_the_document(adapter: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--energy", "0.9", "--dry-run",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not out.exists() and doc["output"]["written"] is False and doc["output"]["dry_run"] is True
    for key in ("schema", "source", "policy", "layers", "summary", "portability", "issues"):
        assert key in doc
    assert doc["schema"] == "gradience.compress/v1" and len(doc["source"]["sha256"]) == 64
    row = doc["layers"][0]
    for key in ("name", "peft_prefix", "r_before", "r_after", "energy_retained", "rel_frob_error",
                "rel_spectral_error", "params_before", "params_after"):
        assert key in row
    for key in ("params_before", "params_after", "reduction_ratio", "energy_retained_min", "energy_retained_mean",
                "rel_frob_error_max"):
        assert key in doc["summary"]
    for row in doc["layers"]:
        assert row["rel_frob_error"] == pytest.approx((1 - row["energy_retained"]) ** 0.5, abs=1e-12)
    assert set(doc["portability"]) == {"peft", "vllm", "llama_cpp"}


def test_a_crash_while_writing_leaves_no_out(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.compress import factors

    calls = {"n": 0}
    real = factors.truncated_factors

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr("gradience.compress.tensors.truncated_factors", flaky)
    out = tmp_path / "out"
    assert "No space left" in _err(capsys, ["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2"])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_mutated_base_init_is_refused(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(shutil.copytree(adapter, tmp_path / "pissa"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["compress", "--peft-dir", str(src), "--out", str(tmp_path / "o"), "--rank", "2"])
    assert "pissa_niter_4" in err and "not a delta" in err


def test_zero_alpha_and_missing_config_are_refused(adapter: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(shutil.copytree(adapter, tmp_path / "a0"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 0
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    assert "lora_alpha" in _err(capsys, ["compress", "--peft-dir", str(src), "--out", str(tmp_path / "o"),
                                         "--rank", "2"])
    (src / "adapter_config.json").unlink()
    assert "adapter_config.json" in _err(capsys, ["compress", "--peft-dir", str(src), "--out", str(tmp_path / "o"),
                                                  "--rank", "2"])


def test_dtype_conversion_and_uniform(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bf"
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--energy", "0.9", "--uniform",
                 "--dtype", "bfloat16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    sf = SafetensorsFile(out / "adapter_model.safetensors")
    assert {t.dtype for t in sf.tensors.values()} == {"BF16"}
    ranks = {row["r_after"] for row in doc["layers"]}
    assert len(ranks) == 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == ranks.pop() and cfg["rank_pattern"] == {}
    assert all(v["ok"] for v in doc["portability"].values())


def test_compress_does_not_import_torch(adapter: Path, tmp_path: Path) -> None:
    code = ("import sys; from gradience.cli.main import main; "
            f"rc = main(['compress', '--peft-dir', {str(adapter)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--energy', '0.9']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_next_lines_name_the_bench_command_that_verifies_this_output(adapter: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The verify advice names `gradience bench --peft-dir OUT --against IN` with the user's own paths
    (issue 18 item 3); the bench side of that command is run as printed in test_bench_peft_dir."""
    out = tmp_path / "small out"
    assert main(["compress", str(adapter), "--out", str(out), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    expected = f"gradience bench --config BENCH.yaml --peft-dir '{out}' --against {adapter}"
    assert expected in text, text
