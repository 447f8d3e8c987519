"""The UDR user story end to end (seed 000): two real PEFT adapters on one base, `gradience audit
--base-model ... --json` for each, then the seed's Step 2 and Step 4 Python snippets run unchanged.

The base is a tiny GPT-2 (DialoGPT is GPT-2 shaped) laid out in a private Hugging Face hub cache as
``microsoft/DialoGPT-medium``, so the seed's command line works verbatim and offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import tiny_models
from support.seed_snippets import SEED_STEP_2 as STEP_2
from support.seed_snippets import SEED_STEP_4 as STEP_4
from test_udr_measure import _load_all, reference_deltas, sigma1

pytestmark = pytest.mark.slow

REPO_ID = "microsoft/DialoGPT-medium"


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("udr_story")
    base = tiny_models.make_tiny_gpt2(root / "base")
    hub = root / "hub"
    tiny_models.make_hf_cache_layout(base, hub, repo_id=REPO_ID)
    runs = root / "runs"
    conservative = tiny_models.make_peft_adapter(base, runs / "conservative" / "adapter", arch="gpt2", r=4,
                                                 alpha=8, seed=1, init="trained",
                                                 base_model_name_or_path=REPO_ID)
    aggressive = tiny_models.make_peft_adapter(base, runs / "aggressive" / "adapter", arch="gpt2", r=16,
                                               alpha=64, seed=1, init="trained",
                                               base_model_name_or_path=REPO_ID)
    return {"root": root, "base": base, "hub": hub, "conservative": conservative, "aggressive": aggressive}


def _env(story: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_CACHE": str(story["hub"]), "HF_HUB_OFFLINE": "1",
                "XDG_CACHE_HOME": str(story["root"] / "xdg")})  # default norms cache stays in the tmp dir
    return env


def _audit(story: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradience", "audit", *args], capture_output=True, text=True,
                          env=_env(story), cwd=story["root"], timeout=120)


def test_seed_udr_comparison_end_to_end(story: dict[str, Path]) -> None:
    for which in ("conservative", "aggressive"):
        proc = _audit(story, "--peft-dir", f"./runs/{which}/adapter", "--base-model", REPO_ID, "--json")
        assert proc.returncode == 0, proc.stderr
        (story["root"] / f"{which}_audit.json").write_text(proc.stdout)
    conservative = json.loads((story["root"] / "conservative_audit.json").read_text())
    aggressive = json.loads((story["root"] / "aggressive_audit.json").read_text())

    # UDR numbers against an independent dense computation (ΔW = s·B·A from the file, W from the base).
    base = _load_all(story["base"])
    for summary, adapter in ((conservative, story["conservative"]), (aggressive, story["aggressive"])):
        deltas = reference_deltas(adapter)
        rows = {row["name"]: row for row in summary["layers"]}
        assert set(rows) == set(deltas)
        expected = {name: sigma1(d) / sigma1(base[name + ".weight"]) for name, d in deltas.items()}
        for name, value in expected.items():
            assert rows[name]["udr"] == pytest.approx(value, rel=2e-4), name
            assert rows[name]["sdi"] == pytest.approx(np.log10(value), abs=1e-4), name
        values = np.array(list(expected.values()))
        assert summary["udr_median"] == pytest.approx(np.median(values), rel=2e-4)
        assert summary["fraction_udr_gt_0_3"] == pytest.approx(np.mean(values > 0.3))
        assert summary["n_layers_with_udr"] == len(deltas)
    # Larger rank and α/r move the base further.
    assert aggressive["udr_median"] > conservative["udr_median"]

    # The seed's snippets, unchanged: Step 4 runs in the namespace Step 2 created.
    proc = subprocess.run([sys.executable, "-c", STEP_2 + "\n" + STEP_4], capture_output=True, text=True,
                          cwd=story["root"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"Conservative UDR median: {conservative['udr_median']:.3f}" in out
    assert f"Aggressive UDR median:   {aggressive['udr_median']:.3f}" in out
    assert f"Aggressive layers > 0.3 UDR:   {aggressive['fraction_udr_gt_0_3']:.1%}" in out
    diff_lines = out.split("=== Biggest UDR Differences ===")[1].strip().splitlines()
    assert len(diff_lines) == len(conservative["layers"])
    first = conservative["layers"][0]["name"]
    a_row = next(r for r in aggressive["layers"] if r["name"] == first)
    assert diff_lines[0] == f"{first}: +{a_row['udr'] - conservative['layers'][0]['udr']:.3f}"


def test_text_output_default_cache_and_adapter_hint(story: dict[str, Path]) -> None:
    # No --base-model: the adapter config names microsoft/DialoGPT-medium, which resolves in the local cache.
    proc = _audit(story, "--peft-dir", "./runs/aggressive/adapter")
    assert proc.returncode == 0, proc.stderr
    assert "UDR" in proc.stdout and REPO_ID in proc.stdout
    cache = story["root"] / "xdg" / "gradience" / "base_norms.json"
    assert cache.is_file()
    entries = json.loads(cache.read_text())["bases"]
    assert list(entries) == [f"hub:{REPO_ID}@abc123def4567890abc123def4567890abc12345"]
    # --no-udr: nothing about UDR is computed.
    proc = _audit(story, "--peft-dir", "./runs/aggressive/adapter", "--no-udr", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert all(row.get("udr") is None for row in data["layers"])
    # An explicit base that does not exist: the audit still stands, UDR "not computed" with a warning issue and
    # one stderr line naming it (the reference tool's behaviour); --require-udr makes it exit 2, stdout empty.
    proc = _audit(story, "--peft-dir", "./runs/aggressive/adapter", "--base-model", "org/missing-model", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["udr_median"] is None and data["n_layers_with_udr"] is None
    (issue,) = [i for i in data["issues"] if i["code"] == "base_model_unresolved"]
    assert issue["severity"] == "warning" and "org/missing-model" in issue["message"]
    assert proc.stderr.startswith("gradience audit: warning:") and proc.stderr.count("\n") == 1
    proc = _audit(story, "--peft-dir", "./runs/aggressive/adapter", "--base-model", "org/missing-model", "--json",
                  "--require-udr")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gradience audit: error:") and "org/missing-model" in proc.stderr
    assert "save_pretrained" in proc.stderr and "Traceback" not in proc.stderr


def test_explicit_norms_cache_file_is_used(story: dict[str, Path]) -> None:
    cache = story["root"] / "norms.json"
    for _ in range(2):
        proc = _audit(story, "--peft-dir", "./runs/conservative/adapter", "--base-model", str(story["base"]),
                      "--base-norms-cache", str(cache), "--json")
        assert proc.returncode == 0, proc.stderr
    data = json.loads(cache.read_text())
    (entries,) = data["bases"].values()
    assert len(entries) == len(json.loads(proc.stdout)["layers"])
