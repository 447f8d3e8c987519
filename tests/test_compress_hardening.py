"""compress / IO hardening (issue 17 item 6): atomic --force, OUT ownership, leftovers of killed runs,
NAME_MAX-safe staging, F64 read as F64, mismatched pairs, an input that shrinks while read, hostile configs.

Kill tests run compress in a subprocess that SIGKILLs itself at the worst moment (between the two steps of a
replace), then check what a later run finds and does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.io.outdir import NAME_MAX, staging_prefix
from gradience.io.safetensors import SafetensorsFile
from support import synthetic
from support.hostile import (
    REPO_ROOT,
    bigint_alpha_config,
    f64_adapter,
    good_adapter,
    huge_rank_pattern_config,
    many_pairs_adapter,
    mismatched_pair_adapter,
    run_subprocess,
)


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return synthetic.write_synthetic_adapter(tmp_path / "in", layers=2, targets=synthetic.llama_targets(32, 64),
                                             r=8, alpha=16)


def _err(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _policy_of(out: Path) -> Any:
    return json.loads((out / "compress.json").read_text())["policy"]["value"]


def _killing_run(args: list[str], patch: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``gradience ARGS`` in a subprocess after ``patch`` (Python run first, with ``outdir`` and ``kill`` bound)."""
    code = ("import os, signal, sys\n"
            "import gradience.io.outdir as outdir\n"
            "def kill():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            + patch +
            "\nfrom gradience.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120, check=False)


@pytest.mark.slow
def test_kill_after_the_exchange_leaves_the_new_out_and_the_next_run_cleans_up(
        adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.io.outdir import exchange

    probe_a, probe_b = tmp_path / "xa", tmp_path / "xb"
    probe_a.mkdir()
    probe_b.mkdir()
    if not exchange(probe_a, probe_b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (the fallback has its own test)")
    probe_a.rmdir()
    probe_b.rmdir()
    out = tmp_path / "out"
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "4"]) == 0
    capsys.readouterr()
    patch = ("real = outdir.exchange\n"
             "def exchange(a, b):\n    done = real(a, b)\n    kill() if done else None\n    return done\n"
             "outdir.exchange = exchange\n")
    res = _killing_run(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2", "--force"],
                       patch, tmp_path)
    assert res.returncode == -signal.SIGKILL
    assert _policy_of(out) == 2  # OUT is the new, complete output
    assert SafetensorsFile(out / "adapter_model.safetensors").tensors
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-")  # the previous output, swapped out
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "3", "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(i["code"] == "output_leftovers" and stale[0] in i["message"] for i in doc["issues"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert _policy_of(out) == 3


@pytest.mark.slow
def test_kill_between_the_fallback_renames_never_loses_out(adapter: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Where RENAME_EXCHANGE is unavailable, OUT goes to .OUT.old-* first; a kill right then leaves no OUT,
    and the next run must put the old one back (before issue 17 it stayed hidden for good)."""
    out = tmp_path / "out"
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "4"]) == 0
    patch = ("outdir.exchange = lambda a, b: False\n"
             "real = os.rename\n"
             "def rename(src, dst, *a, **k):\n"
             "    real(src, dst, *a, **k)\n"
             "    kill() if os.path.basename(os.fspath(dst)).startswith('.out.old-') else None\n"
             "os.rename = rename\n")
    res = _killing_run(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2", "--force"],
                       patch, tmp_path)
    assert res.returncode == -signal.SIGKILL
    assert not out.exists()
    # the next run restores the previous output first (then, without --force, refuses to replace it)
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2"], "--force")
    assert _policy_of(out) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(out), "--rank", "2", "--force"]) == 0
    assert _policy_of(out) == 2


def test_force_refuses_what_is_not_an_output_of_ours(adapter: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["compress", "--peft-dir", str(adapter), "--rank", "2", "--force", "--out"]
    real = tmp_path / "real"
    assert main(["compress", "--peft-dir", str(adapter), "--out", str(real), "--rank", "4"]) == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    _err(capsys, [*base, str(link)], "symbolic link")
    assert _policy_of(real) == 4 and link.is_symlink()
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    _err(capsys, [*base, "."], "current directory")
    _err(capsys, [*base, ".."], "current directory")
    assert (work / "notes.txt").read_text() == "mine"
    # a compress.json that is not ours (no gradience schema) does not make a directory ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "compress.json").write_text(json.dumps({"schema": "someone.else/v1"}))
    _err(capsys, [*base, str(other)], "not an earlier output of ours")


@pytest.mark.parametrize("layout", ["loop", "loop_parent"])
def test_symlink_loops_are_one_line_errors(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           layout: str) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    out = loop if layout == "loop" else loop / "out"
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--rank", "2", "--out", str(out)])


def test_long_names_fit_name_max(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--rank", "2", "--out", str(tmp_path / ("o" * 300))],
         "longer than 255 bytes")
    for length in (240, 255):
        name = "é" * ((length - 1) // 2) + "x" * ((length - 1) % 2 + 1)  # multi-byte: the limit is in bytes
        assert len(os.fsencode(name)) == length
        for tag in ("tmp", "old"):
            assert len(os.fsencode(staging_prefix(name, tag))) + 8 <= NAME_MAX
        out = tmp_path / name
        assert main(["compress", "--peft-dir", str(adapter), "--rank", "2", "--out", str(out)]) == 0
        assert main(["compress", "--peft-dir", str(adapter), "--rank", "3", "--out", str(out), "--force"]) == 0
        assert _policy_of(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_f64_beyond_float32_is_refused_for_float32_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = f64_adapter(tmp_path / "f64", 1e200)
    out = tmp_path / "out"
    _err(capsys, ["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "2", "--dtype", "float32"],
         "exceed the range of F32")
    assert not out.exists()


@pytest.mark.parametrize("a_scale,b_scale", [(1e79, None), (1e156, 1e-100), (1e-160, 1e-150)])
def test_f64_extremes_are_read_as_f64_and_truncated_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           a_scale: float, b_scale: float | None) -> None:
    """Finite F64 factors far outside float32 (and Grams outside float64) keep their values: the audit sees a
    finite spectrum and compress writes the exact truncation (checked in a scaled space with dense numpy)."""
    src = f64_adapter(tmp_path / "f64", a_scale, b_scale)
    code = main(["audit", "--peft-dir", str(src), "--json", "--no-udr"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["n_layers_non_finite"] == 0
    assert "non_finite_weights" not in {i["code"] for i in doc["issues"]}
    out = tmp_path / "out"
    assert main(["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "2"]) == 0
    sf_in, sf_out = SafetensorsFile(src / "adapter_model.safetensors"), SafetensorsFile(out / "adapter_model.safetensors")
    key_a, key_b = sorted(sf_in.tensors)
    assert sf_out.tensors[key_a].dtype == "F64" and sf_out.tensors[key_a].shape == (2, 16)
    ea = np.ldexp(1.0, -int(np.frexp(a_scale)[1]))
    eb = np.ldexp(1.0, -int(np.frexp(b_scale or a_scale)[1]))
    a, b = sf_in.read(key_a) * ea, sf_in.read(key_b) * eb      # exact power-of-two scaling
    a2, b2 = sf_out.read(key_a), sf_out.read(key_b)
    assert np.isfinite(a2).all() and np.isfinite(b2).all()
    u, s, vt = np.linalg.svd(b @ a)
    want = (4 * 2 / 4) * (u[:, :2] * s[:2]) @ vt[:2]            # s_in = alpha/r = 2 on the scaled factors
    back = np.sqrt(ea) * np.sqrt(eb)
    got = (8 / 2) * (b2 * back) @ (a2 * back)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_mismatched_pair_is_refused_not_transposed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = mismatched_pair_adapter(tmp_path / "mm")
    out = tmp_path / "out"
    _err(capsys, ["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "2"], "do not form a PEFT pair")
    assert not out.exists()


def _compress_spoiling_input(tmp_path: Path, hook_body: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``compress --rank 2`` on a many-pair adapter in a subprocess whose ``truncated_factors`` first runs
    ``hook_body`` (indented source; ``W`` is the weights file, ``state`` a list kept across calls)."""
    src = many_pairs_adapter(tmp_path / "big")
    weights = src / "adapter_model.safetensors"
    patch = ("import gradience.compress.tensors as t\n"
             "real = t.truncated_factors\n"
             f"W = {os.fspath(weights)!r}\n"
             "state = []\n"
             "def hook(a, b, *args, **kw):\n"
             + hook_body +
             "    return real(a, b, *args, **kw)\n"
             "t.truncated_factors = hook\n")
    out = tmp_path / "out"
    res = _killing_run(["compress", "--peft-dir", str(src), "--out", str(out), "--rank", "2"], patch, tmp_path)
    return res, out


@pytest.mark.slow
def test_input_truncated_while_compress_reads_it_is_a_clean_error(tmp_path: Path) -> None:
    """The file is cut to its header page while a pair is being truncated: views into a mapping would SIGBUS;
    the writer's pread copies give one clean error line (exit 2) and no OUT."""
    res, out = _compress_spoiling_input(tmp_path, ("    if os.path.getsize(W) > 4096:\n"
                                                   "        os.truncate(W, 4096)\n"))
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    assert res.stderr.count("\n") == 1 and "shrank" in res.stderr and "internal error" not in res.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.slow
def test_input_overwritten_while_compress_reads_it_is_a_clean_error(tmp_path: Path) -> None:
    """cx_in_overwritten: the data turns into NaN bit patterns after the audit pass (SVD cannot converge on
    them): one clean error line, no OUT."""
    res, out = _compress_spoiling_input(tmp_path, ("    if not state:\n"
                                                   "        state.append(1)\n"
                                                   "        size = os.path.getsize(W)\n"
                                                   "        with open(W, 'r+b') as fh:\n"
                                                   "            fh.seek(size // 2)\n"
                                                   "            fh.write(b'\\xff' * (size - size // 2))\n"))
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    assert res.stderr.count("\n") == 1 and "NaN" in res.stderr and "internal error" not in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_hostile_configs_are_one_line_errors_in_time(tmp_path: Path) -> None:
    big = huge_rank_pattern_config(good_adapter(tmp_path / "rp"))
    res = run_subprocess(["compress", "--peft-dir", str(big), "--out", str(tmp_path / "o1"), "--rank", "2"],
                         timeout=30)
    assert res.returncode == 2 and "rank_pattern has 100000 entries" in res.stderr and res.stderr.count("\n") == 1
    alpha = bigint_alpha_config(good_adapter(tmp_path / "al"))
    res = run_subprocess(["compress", "--peft-dir", str(alpha), "--out", str(tmp_path / "o2"), "--rank", "2"],
                         timeout=30)
    assert res.returncode == 2 and "lora_alpha" in res.stderr and "internal error" not in res.stderr


def test_engine_version_flag(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--dry-run", "--rank", "2", "--engine-version", "vllm"],
         "ENGINE=VERSION")
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--dry-run", "--rank", "2", "--engine-version",
                  "vllm=latest-ish"], "not a vLLM version")
    _err(capsys, ["compress", "--peft-dir", str(adapter), "--dry-run", "--rank", "2", "--engine-version",
                  "tgi=1.0"], "unknown engine")


