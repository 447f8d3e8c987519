"""UDR/SDI on real checkpoints: tiny models saved with ``save_pretrained`` and real PEFT adapters on them.

Every number is checked against an independent dense computation in the test: ΔW = s·B·A materialized from
the adapter file (read with the ``safetensors`` package, not Gradience's reader), W from the base file, and
numpy's SVD of both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.udr import PER_LAYER_KEYS, SUMMARY_KEYS, UdrInput, measure_udr

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

RTOL = 1e-4


def _codes(issues: list) -> list[str]:
    """Issue codes without ``base_looks_random_init``: the tiny bases built here are random-initialised, so
    that warning is expected on every one of them (test_random_init_warning_fires_on_the_tiny_bases)."""
    return [i.code for i in issues if i.code != "base_looks_random_init"]


# -- independent reference ----------------------------------------------------------------------------------
def _load_all(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (single file or shards) as float64, via safetensors+torch."""
    out: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            out[name] = tensor.to(torch.float64).numpy()
    return out


def reference_deltas(adapter_dir: Path) -> dict[str, np.ndarray]:
    """name -> dense ΔW = s·B·A (d_out, d_in) for every LoRA pair of a (plain, non-pattern) PEFT adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = _load_all(adapter_dir)
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        deltas[prefix.removeprefix("base_model.model.")] = scale * (b @ a)
    assert deltas, f"no LoRA pairs in {adapter_dir}"
    return deltas


def sigma1(m: np.ndarray) -> float:
    return float(np.linalg.svd(m.reshape(m.shape[0], -1), compute_uv=False)[0])


def udr_inputs(deltas: dict[str, np.ndarray]) -> list[UdrInput]:
    return [UdrInput(name, sigma1(d), float(np.linalg.norm(d)), d.shape[0], d.shape[1], "linear")
            for name, d in sorted(deltas.items())]


def check_against_dense(report, deltas: dict[str, np.ndarray], base: dict[str, np.ndarray],
                        base_names: dict[str, str] | None = None) -> None:
    """Every layer's base norms, udr, udr_f, sdi against numpy on the dense matrices."""
    assert report.requested
    assert set(report.per_layer) == set(deltas)
    for name, delta in deltas.items():
        w = base[(base_names or {}).get(name, name + ".weight")]
        row = report.per_layer[name]
        assert row["base_sigma_max"] == pytest.approx(sigma1(w), rel=RTOL), name
        assert row["base_frob_norm"] == pytest.approx(float(np.linalg.norm(w)), rel=1e-6), name
        assert row["udr"] == pytest.approx(sigma1(delta) / sigma1(w), rel=2 * RTOL), name
        assert row["udr_f"] == pytest.approx(float(np.linalg.norm(delta) / np.linalg.norm(w)), rel=1e-5), name
        assert row["sdi"] == pytest.approx(math.log10(sigma1(delta) / sigma1(w)), abs=1e-4), name


@pytest.fixture
def cache_file(tmp_path: Path) -> str:
    return str(tmp_path / "norms_cache.json")


# -- tests ----------------------------------------------------------------------------------------------------
def test_llama_fp32_single_file_against_dense(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                              cache_file: str) -> None:
    deltas = reference_deltas(llama_adapter_dir)
    assert len(deltas) == 14  # 2 layers × 7 targets
    report = measure_udr(udr_inputs(deltas), str(tiny_llama_dir), cache_path=cache_file)
    check_against_dense(report, deltas, _load_all(tiny_llama_dir))
    assert report.base_model == str(tiny_llama_dir)
    assert _codes(report.issues) == []
    # Summary against numpy on the per-layer values (linear-interpolation percentiles, strict fractions).
    udrs = np.array([report.per_layer[n]["udr"] for n in sorted(deltas)])
    sdis = np.log10(udrs + 1e-12)
    s = report.summary
    assert list(s) == list(SUMMARY_KEYS)
    assert s["n_layers_with_udr"] == 14
    assert s["udr_mean"] == pytest.approx(udrs.mean())
    assert s["udr_median"] == pytest.approx(np.median(udrs))
    assert s["udr_p90"] == pytest.approx(np.percentile(udrs, 90))
    assert s["udr_max"] == pytest.approx(udrs.max())
    assert s["fraction_udr_gt_0_1"] == pytest.approx(np.mean(udrs > 0.1))
    assert s["fraction_udr_gt_0_3"] == pytest.approx(np.mean(udrs > 0.3))
    assert s["sdi_mean"] == pytest.approx(sdis.mean())
    assert s["sdi_median"] == pytest.approx(np.median(sdis))
    assert s["sdi_p90"] == pytest.approx(np.percentile(sdis, 90))
    st = report.stats
    assert st["tensors_read"] == 14 and st["cache_hits"] == 0 and st["max_iterations"] >= 1
    # Only the audited tensors were read: 14 of the checkpoint's linear weights, nothing else.
    expected_bytes = sum(_load_all(tiny_llama_dir)[n + ".weight"].size * 4 for n in deltas)
    assert st["bytes_read"] == expected_bytes


