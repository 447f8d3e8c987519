"""A throw-away local Ray cluster for tests: loopback only, torn down by the pids it started (never ``ray stop``).

Every Ray process is pinned to 127.0.0.1: ``--node-ip-address 127.0.0.1`` and Ray's single-host switch
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (ray/_private/services.py get_node_ip_address: with it off, Ray uses
the loopback address instead of the interface it would advertise to other hosts). Usage stats are off (no
traffic), the dashboard is not started, and the session lives in its own temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LOOPBACK = "127.0.0.1"


def ray_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process that talks to the test cluster (driver included)."""
    env = dict(os.environ if base is None else base)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               RAY_DEDUP_LOGS="0", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@contextmanager
def local_ray_cluster(temp_dir: Path, num_cpus: int = 2, timeout: float = 120.0) -> Iterator[str]:
    """Start ``ray start --head --block`` on loopback; yields its address; kills exactly what it started."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ray_bin, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    log = open(temp_dir / "ray_start.log", "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)
    address = f"{LOOPBACK}:{port}"
    started: set[int] = {proc.pid}
    try:
        deadline = time.monotonic() + timeout
        while True:
            started.update(_descendants(proc.pid))
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: "
                                   f"{(temp_dir / 'ray_start.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("ray head did not come up") from None
                time.sleep(0.5)
        time.sleep(2.0)  # the raylet registers after the GCS port opens
        yield address
    finally:
        started.update(_descendants(proc.pid))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in sorted(started):
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig == signal.SIGTERM:
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                time.sleep(1.0)
                started.update(_descendants(proc.pid))
        proc.wait(timeout=10)
        log.close()
