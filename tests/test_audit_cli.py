"""`gradience audit` end to end in a subprocess: layout, JSON contract, gates, append, multi-adapter, bad input."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import synthetic

ROW_KEYS = {
    "name", "peft_prefix", "module_type", "layer", "kind", "dora", "r", "alpha", "scale", "params", "a_shape",
    "b_shape", "frob_norm", "sigma_max", "delta_frob_norm", "delta_sigma_max", "stable_rank", "utilization",
    "effective_rank", "energy_rank_90", "energy_rank_95", "energy_rank_99", "singular_values",
    "base_sigma_max", "base_frob_norm", "udr", "udr_f", "sdi",
}
SUMMARY_KEYS = {
    "schema", "peft_dir", "adapter_config_path", "adapter_weights_path", "adapter", "total_lora_params",
    "n_layers", "stable_rank_mean", "stable_rank_median", "stable_rank_weighted_mean", "effective_rank_mean",
    "utilization_mean", "energy_rank_90_p50", "energy_rank_90_p90", "delta_sigma_max_scaled_mean",
    "delta_sigma_max_scaled_p50", "delta_sigma_max_scaled_p90", "delta_frob_norm_scaled_mean",
    "delta_frob_norm_scaled_p50", "delta_frob_norm_scaled_p90", "by_type", "suggested_r_global_median",
    "suggested_r_global_90", "composition", "issues", "layers",
    "udr_mean", "udr_median", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3", "sdi_mean",
    "sdi_median", "sdi_p90", "n_layers_with_udr",
}
ADAPTER_KEYS = {"r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
                "base_model_name_or_path", "peft_type", "task_type"}


def gradience(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gradience", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def audit_json(*args: str) -> dict[str, Any]:
    proc = gradience("audit", *args, "--json", "--no-udr")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def reference_sigma(adapter_dir: Path) -> dict[str, np.ndarray]:
    """Dense-SVD σ of B·A per module, read with the safetensors package (not our reader)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            out[name] = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)[: a.shape[0]]
    return out


# ---- layout and JSON contract ------------------------------------------------------------------------------
def test_text_layout_follows_the_seed(synthetic_adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(synthetic_adapter_dir), "--top-wasteful", "10", "--no-udr")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "=" * 72 and lines[1] == "GRADIENCE LoRA AUDIT" and lines[2] == "=" * 72
    assert lines[3] == f"PEFT dir: {synthetic_adapter_dir}"
    assert lines[4] == f"Config:   {synthetic_adapter_dir / 'adapter_config.json'}"
    assert lines[5] == f"Weights:  {synthetic_adapter_dir / 'adapter_model.safetensors'}"
    text = proc.stdout
    order = ["Summary:", "  LoRA params: ", "  Layers:      ", "  Stable rank (mean):    ",
             "  Utilization (mean):    ", "  Energy rank k@90% (p50/p90): ", "By module type:", "Suggested rank:",
             "Issues:", "Most wasteful layers (lowest utilization, top 10):"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)

    data = audit_json("--peft-dir", str(synthetic_adapter_dir))
    total = sum(row["params"] for row in data["layers"])
    assert f"  LoRA params: {total / 1000:.1f}K" in lines
    assert f"  Layers:      {len(data['layers'])}" in lines
    assert re.search(r"^  Energy rank k@90% \(p50/p90\): \d+(\.\d)?/\d+(\.\d)?$", text, re.M)
    assert re.search(r"^  Utilization \(mean\):    \d+\.\d%$", text, re.M)
    rows = [ln for ln in lines if re.match(r"^  \d\d\. ", ln)]
    assert len(rows) == 10
    pattern = re.compile(r"^  (\d\d)\. (attn|mlp ) r=(\d+) +util=(\d+\.\d)%  sr=(\d+\.\d\d)  k@90%=(\d+)  (\S+)$")
    by_name = {row["name"]: row for row in data["layers"]}
    utils = []
    for i, line in enumerate(rows, 1):
        m = pattern.match(line)
        assert m, line
        assert int(m.group(1)) == i
        row = by_name[m.group(7)]
        assert int(m.group(3)) == row["r"] and int(m.group(6)) == row["energy_rank_90"]
        assert float(m.group(4)) == pytest.approx(100 * row["utilization"], abs=0.051)
        utils.append(row["utilization"])
    assert utils == sorted(utils)
    assert utils[-1] <= sorted(r["utilization"] for r in data["layers"])[9]
    # the seed's exact row format
    assert rows[0][:22].startswith("  01. ") and "   util=" in rows[0]