def test_fractions_are_strict(tiny_llama_dir: Path, cache_file: str) -> None:
    base = _load_all(tiny_llama_dir)
    name = "model.layers.0.self_attn.q_proj"
    s_w = sigma1(base[name + ".weight"])
    inputs = [UdrInput(name, 0.3 * s_w, 1.0, 32, 32), UdrInput("model.layers.1.self_attn.q_proj",
                                                                  0.3 * sigma1(base["model.layers.1.self_attn.q_proj.weight"]) * 1.01,
                                                                  1.0, 32, 32)]
    report = measure_udr(inputs, str(tiny_llama_dir), cache_path=cache_file)
    udrs = [report.per_layer[i.name]["udr"] for i in inputs]
    assert udrs[0] == pytest.approx(0.3, rel=2e-4)
    # exactly-at-threshold counts only if above: compare with numpy's strict comparison on the same values
    assert report.summary["fraction_udr_gt_0_3"] == pytest.approx(np.mean(np.array(udrs) > 0.3))
    assert report.summary["fraction_udr_gt_0_1"] == 1.0


@pytest.mark.parametrize("fixture_name", ["tiny_llama_sharded_dir", "tiny_llama_bf16_dir"])
def test_sharded_and_bf16_bases(request: pytest.FixtureRequest, llama_adapter_dir: Path, fixture_name: str,
                                cache_file: str) -> None:
    base_dir: Path = request.getfixturevalue(fixture_name)
    if fixture_name.endswith("sharded_dir"):
        assert (base_dir / "model.safetensors.index.json").is_file()
        assert len(list(base_dir.glob("*.safetensors"))) > 1
    deltas = reference_deltas(llama_adapter_dir)
    report = measure_udr(udr_inputs(deltas), str(base_dir), cache_path=cache_file)
    check_against_dense(report, deltas, _load_all(base_dir))
    assert report.stats["tensors_read"] == 14


def test_bf16_adapter_on_bf16_base(llama_adapter_bf16_dir: Path, tiny_llama_bf16_dir: Path, cache_file: str) -> None:
    deltas = reference_deltas(llama_adapter_bf16_dir)
    report = measure_udr(udr_inputs(deltas), str(tiny_llama_bf16_dir), cache_path=cache_file)
    check_against_dense(report, deltas, _load_all(tiny_llama_bf16_dir))


def test_gpt2_conv1d_transposed_base(gpt2_adapter_dir: Path, tiny_gpt2_dir: Path, cache_file: str) -> None:
    deltas = reference_deltas(gpt2_adapter_dir)
    base = _load_all(tiny_gpt2_dir)
    name = "transformer.h.0.attn.c_attn"
    # Conv1D stores (d_in, d_out): the base is the transpose of ΔW's orientation.
    assert base[name + ".weight"].shape == deltas[name].T.shape
    report = measure_udr(udr_inputs(deltas), str(tiny_gpt2_dir), cache_path=cache_file)
    check_against_dense(report, deltas, base)
    assert not [i for i in report.issues if i.code == "base_shape_mismatch"]


