"""Intruder dimensions against real PEFT on tiny models: the same counts per layer as PEFT's
``reduce_intruder_dimension`` prints, and ``compress --scale-intruders`` writes the adapter it builds; the CLI's
one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny base, a random-init LoRA on it (r 8: a mix of intruders and not), and PEFT's own mitigation."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    arch = request.param
    root = tmp_path_factory.mktemp(f"intruders_{arch}")
    make = tiny_models.make_tiny_llama if arch == "llama" else tiny_models.make_tiny_gpt2
    base = make(root / "base")
    adapter = tiny_models.make_peft_adapter(base, root / "adapter", arch=arch, r=8, alpha=16, init="random")
    model = PeftModel.from_pretrained(tiny_models._load_base(base, arch), str(adapter))
    lines: list[str] = []
    reduce_intruder_dimension(model, logging_sink=lines.append)
    counts: dict[str, int] = {}
    for line in lines:
        found = re.match(r"base_model\.model\.(.+): (?:Intruders: (\d+)|No intruders)$", line)
        if found:
            counts[found.group(1)] = int(found.group(2) or 0)
    deltas = {name.removeprefix("base_model.model."): layer.get_delta_weight("intruder_reduced").detach().double().numpy()
              for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    return {"arch": arch, "root": root, "base": base, "adapter": adapter, "counts": counts, "deltas": deltas}


def _cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradience", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_counts_per_layer_match_peft(case: dict[str, Any]) -> None:
    proc = _cli("audit", case["adapter"], "--base-model", case["base"], "--intruders", "--json",
                "--intruder-cache", case["root"] / "cache")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ours = {row["name"]: row["intruder_count"] for row in doc["layers"]}
    assert case["counts"] and ours == case["counts"]
    assert any(0 < n < 10 for n in ours.values())  # a mix, not a trivial all/none case
    assert doc["n_layers_intruder_checked"] == len(ours)
    assert doc["n_layers_with_intruders"] == sum(n > 0 for n in ours.values())
    assert doc["intruder_count_total"] == sum(ours.values())
    row = doc["layers"][0]
    assert len(row["intruder_cos"]) == 10 and len(row["intruder_sigma"]) == row["intruder_count"]
    assert all(row["intruder_cos"][i] < 0.5 for i in row["intruder_indices"])
    # Second run: every base spectrum from the cache, same answer.
    again = json.loads(_cli("audit", case["adapter"], "--base-model", case["base"], "--intruders", "--json",
                            "--intruder-cache", case["root"] / "cache").stdout)
    assert {r["name"]: r["intruder_count"] for r in again["layers"]} == ours
    assert again["intruder_stats"]["cache_hits"] >= len(ours)
    assert again["intruder_stats"]["base_spectra_computed"] == 0
    # The numpy path (no torch involved) gives the same counts.
    plain = json.loads(_cli("audit", case["adapter"], "--base-model", case["base"], "--intruders", "--json",
                            "--device", "numpy", "--intruder-cache", case["root"] / "cache_np").stdout)
    assert plain["intruder_stats"]["device"] == "numpy"
    assert {r["name"]: r["intruder_count"] for r in plain["layers"]} == ours


def test_scale_intruders_matches_peft_reduce_intruder_dimension(case: dict[str, Any]) -> None:
    from safetensors.numpy import load_file

    out = case["root"] / "mitigated"
    proc = _cli("compress", case["adapter"], "--out", out, "--scale-intruders", "0.75", "--base-model", case["base"],
                "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["written"] and doc["lambda"] == 0.75
    config_in = json.loads((case["adapter"] / "adapter_config.json").read_text())
    config_out = json.loads((out / "adapter_config.json").read_text())
    assert config_out["r"] == config_in["r"] and config_out["lora_alpha"] == config_in["lora_alpha"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    scale = config_in["lora_alpha"] / config_in["r"]
    for name, expected in case["deltas"].items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        ours = scale * b @ a
        if ours.shape != expected.shape:  # GPT-2 Conv1D: PEFT's delta is in the stored (d_in, d_out) layout
            ours = ours.T
        assert np.linalg.norm(ours - expected) <= 1e-4 * np.linalg.norm(expected), name
    rows = [r for r in doc["layers"] if r["intruder_count"]]
    assert rows and all(0.0 < r["energy_retained"] <= 1.0 and r["rel_change"] > 0 for r in rows)


def test_cli_errors_are_one_line(case: dict[str, Any]) -> None:
    if case["arch"] != "llama":
        pytest.skip("flag checks once")
    for args, needle in (
        (("audit", case["adapter"], "--intruder-k", "5"), "--intruder-k needs --intruders"),
        (("audit", case["adapter"], "--intruders", "--intruder-k", "0"), "--intruder-k must be"),
        (("audit", case["adapter"], "--intruders", "--intruder-eps", "1.5"), "--intruder-eps must be"),
        (("compress", case["adapter"], "--out", case["root"] / "x", "--scale-intruders", "0.5"), "needs the base"),
        (("compress", case["adapter"], "--out", case["root"] / "x", "--scale-intruders", "2", "--base-model",
          case["base"]), "must be in [0, 1]"),
        (("compress", case["adapter"], "--out", case["root"] / "x", "--scale-intruders", "0.5", "--rank", "2",
          "--base-model", case["base"]), "cannot be combined"),
    ):
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    # No base anywhere: the audit stands, intruder keys are null and a warning says why.
    import shutil

    lone = shutil.copytree(case["adapter"], case["root"] / "solo" / "adapter")  # no base beside it
    config = json.loads((lone / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/not-in-any-cache"
    (lone / "adapter_config.json").write_text(json.dumps(config))
    proc = _cli("audit", lone, "--intruders", "--json", "--no-udr")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0
    assert doc["n_layers_with_intruders"] is None and doc["layers"][0]["intruder_count"] is None
    assert any(i["code"] == "intruders_unavailable" for i in doc["issues"])


def test_report_shows_the_intruder_heatmap_with_cos_profiles(case: dict[str, Any]) -> None:
    if case["arch"] != "llama":
        pytest.skip("one architecture is enough for the view")
    proc = _cli("audit", case["adapter"], "--base-model", case["base"], "--intruders", "--json",
                "--intruder-cache", case["root"] / "cache")
    audit = case["root"] / "audit.json"
    audit.write_text(proc.stdout)
    page = case["root"] / "page.html"
    rep = _cli("report", audit, "--out", page)
    assert rep.returncode == 0, rep.stderr
    html = page.read_text()
    doc = json.loads(proc.stdout)
    row = next(r for r in doc["layers"] if r["intruder_count"])
    # shown to 3 decimals rounded down (an intruder just under ε must not print as ε)
    profile = " ".join(f"{int(c * 1000) / 1000:.3f}{'*' if i in row['intruder_indices'] else ''}"
                       for i, c in enumerate(row["intruder_cos"]))
    assert all(float(p.rstrip("*")) < 0.5 for p in profile.split() if p.endswith("*"))
    assert "intruders" in html and profile in html
    # Without --intruders the page has no intruder map (the keys are absent, not null).
    plain = case["root"] / "plain.json"
    plain.write_text(_cli("audit", case["adapter"], "--base-model", case["base"], "--json").stdout)
    assert "intruder_count" not in json.loads(plain.read_text())["layers"][0]
    assert _cli("report", plain, "--out", case["root"] / "plain.html").returncode == 0
    assert "best |cos|" not in (case["root"] / "plain.html").read_text()