def test_json_contract_and_numbers(synthetic_adapter_dir: Path) -> None:
    data = audit_json("--peft-dir", str(synthetic_adapter_dir), "--top-wasteful", "3")
    assert data["schema"] == "gradience.audit/v1"
    assert set(data) >= SUMMARY_KEYS
    assert set(data["adapter"]) >= ADAPTER_KEYS
    assert data["udr_median"] is None and data["fraction_udr_gt_0_3"] is None  # no base: keys present, null
    assert len(data["top_wasteful"]) == 3
    ref = reference_sigma(synthetic_adapter_dir)
    assert {row["name"] for row in data["layers"]} == set(ref)
    for row in data["layers"]:
        assert set(row) >= ROW_KEYS
        assert row["udr"] is None and row["base_sigma_max"] is None and row["sdi"] is None
        s = ref[row["name"]]
        np.testing.assert_allclose(row["singular_values"], s, rtol=0, atol=1e-8 * s[0])
        assert row["scale"] == pytest.approx(16 / 8)
        assert row["delta_sigma_max"] == pytest.approx(2 * s[0], rel=1e-8)
    # summary statistics with numpy's percentile convention, computed here independently
    sr = np.array([row["stable_rank"] for row in data["layers"]])
    k90 = np.array([row["energy_rank_90"] for row in data["layers"]])
    params = np.array([row["params"] for row in data["layers"]])
    assert data["stable_rank_mean"] == pytest.approx(sr.mean())
    assert data["stable_rank_median"] == pytest.approx(np.median(sr))
    assert data["stable_rank_weighted_mean"] == pytest.approx(np.average(sr, weights=params))
    assert data["energy_rank_90_p50"] == pytest.approx(np.percentile(k90, 50))
    assert data["energy_rank_90_p90"] == pytest.approx(np.percentile(k90, 90))
    allowed = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert data["suggested_r_global_median"] == min(8, next(a for a in allowed if a >= np.percentile(k90, 50)))
    assert data["suggested_r_global_90"] == min(8, next(a for a in allowed if a >= np.percentile(k90, 90)))
    g = data["global_rank_suggestions"]["median"]
    assert g["params_at_suggested"] == sum(min(g["r"], row["r"]) * (row["a_shape"][1] + row["b_shape"][0])
                                           for row in data["layers"])
    assert g["reduction_ratio"] == pytest.approx(1 - g["params_at_suggested"] / params.sum())
    # composition: energy shares of delta_frob_norm²
    e = np.array([row["delta_frob_norm"] ** 2 for row in data["layers"]])
    share = np.sort(e / e.sum())[::-1]
    comp = data["composition"]
    assert comp["hhi"] == pytest.approx(np.sum(share ** 2))
    assert comp["top5_share"] == pytest.approx(share[:5].sum())
    assert comp["top10pct_share"] == pytest.approx(share[: int(np.ceil(0.1 * share.size))].sum())
    bt = data["by_type"]
    assert set(bt) == {"attn", "mlp"}
    assert bt["attn"]["n_layers"] + bt["mlp"]["n_layers"] == data["n_layers"]
    mlp_util = [row["utilization"] for row in data["layers"] if row["module_type"] == "mlp"]
    assert bt["mlp"]["utilization_mean"] == pytest.approx(np.mean(mlp_util))


