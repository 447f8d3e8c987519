"""``gradience bench --executor ray`` on a real local Ray cluster (loopback only) against the local executor.

The cluster is started by the test (``ray start --head``, 2 CPUs, 127.0.0.1) and torn down by the pids it
started. Equality is on everything in bench.json but timings and the output directory's own path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "bench" / "toy.yaml"
ARMS = "truncate_per_layer,retrain_per_layer,uniform:4"
TIMING_KEYS = {"seconds", "elapsed_seconds"}


def _comparable(obj: Any, out: Path) -> Any:
    """bench.json without timings, output paths made relative to the bench's directory."""
    if isinstance(obj, dict):
        return {k: _comparable(v, out) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_comparable(v, out) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(out)):
        return obj[len(str(out)):]
    return obj


def _bench_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradience", "bench", "--config", str(TOY), "--smoke", "--arms", ARMS,
            "--output-dir", str(out), *extra]


def _env() -> dict[str, str]:
    from support.ray_cluster import ray_env

    env = ray_env()
    env.pop("GRADIENCE_BENCH_THREADS", None)
    return env


def _run(cmd: list[str], timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)


def _bench_json(out: Path) -> Any:
    return _comparable(json.loads((out / "bench.json").read_text()), out)


# -- fast checks (no Ray needed) ---------------------------------------------------------------------------
def test_ray_flags_need_the_ray_executor(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["bench", "--config", str(TOY), "--smoke", "--output-dir", str(tmp_path / "o"), "--max-parallel", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "need --executor ray" in err[0]
    assert not (tmp_path / "o").exists()


def test_bad_ray_numbers_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    for flags in (["--max-parallel", "0"], ["--gpus-per-arm", "nan"], ["--gpus-per-arm", "-1"]):
        rc = main(["bench", "--config", str(TOY), "--output-dir", str(tmp_path / "o"), "--executor", "ray", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("gradience bench: error:"), (flags, err)


def test_missing_ray_is_one_line_naming_the_extra(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the [ray] extra sees
    rc = main(["bench", "--config", str(TOY), "--smoke", "--output-dir", str(tmp_path / "o"), "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "gradience[ray]" in err[0], err
    assert not (tmp_path / "o").exists()


def test_threads_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradience.bench.executors import THREADS_ENV, arm_threads
    from gradience.errors import InputError

    monkeypatch.setenv(THREADS_ENV, "3")
    assert arm_threads() == 3
    for bad in ("0", "x", "99999"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(InputError):
            arm_threads()


# -- real runs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("local") / "bench"
    proc = _run(_bench_cmd(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, _bench_json(out)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    from support.ray_cluster import local_ray_cluster

    temp = tmp_path_factory.mktemp("ray")
    with local_ray_cluster(temp, num_cpus=2) as address:
        yield address, temp


@pytest.mark.slow
def test_local_executor_is_reproducible(local_bench: tuple[Path, Any], tmp_path: Path) -> None:
    """The same config and seeds twice give bit-identical metrics, UDRs and verdicts (threads pinned)."""
    out = tmp_path / "again"
    proc = _run(_bench_cmd(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _bench_json(out) == local_bench[1]


@pytest.mark.slow
def test_ray_equals_local_after_a_killed_driver_and_resume(local_bench: tuple[Path, Any],
                                                           ray_cluster: tuple[str, Path], tmp_path: Path) -> None:
    """SIGKILL of the driver once the probe is written; --resume keeps the probe and ends equal to local."""
    address, _ = ray_cluster
    out = tmp_path / "ray"
    cmd = _bench_cmd(out, "--executor", "ray", "--address", address, "--max-parallel", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    probe_result = out / "seed_42" / "probe" / "result.json"
    deadline = time.monotonic() + 900
    while not probe_result.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probe_result.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    probe_mtime = probe_result.stat().st_mtime_ns
    for result in out.glob("seed_42/*/result.json"):  # whatever was written is whole JSON
        json.loads(result.read_text())
    assert not (out / "bench.json").exists()

    resumed = _run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"seed 42 probe\s+resumed", resumed.stderr)
    assert probe_result.stat().st_mtime_ns == probe_mtime  # finished arms are never redone
    assert "on Ray" in resumed.stderr
    assert _bench_json(out) == local_bench[1]


@pytest.mark.slow
def test_worker_killed_mid_arm_is_retried_whole(local_bench: tuple[Path, Any], ray_cluster: tuple[str, Path],
                                                tmp_path: Path) -> None:
    """SIGKILL of the Ray worker while it trains an arm: Ray retries the task from a fresh arm directory, every
    result.json is whole, and the bench still equals the local one."""
    import psutil

    address, _ = ray_cluster
    out = tmp_path / "ray_kill"
    cmd = _bench_cmd(out, "--executor", "ray", "--address", address, "--max-parallel", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    arm_log = out / "seed_42" / "retrain_per_layer" / "run.jsonl"
    killed: list[int] = []
    deadline = time.monotonic() + 900
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            if arm_log.exists() and arm_log.stat().st_size > 0:
                for p in psutil.process_iter(["pid", "cmdline"]):
                    if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::run_job"):
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
            time.sleep(0.1)
        _, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "no worker was found running the arm"
    assert proc.returncode == 0, err[-3000:]
    for result in out.glob("seed_42/*/result.json"):
        json.loads(result.read_text())
    assert _bench_json(out) == local_bench[1]
