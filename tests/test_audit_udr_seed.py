"""The seed's UDR comparison (000_8b8cfb872ca5deb8.txt, Steps 1, 2 and 4) runs unchanged on our audit JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import tiny_models
from support.seed_snippets import SEED_STEP_2, SEED_STEP_4

pytest.importorskip("peft")

def _udr_available() -> bool:
    try:
        import gradience.udr.measure  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _udr_available(), reason="gradience.udr.measure not built yet")
def test_seed_udr_comparison_runs_unchanged(tmp_path: Path, tiny_llama_dir: Path) -> None:
    conservative = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "runs/conservative/adapter",
                                                 arch="llama", r=4, alpha=8, init="trained", seed=1)
    aggressive = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "runs/aggressive/adapter",
                                               arch="llama", r=16, alpha=64, init="trained", seed=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for label, adapter in (("conservative", conservative), ("aggressive", aggressive)):
        proc = subprocess.run([sys.executable, "-m", "gradience", "audit", "--peft-dir", str(adapter),
                               "--base-model", str(tiny_llama_dir), "--base-norms-cache",
                               str(tmp_path / "norms.json"), "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        (tmp_path / f"{label}_audit.json").write_text(proc.stdout)

    proc = subprocess.run([sys.executable, "-c", SEED_STEP_2 + "\n" + SEED_STEP_4], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "=== UDR Comparison ===" in proc.stdout and "=== Biggest UDR Differences ===" in proc.stdout
    cons = json.loads((tmp_path / "conservative_audit.json").read_text())
    assert proc.stdout.count(": +") + proc.stdout.count(": +-") >= len(cons["layers"])

    # UDR per row against an independent dense computation on the base weights
    from safetensors.numpy import load_file

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    for row in cons["layers"]:
        w = base[row["name"] + ".weight"].astype(np.float64)
        assert row["base_sigma_max"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-3)
        assert row["udr"] == pytest.approx(row["delta_sigma_max"] / np.linalg.norm(w, 2), rel=1e-3)
        assert row["udr_f"] == pytest.approx(row["delta_frob_norm"] / np.linalg.norm(w), rel=1e-5)
    udrs = np.array([row["udr"] for row in cons["layers"]])
    assert cons["udr_median"] == pytest.approx(np.median(udrs), rel=1e-12)
    assert cons["fraction_udr_gt_0_3"] == pytest.approx(np.mean(udrs > 0.3))
    assert cons["n_layers_with_udr"] == len(udrs)


def test_no_base_model_keeps_udr_keys_null(tmp_path: Path) -> None:
    """Without a base model the seed's keys still exist (null), so scripts never KeyError."""
    from support import synthetic

    adapter = synthetic.write_synthetic_adapter(tmp_path / "a", layers=1, targets={"q_proj": (16, 16)}, r=4, alpha=8)
    proc = subprocess.run([sys.executable, "-m", "gradience", "audit", "--peft-dir", str(adapter), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("udr_median", "fraction_udr_gt_0_3", "udr_mean", "udr_p90", "udr_max", "n_layers_with_udr"):
        assert key in data and data[key] is None
    assert all(row["udr"] is None for row in data["layers"])