def test_top_singular_values_and_layers_flags(synthetic_adapter_dir: Path) -> None:
    data = audit_json("--peft-dir", str(synthetic_adapter_dir), "--top-singular-values", "2")
    assert all(len(row["singular_values"]) == 2 for row in data["layers"])
    data = audit_json("--peft-dir", str(synthetic_adapter_dir), "--top-singular-values", "2", "--layers")
    assert all(len(row["singular_values"]) == row["r"] for row in data["layers"])
    proc = gradience("audit", "--peft-dir", str(synthetic_adapter_dir), "--layers", "--no-udr")
    assert proc.returncode == 0 and "\nLayers:\n" in proc.stdout
    assert proc.stdout.count("k@90/95/99%=") == data["n_layers"]


def test_bf16_adapter_gives_the_same_spectrum_as_its_upcast_values(synthetic_bf16_adapter_dir: Path) -> None:
    from safetensors import safe_open

    data = audit_json("--peft-dir", str(synthetic_bf16_adapter_dir))
    with safe_open(str(synthetic_bf16_adapter_dir / "adapter_model.safetensors"), "np") as fh:
        header = synthetic.read_safetensors_header(synthetic_bf16_adapter_dir / "adapter_model.safetensors")
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
        del fh
    raw = synthetic_bf16_adapter_dir / "adapter_model.safetensors"
    blob = raw.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    for row in data["layers"][:6]:
        def read(key: str, shape: list[int]) -> np.ndarray:
            start, end = header[key]["data_offsets"]
            bits = np.frombuffer(blob[8 + n + start: 8 + n + end], dtype="<u2").reshape(shape)
            return synthetic.bf16_bits_to_f32(bits).astype(np.float64)
        a = read(row["peft_prefix"] + ".lora_A.weight", row["a_shape"])
        b = read(row["peft_prefix"] + ".lora_B.weight", row["b_shape"])
        s = np.linalg.svd(b @ a, compute_uv=False)[: row["r"]]
        np.testing.assert_allclose(row["singular_values"], s, rtol=0, atol=1e-8 * s[0])


# ---- rank suggestions via the CLI ---------------------------------------------------------------------------
def test_suggest_per_layer_json_is_self_consistent(synthetic_adapter_dir: Path) -> None:
    data = audit_json("--peft-dir", str(synthetic_adapter_dir), "--suggest-per-layer", "--margin", "1.5",
                      "--allowed-ranks", "2,4,8")
    rs = data["rank_suggestions"]
    assert rs["margin"] == 1.5 and rs["allowed_ranks"] == [2, 4, 8]
    k90 = {row["name"]: row["energy_rank_90"] for row in data["layers"]}
    for row in rs["layers"]:
        want = min(8, next((a for a in (2, 4, 8) if a >= 1.5 * k90[row["name"]]), 8))
        assert row["suggested_r"] == want
    from collections import Counter

    counts = Counter(row["suggested_r"] for row in rs["layers"])
    assert counts[rs["default_r"]] == max(counts.values())
    # applying PEFT's matching to rank_pattern reproduces every suggestion
    for row in rs["layers"]:
        r = next((v for k, v in rs["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", row["name"])),
                 rs["default_r"])
        alpha = next((v for k, v in rs["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", row["name"])),
                     rs["lora_alpha"])
        assert r == row["suggested_r"]
        assert alpha / r == pytest.approx(16 / 8)  # scale s unchanged
    assert set(rs["by_type"]) == {"attn", "mlp"}


def test_bad_allowed_ranks_and_margin_are_usage_errors(synthetic_adapter_dir: Path) -> None:
    for extra in (["--allowed-ranks", "2,x"], ["--allowed-ranks", "0,2"], ["--margin", "-1"]):
        proc = gradience("audit", "--peft-dir", str(synthetic_adapter_dir), *extra)
        assert proc.returncode == 2, extra
        assert proc.stderr.startswith("gradience audit: error:") and len(proc.stderr.splitlines()) == 1