def test_library_pins_blas_threads_around_the_lapack_calls(adapter: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process callers get one BLAS thread for the r×r LAPACK calls (the CLI sets it by environment),
    restored afterwards; nested use keeps the outer setting."""
    from gradience import blas
    from gradience.adapter import load_adapter
    from gradience.compress import CompressOptions, Policy, compress
    from gradience.compress import factors as factors_mod

    lib = blas._find()
    if lib is None:
        pytest.skip("no known BLAS loaded")
    original = lib.get_threads()
    lib.set_threads(2)  # as a multi-core machine without OPENBLAS_NUM_THREADS would run
    try:
        seen: list[int | None] = []
        real = factors_mod.truncated_factors

        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(blas.blas_threads())
            return real(*args, **kwargs)

        monkeypatch.setattr("gradience.compress.tensors.truncated_factors", spy)
        compress(load_adapter(str(adapter)), tmp_path / "o", CompressOptions(policy=Policy(name="rank", value=2)))
        assert seen and set(seen) == {1}
        assert blas.blas_threads() == 2
        with blas.limited_blas_threads(), blas.limited_blas_threads():
            assert blas.blas_threads() == 1
        assert blas.blas_threads() == 2
    finally:
        lib.set_threads(original)


def test_f64_factors_whose_sigma_exceeds_float64_get_scale_free_metrics(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Finite factors ~1e200 (σ ~1e400): not "non_finite"; ranks and utilization equal dense numpy on the factors
    scaled by an exact power of two, the norms are null, and one warning names the module."""
    src = f64_adapter(tmp_path / "f64", 1e200)
    code = main(["audit", "--peft-dir", str(src), "--json", "--no-udr"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["n_layers_non_finite"] == 0
    (row,) = doc["layers"]
    assert row["status"] == "ok" and row["delta_frob_norm"] is None and row["singular_values"] is None
    assert {i["code"] for i in doc["issues"]} == {"spectrum_out_of_range"}
    sf = SafetensorsFile(src / "adapter_model.safetensors")
    key_a, key_b = sorted(sf.tensors)
    e = np.ldexp(1.0, -int(np.frexp(1e200)[1]))
    sigma = np.linalg.svd((sf.read(key_b) * e) @ (sf.read(key_a) * e), compute_uv=False)[:4]
    assert row["stable_rank"] == pytest.approx(float((sigma ** 2).sum() / sigma[0] ** 2), rel=1e-10)
    energy = np.cumsum(sigma ** 2) / (sigma ** 2).sum()
    assert row["energy_rank_90"] == int(np.searchsorted(energy, 0.9) + 1)