def test_distilbert_seqcls_adapter_against_bare_base(distilbert_seqcls_adapter_dir: Path,
                                                     tiny_distilbert_dir: Path, cache_file: str) -> None:
    # Adapter trained on DistilBertForSequenceClassification: names start with "distilbert.";
    # the base checkpoint is the bare DistilBertModel whose tensors have no such prefix.
    deltas = reference_deltas(distilbert_seqcls_adapter_dir)
    assert all(n.startswith("distilbert.") for n in deltas)
    base = _load_all(tiny_distilbert_dir)
    assert not any(k.startswith("distilbert.") for k in base)
    report = measure_udr(udr_inputs(deltas), str(tiny_distilbert_dir), cache_path=cache_file)
    mapping = {n: n.removeprefix("distilbert.") + ".weight" for n in deltas}
    check_against_dense(report, deltas, base, mapping)
    assert report.stats["name_matches"] == mapping
    assert _codes(report.issues) == []


def test_bare_adapter_against_task_head_base(distilbert_adapter_dir: Path, tiny_distilbert_seqcls_dir: Path,
                                             cache_file: str) -> None:
    # The reverse: adapter names lack the wrapper prefix that the base checkpoint's tensors carry.
    deltas = reference_deltas(distilbert_adapter_dir)
    base = _load_all(tiny_distilbert_seqcls_dir)
    report = measure_udr(udr_inputs(deltas), str(tiny_distilbert_seqcls_dir), cache_path=cache_file)
    check_against_dense(report, deltas, base, {n: "distilbert." + n + ".weight" for n in deltas})


def test_hub_cache_layout_and_revision(hf_cache_snapshot: Path, llama_adapter_dir: Path, tiny_llama_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch, cache_file: str) -> None:
    cache_root = hf_cache_snapshot.parents[2]
    revision = hf_cache_snapshot.name
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    deltas = reference_deltas(llama_adapter_dir)
    report = measure_udr(udr_inputs(deltas), "org/tiny-llama", cache_path=cache_file)
    check_against_dense(report, deltas, _load_all(tiny_llama_dir))
    assert report.base_model == f"org/tiny-llama@{revision}"
    assert measure_udr(udr_inputs(deltas), f"org/tiny-llama@{revision}", use_cache=False).summary == report.summary
    # HF_HOME/hub is the fallback when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    hf_home = cache_root.parent / "hf_home_for_udr"
    if not (hf_home / "hub").exists():
        hf_home.mkdir(exist_ok=True)
        (hf_home / "hub").symlink_to(cache_root, target_is_directory=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert measure_udr(udr_inputs(deltas), "org/tiny-llama", use_cache=False).requested
    # An unknown revision or repo of an explicit base is an input error naming what was looked for.
    with pytest.raises(InputError, match="deadbeef"):
        measure_udr(udr_inputs(deltas), "org/tiny-llama@deadbeef", use_cache=False)
    with pytest.raises(InputError, match="models--org--nope"):
        measure_udr(udr_inputs(deltas), "org/nope", use_cache=False)


def test_adapter_hint_used_only_when_local(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    deltas = reference_deltas(llama_adapter_dir)
    hinted = measure_udr(udr_inputs(deltas), None, adapter_base_hint=str(tiny_llama_dir), use_cache=False)
    assert hinted.requested and hinted.summary["n_layers_with_udr"] == 14
    missing = measure_udr(udr_inputs(deltas), None, adapter_base_hint="meta-llama/Llama-2-7b-hf")
    assert not missing.requested and missing.per_layer == {}
    assert _codes(missing.issues) == ["base_model_unresolved"]
    assert missing.issues[0].severity == "info" and "Llama-2-7b-hf" in missing.issues[0].message
    nothing = measure_udr(udr_inputs(deltas), None)
    assert not nothing.requested and nothing.issues[0].code == "base_model_unresolved"


def test_warm_cache_reads_no_base_data_and_stale_cache_recomputes(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                                                   tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base_dir)
    cache = tmp_path / "c" / "norms.json"
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    cold = measure_udr(inputs, str(base_dir), cache_path=str(cache))
    assert cold.stats["tensors_read"] == 14 and cold.stats["cache_hits"] == 0
    assert json.loads(cache.read_text())["schema"] == "gradience.base_norms/v1"
    warm = measure_udr(inputs, str(base_dir), cache_path=str(cache))
    assert warm.stats["tensors_read"] == 0 and warm.stats["bytes_read"] == 0 and warm.stats["cache_hits"] == 14
    assert warm.per_layer == cold.per_layer and warm.summary == cold.summary and _codes(warm.issues) == []
    # Change the base file (new mtime): the cached entries are stale, reported and recomputed.
    weights = base_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    stale = measure_udr(inputs, str(base_dir), cache_path=str(cache))
    assert stale.stats["tensors_read"] == 14
    assert _codes(stale.issues) == ["base_norms_cache_stale"]
    assert stale.per_layer == cold.per_layer
    # use_cache=False neither reads nor writes the cache.
    fresh = measure_udr(inputs, str(base_dir), cache_path=str(tmp_path / "unused.json"), use_cache=False)
    assert fresh.stats["tensors_read"] == 14 and not (tmp_path / "unused.json").exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": "other/v9", "bases": {}}), "[]"])
def test_corrupt_cache_is_reported_and_rewritten(llama_adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path,
                                                 content: str) -> None:
    cache = tmp_path / "norms.json"
    cache.write_text(content)
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    report = measure_udr(inputs, str(tiny_llama_dir), cache_path=str(cache))
    assert _codes(report.issues) == ["base_norms_cache_corrupt"]
    assert report.stats["tensors_read"] == 14 and report.summary["n_layers_with_udr"] == 14
    assert json.loads(cache.read_text())["schema"] == "gradience.base_norms/v1"
    assert measure_udr(inputs, str(tiny_llama_dir), cache_path=str(cache)).stats["tensors_read"] == 0


def test_tampered_cache_values_are_not_trusted(llama_adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "norms.json"
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    cold = measure_udr(inputs, str(tiny_llama_dir), cache_path=str(cache))
    data = json.loads(cache.read_text())
    (entries,) = data["bases"].values()
    first = sorted(entries)[0]
    entries[first]["sigma_max"] = "big"  # wrong type: malformed entry
    cache.write_text(json.dumps(data))
    again = measure_udr(inputs, str(tiny_llama_dir), cache_path=str(cache))
    assert again.stats["tensors_read"] == 1 and again.per_layer == cold.per_layer
    assert _codes(again.issues) == ["base_norms_cache_corrupt"]


def test_default_cache_location_follows_xdg(llama_adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))[:2]
    report = measure_udr(inputs, str(tiny_llama_dir))
    expected = tmp_path / "xdg" / "gradience" / "base_norms.json"
    assert report.stats["cache_path"] == str(expected) and expected.is_file()


def test_missing_ambiguous_and_mismatched_modules_are_issues(tiny_llama_dir: Path, cache_file: str) -> None:
    base = _load_all(tiny_llama_dir)
    good = "model.layers.0.mlp.up_proj"
    inputs = [
        UdrInput(good, 1.0, 2.0, 64, 32),
        UdrInput("model.layers.7.self_attn.q_proj", 1.0, 1.0, 32, 32),        # no such layer
        UdrInput("self_attn.q_proj", 1.0, 1.0, 32, 32),                       # matches every layer: ambiguous
        UdrInput("model.layers.1.mlp.down_proj", 1.0, 1.0, 5, 7),             # wrong shape
        UdrInput("model.layers.1.self_attn.q_proj.bias", 1.0, 1.0, 32, 32),   # only a weight may match
    ]
    report = measure_udr(inputs, str(tiny_llama_dir), cache_path=cache_file)
    codes = {i.code: i for i in report.issues}
    assert set(_codes(report.issues)) == {"base_tensor_missing", "base_tensor_ambiguous", "base_shape_mismatch"}
    assert codes["base_tensor_missing"].modules == ["model.layers.7.self_attn.q_proj",
                                                    "model.layers.1.self_attn.q_proj.bias"]
    assert codes["base_tensor_ambiguous"].modules == ["self_attn.q_proj"]
    assert "model.layers.0.self_attn.q_proj.weight" in codes["base_tensor_ambiguous"].extra["candidates"][
        "self_attn.q_proj"]
    assert codes["base_shape_mismatch"].modules == ["model.layers.1.mlp.down_proj"]
    assert report.summary["n_layers_with_udr"] == 1
    assert report.per_layer[good]["udr"] == pytest.approx(1.0 / sigma1(base[good + ".weight"]), rel=2 * RTOL)
    for name in [i.name for i in inputs[1:]]:
        assert report.per_layer[name] == dict.fromkeys(PER_LAYER_KEYS)


def test_null_update_norms_give_null_udr(tiny_llama_dir: Path, cache_file: str) -> None:
    name = "model.layers.0.self_attn.o_proj"
    report = measure_udr([UdrInput(name, None, None, 32, 32)], str(tiny_llama_dir), cache_path=cache_file)
    row = report.per_layer[name]
    assert row["base_sigma_max"] is not None and row["udr"] is None and row["sdi"] is None
    assert report.summary["n_layers_with_udr"] == 0 and report.summary["udr_median"] is None
    assert "udr_unavailable" in [i.code for i in report.issues]
    zero = measure_udr([UdrInput(name, 0.0, 0.0, 32, 32)], str(tiny_llama_dir), cache_path=cache_file)
    assert zero.per_layer[name]["udr"] == 0.0 and zero.per_layer[name]["sdi"] == pytest.approx(-12.0)


def test_progress_bar_only_on_a_tty(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    measure_udr(inputs, str(tiny_llama_dir), use_cache=False, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # stderr is not a TTY under pytest: no bar


def test_progress_bar_draws_on_a_tty(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    class FakeTty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTty()
    monkeypatch.setattr(sys, "stderr", fake)
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    measure_udr(inputs, str(tiny_llama_dir), use_cache=False, progress=True)
    text = fake.getvalue()
    assert "\r" in text and "14/14" in text and text.endswith("\n")


def test_device_selection_and_torch_products(llama_adapter_dir: Path, tiny_llama_dir: Path) -> None:
    from gradience.udr.spectral import spectral_norm_torch

    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    cpu = measure_udr(inputs, str(tiny_llama_dir), use_cache=False)
    cuda = measure_udr(inputs, str(tiny_llama_dir), use_cache=False, device="cuda")
    if torch.cuda.is_available():
        assert cuda.stats["device"] == "cuda" and _codes(cuda.issues) == []
    else:  # falls back to the CPU and says so
        assert cuda.stats["device"] == "cpu" and _codes(cuda.issues) == ["udr_device_fallback"]
    for name, row in cpu.per_layer.items():
        assert cuda.per_layer[name]["base_sigma_max"] == pytest.approx(row["base_sigma_max"], rel=RTOL)
    with pytest.raises(InputError, match="'cpu' or 'cuda'"):
        measure_udr(inputs, str(tiny_llama_dir), use_cache=False, device="gpu")
    # The torch product path (what runs on a GPU) on a CPU tensor, against dense SVD.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((90, 150)).astype(np.float32)
    assert spectral_norm_torch(torch.from_numpy(w)).sigma_max == pytest.approx(sigma1(w.astype(np.float64)),
                                                                               rel=RTOL)


def test_udr_does_not_import_torch(llama_adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gradience.udr import UdrInput, measure_udr\n"
        f"r = measure_udr([UdrInput('model.layers.0.self_attn.q_proj', 1.0, 1.0, 32, 32)], {str(tiny_llama_dir)!r},"
        f" cache_path={str(tmp_path / 'c.json')!r})\n"
        "assert r.summary['n_layers_with_udr'] == 1, r.issues\n"
        "print(sorted(m for m in ('torch', 'transformers', 'scipy', 'safetensors') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_parallel_workers_match_serial(llama_adapter_dir: Path, tiny_llama_sharded_dir: Path) -> None:
    inputs = udr_inputs(reference_deltas(llama_adapter_dir))
    serial = measure_udr(inputs, str(tiny_llama_sharded_dir), use_cache=False, workers=1)
    parallel = measure_udr(inputs, str(tiny_llama_sharded_dir), use_cache=False, workers=4)
    assert serial.stats["workers"] == 1 and parallel.stats["workers"] == 4
    assert parallel.per_layer == serial.per_layer
    assert parallel.stats["bytes_read"] == serial.stats["bytes_read"] and parallel.stats["tensors_read"] == 14


def test_random_init_warning_fires_on_the_tiny_bases(llama_adapter_dir: Path, tiny_llama_dir: Path,
                                                     cache_file: str) -> None:
    """The tiny test base is random-initialised (σ₁ at the i.i.d. edge): UDR says so next to its numbers."""
    report = measure_udr(udr_inputs(reference_deltas(llama_adapter_dir)), str(tiny_llama_dir), cache_path=cache_file)
    assert [i.code for i in report.issues] == ["base_looks_random_init"]
