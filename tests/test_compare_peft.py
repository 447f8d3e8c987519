"""`gradience compare` on real PEFT adapters: the seed's scenario end to end (conservative r=4/α=8 vs aggressive
r=16/α=64 against a local base), task-head prefixes, rsLoRA. The reference ΔW of every module is PEFT's own
``get_delta_weight`` (its scaling, its orientation), compared densely in numpy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import tiny_models

pytest.importorskip("peft")


def peft_deltas(base_dir: Path, adapter_dir: Path, arch: tiny_models.Arch = "llama") -> dict[str, np.ndarray]:
    """Module name (as the base names it) -> PEFT's ΔW (d_out, d_in) in float64."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models._load_base(base_dir, arch), str(adapter_dir))
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                w = module.get_delta_weight("default").double().numpy()
                out[name.removeprefix("base_model.model.")] = w
    return out


def dense_cross(wa: np.ndarray, wb: np.ndarray, k: int) -> tuple[float, float, float]:
    cos = float(np.sum(wa * wb) / (np.linalg.norm(wa) * np.linalg.norm(wb)))
    ua, _, vta = np.linalg.svd(wa)
    ub, _, vtb = np.linalg.svd(wb)
    return (cos, float(np.sum((ua[:, :k].T @ ub[:, :k]) ** 2)) / k,
            float(np.sum((vta[:k] @ vtb[:k].T) ** 2)) / k)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradience", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd)