# ---- --fail-on ------------------------------------------------------------------------------------------------
def test_fail_on_gates(synthetic_adapter_dir: Path, tmp_path: Path) -> None:
    d = str(synthetic_adapter_dir)
    data = audit_json("--peft-dir", d)
    worst = min(row["utilization"] for row in data["layers"])
    proc = gradience("audit", "--peft-dir", d, "--no-udr", "--fail-on", f"utilization<{worst + 1e-6}")
    assert proc.returncode == 1
    met = [ln for ln in proc.stderr.splitlines() if "fail-on" in ln]
    assert len(met) == 1 and "utilization<" in met[0] and "met by 1 of" in met[0]
    assert "GRADIENCE LoRA AUDIT" in proc.stdout  # the report is still printed
    proc = gradience("audit", "--peft-dir", d, "--no-udr", "--fail-on", f"utilization<{worst - 1e-6},zero_update")
    assert proc.returncode == 0, proc.stderr
    mean = data["utilization_mean"]
    proc = gradience("audit", "--peft-dir", d, "--no-udr", "--json", "--fail-on", f"utilization_mean>={mean - 1e-9}")
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "utilization_mean" in proc.stderr
    json.loads(proc.stdout)
    for bad in ("utilisation<0.2", "bogus_flag", "utilization<<2"):
        proc = gradience("audit", "--peft-dir", d, "--no-udr", "--fail-on", bad)
        assert proc.returncode == 2, bad
        assert proc.stderr.startswith("gradience audit: error: --fail-on") and len(proc.stderr.splitlines()) == 1

    zero = synthetic.write_synthetic_adapter(tmp_path / "zero", layers=1, targets={"q_proj": (16, 16)}, r=4,
                                             alpha=8, zero_b=True)
    proc = gradience("audit", "--peft-dir", str(zero), "--no-udr", "--fail-on", "zero_update")
    assert proc.returncode == 1 and "zero_update" in proc.stderr
    proc = gradience("audit", "--peft-dir", str(zero), "--no-udr", "--fail-on", "issues")
    assert proc.returncode == 1


# ---- --append ---------------------------------------------------------------------------------------------------
def test_append_writes_one_lora_audit_event(synthetic_adapter_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.jsonl"
    proc = gradience("audit", "--peft-dir", str(synthetic_adapter_dir), "--no-udr", "--append", str(run))
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in run.read_text().splitlines() if line.strip()]
    metrics_events = [e for e in events if e["event"] == "metrics"]
    assert len(metrics_events) == 1
    ev = metrics_events[0]
    assert ev["kind"] == "lora_audit" and ev["schema"] == "gradience.vnext.telemetry/v1"
    assert "layers" not in ev["metrics"]
    assert ev["metrics"]["n_layers"] == 28 and ev["metrics"]["schema"] == "gradience.audit/v1"
    # appending to an existing run keeps its run_id and last integer step
    existing = tmp_path / "existing.jsonl"
    existing.write_text(
        json.dumps({"schema": "gradience.vnext.telemetry/v1", "ts": 1.0, "run_id": "run-abc", "event": "train_step",
                    "step": 41, "loss": 1.0}) + "\n")
    proc = gradience("audit", "--peft-dir", str(synthetic_adapter_dir), "--no-udr", "--append", str(existing))
    assert proc.returncode == 0, proc.stderr
    lines = existing.read_text().splitlines()
    assert len(lines) == 2
    last = json.loads(lines[-1])
    assert last["run_id"] == "run-abc" and last["step"] == 41 and last["kind"] == "lora_audit"


