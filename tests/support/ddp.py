"""Run a test script under torchrun (2 processes, gloo, CPU), killing the whole process group on timeout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_torchrun(script: Path, args: Sequence[str], cwd: Path, timeout: float, nproc: int = 2) -> str:
    """Run ``script`` with ``args`` on ``nproc`` local processes; returns stderr, asserts exit 0."""
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    # --standalone: a local rendezvous on a free port, so parallel test runs never collide.
    cmd += ["--standalone", "--nproc_per_node", str(nproc), str(script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    # start_new_session: on timeout the whole process group (torchrun and its workers) is killed.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return stderr