@pytest.mark.slow
def test_seed_scenario_conservative_vs_aggressive(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cons = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "runs/conservative/adapter", arch="llama",
                                         r=4, alpha=8, init="trained", seed=1)
    aggr = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "runs/aggressive/adapter", arch="llama",
                                         r=16, alpha=64, init="trained", seed=2)
    cache = str(tmp_path / "norms.json")
    args = ["compare", "runs/conservative/adapter", "runs/aggressive/adapter", "--base-model", str(tiny_llama_dir),
            "--base-norms-cache", cache]
    proc = cli(*args, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert doc["summary"]["n_matched"] == 14 and doc["a"]["r"] == 4 and doc["b"]["r"] == 16
    assert doc["udr"]["b"]["tensors_read"] == 0 and doc["udr"]["b"]["cache_hits"] == 14  # one base read

    # cross metrics against PEFT's own dense updates
    da, db = peft_deltas(tiny_llama_dir, cons), peft_deltas(tiny_llama_dir, aggr)
    for m in doc["modules"]:
        wa, wb = da[m["name"]], db[m["name"]]
        assert (m["cos"], m["overlap_left"], m["overlap_right"]) == pytest.approx(dense_cross(wa, wb, m["k"]),
                                                                                    abs=1e-5)
        assert m["a"]["delta_frob_norm"] == pytest.approx(np.linalg.norm(wa), rel=1e-5)
        assert m["b"]["delta_sigma_max"] == pytest.approx(np.linalg.norm(wb, 2), rel=1e-5)
        assert m["a"]["scale"] == 2.0 and m["b"]["scale"] == 4.0
    # UDR against the base's dense spectral norm; the table is ordered by |ΔUDR|
    from safetensors.numpy import load_file

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    for m in doc["modules"]:
        s1 = np.linalg.norm(base[m["name"] + ".weight"].astype(np.float64), 2)
        assert m["delta"]["udr"] == pytest.approx((np.linalg.norm(db[m["name"]], 2) - np.linalg.norm(da[m["name"]], 2))
                                                  / s1, rel=1e-3, abs=1e-9)
    deltas = [abs(m["delta"]["udr"]) for m in doc["modules"]]
    assert deltas == sorted(deltas, reverse=True)

    # the text the seed's snippet printed by hand, now one command, sorted by size
    text = cli(*args, "--top", "3", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    s = doc["summary"]
    assert f"Conservative UDR median: {s['a']['udr_median']:.3f}" in text.stdout
    assert f"Aggressive UDR median:   {s['b']['udr_median']:.3f}" in text.stdout
    assert "Conservative layers > 0.3 UDR:" in text.stdout and "Aggressive layers > 0.3 UDR:" in text.stdout
    table = text.stdout.split("Biggest UDR differences (by |ΔUDR|), top 3 of 14:\n", 1)[1].splitlines()[1:4]
    assert [row.split()[-1] for row in table] == [m["name"] for m in doc["modules"][:3]]

    # Step 1 of the seed (two audit JSON files) compared directly: the same deltas, cross measures said missing
    for label, adapter in (("conservative", cons), ("aggressive", aggr)):
        out = cli("audit", "--peft-dir", str(adapter), "--base-model", str(tiny_llama_dir), "--base-norms-cache",
                  cache, "--json")
        assert out.returncode == 0, out.stderr
        (tmp_path / f"{label}_audit.json").write_text(out.stdout)
    proc = cli("compare", "conservative_audit.json", "aggressive_audit.json", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from_json = json.loads(proc.stdout)
    assert [m["name"] for m in from_json["modules"]] == [m["name"] for m in doc["modules"]]
    for mj, md in zip(from_json["modules"], doc["modules"], strict=True):
        assert mj["delta"]["udr"] == pytest.approx(md["delta"]["udr"])
        assert mj["cos"] is None
    assert "cos" in from_json["summary"]["unavailable"]

    # a gate on the seed's question: did the aggressive run move the base much further?
    gate = cli(*args, "--fail-on", "udr_median_delta>0", cwd=tmp_path)
    assert gate.returncode == (1 if s["udr_median_delta"] > 0 else 0)


def test_same_real_adapter_twice(llama_adapter_trained_dir: Path) -> None:
    proc = cli("compare", str(llama_adapter_trained_dir), str(llama_adapter_trained_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["cos_mean"] == pytest.approx(1.0, abs=1e-9)
    assert doc["summary"]["overlap_left_mean"] == pytest.approx(1.0, abs=1e-6)
    assert doc["summary"]["overlap_right_mean"] == pytest.approx(1.0, abs=1e-6)
    assert not [i for i in doc["issues"] if i["code"] == "base_model_mismatch"]


def test_task_head_prefix_and_different_bases(distilbert_seqcls_adapter_dir: Path,
                                              distilbert_adapter_dir: Path) -> None:
    """SEQ_CLS adapter (``distilbert.transformer...``) vs one on the bare model (``transformer...``)."""
    proc = cli("compare", str(distilbert_seqcls_adapter_dir), str(distilbert_adapter_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["n_matched"] == 12
    assert doc["summary"]["only_in_a"] == [] and doc["summary"]["only_in_b"] == []
    for m in doc["modules"]:
        assert m["name"] == "distilbert." + m["name_b"]
        assert m["cos"] is not None
    codes = {i["code"] for i in doc["issues"]}
    assert {"base_model_mismatch", "matched_by_suffix"} <= codes
    assert any(i["code"] == "non_lora_tensors" and i.get("side") == "a" for i in doc["issues"])


def test_rslora_versus_plain_real_peft(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Same seed, same factors; PEFT scales one by α/r and the other by α/√r."""
    plain = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "plain", arch="llama", r=8, alpha=16, seed=3)
    rs = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "rs", arch="llama", r=8, alpha=16, seed=3,
                                       use_rslora=True)
    proc = cli("compare", str(plain), str(rs), "--json", "--k", "2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    dp, dr = peft_deltas(tiny_llama_dir, plain), peft_deltas(tiny_llama_dir, rs)
    for m in doc["modules"]:
        assert m["a"]["scale"] == pytest.approx(2.0) and m["b"]["scale"] == pytest.approx(16 / np.sqrt(8))
        assert m["cos"] == pytest.approx(1.0, abs=1e-9)
        assert m["overlap_left"] == pytest.approx(1.0, abs=1e-6)
        assert m["b"]["delta_frob_norm"] == pytest.approx(np.linalg.norm(dr[m["name"]]), rel=1e-5)
        assert m["delta"]["delta_frob_norm"] == pytest.approx(
            np.linalg.norm(dr[m["name"]]) - np.linalg.norm(dp[m["name"]]), rel=1e-4)