# ---- multi-adapter directories ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_multi_adapter_directory(multi_adapter_dir: Path) -> None:
    d = str(multi_adapter_dir)
    proc = gradience("audit", "--peft-dir", d, "--no-udr")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "default" in proc.stderr and "second" in proc.stderr
    data = audit_json("--peft-dir", d, "--adapter-name", "second")
    assert {row["r"] for row in data["layers"]} == {4}
    both = audit_json("--peft-dir", d, "--all")
    assert both["schema"] == "gradience.audit.multi/v1"
    assert set(both["adapters"]) == {"default", "second"}
    assert {row["r"] for row in both["adapters"]["default"]["layers"]} == {8}
    assert both["adapters"]["second"]["schema"] == "gradience.audit/v1"
    text = gradience("audit", "--peft-dir", d, "--all", "--no-udr").stdout
    assert text.count("GRADIENCE LoRA AUDIT") == 2


# ---- bad input: one line on stderr, exit 2, naming the file -----------------------------------------------------
def _adapter_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_inputs(tmp: Path, good: Path) -> list[tuple[str, Path, str]]:
    cases: list[tuple[str, Path, str]] = []
    cases.append(("missing dir", tmp / "does-not-exist", "does-not-exist"))
    no_w = tmp / "no_weights"
    no_w.mkdir()
    shutil.copy(good / "adapter_config.json", no_w / "adapter_config.json")
    cases.append(("no weights", no_w, "no_weights"))

    trunc = _adapter_copy(good, tmp / "truncated")
    w = trunc / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    cases.append(("truncated", trunc, "adapter_model.safetensors"))

    beyond = _adapter_copy(good, tmp / "beyond")
    (beyond / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    cases.append(("header length beyond file", beyond, "adapter_model.safetensors"))

    notjson = _adapter_copy(good, tmp / "notjson")
    (notjson / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json!!!!")
    cases.append(("non-JSON header", notjson, "adapter_model.safetensors"))

    huge = _adapter_copy(good, tmp / "huge")
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4 * 10**18]}}).encode()
    (huge / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    cases.append(("huge claimed sizes", huge, "adapter_model.safetensors"))

    badcfg = _adapter_copy(good, tmp / "badcfg")
    (badcfg / "adapter_config.json").write_text("{ this is not json")
    cases.append(("adapter_config not JSON", badcfg, "adapter_config.json"))

    misfit = tmp / "misfit"
    misfit.mkdir()
    shutil.copy(good / "adapter_config.json", misfit / "adapter_config.json")
    synthetic.write_safetensors(misfit / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 16), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((20, 3), np.float32),
    })
    cases.append(("shapes that don't fit", misfit, "adapter_model.safetensors"))
    return cases


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_2(synthetic_adapter_dir: Path, tmp_path: Path) -> None:
    for label, path, named in _bad_inputs(tmp_path, synthetic_adapter_dir):
        proc = gradience("audit", "--peft-dir", str(path), "--no-udr")
        assert proc.returncode == 2, (label, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (label, proc.stderr)
        assert lines[0].startswith("gradience audit: error:"), (label, lines[0])
        assert named in lines[0], (label, lines[0])
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, label


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_malicious_pickle_bin_is_not_executed(synthetic_adapter_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(synthetic_adapter_dir / "adapter_config.json", d / "adapter_config.json")
    marker = tmp_path / "pwned"
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Exploit(str(marker))}))
    proc = gradience("audit", "--peft-dir", str(d), "--no-udr")
    assert not marker.exists(), "the pickle payload ran"
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradience audit: error:") and "adapter_model.bin" in lines[0]


# ---- light core: audit never imports torch ---------------------------------------------------------------------
def test_audit_does_not_import_heavy_modules(synthetic_adapter_dir: Path) -> None:
    code = (
        "import sys\n"
        "from gradience.cli.main import main\n"
        f"rc = main(['audit', '--peft-dir', {str(synthetic_adapter_dir)!r}, '--json', '--suggest-per-layer'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'scipy', 'peft') if m in sys.modules)\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr
