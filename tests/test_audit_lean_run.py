"""The audit's lean paths (SPEC §11): bf16 factors converted chunk by chunk inside the Gram pass, mapped pages
dropped after each pair, and the UDR machinery imported only when there is a base to measure. Each must give
exactly what the plain path gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from gradience.adapter import load_adapter
from gradience.audit import run_audit
from gradience.audit.spectrum import factor_gram
from gradience.io.safetensors import SafetensorsFile, bf16_to_f32
from gradience.udr import measure_udr
from gradience.udr.resolve import base_unresolved_issue
from support.synthetic import llama_targets, write_safetensors, write_synthetic_adapter


def test_bf16_gram_chunked_matches_float32_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # d spans several chunks plus a ragged tail; one strided (transposed) view as the loader produces it.
    a = rng.standard_normal((16, 5000)).astype(np.float32)
    b = rng.standard_normal((7000, 16)).astype(np.float32) * 1e-3
    path = write_safetensors(tmp_path / "f.safetensors", {"a": a, "b": b, "bt": b.T.copy()}, dtype="BF16")
    sf = SafetensorsFile(path)
    for name, rows in (("a", True), ("b", False)):
        bits = sf.read_raw(name)
        assert bits.dtype == np.uint16
        want = factor_gram(bf16_to_f32(bits), rows=rows)
        got = factor_gram(bits, rows=rows, bf16=True)
        assert np.array_equal(got.g, want.g) and got.exp == want.exp and got.finite
    strided = sf.read_raw("bt").T
    want = factor_gram(bf16_to_f32(strided), rows=False)
    assert np.array_equal(factor_gram(strided, rows=False, bf16=True).g, want.g)
    # Independent check: the Gram of the rounded values, dense in float64.
    dense = bf16_to_f32(sf.read_raw("a")).astype(np.float64)
    np.testing.assert_allclose(factor_gram(sf.read_raw("a"), rows=True, bf16=True).g, dense @ dense.T, rtol=1e-12)


def test_bf16_gram_extreme_and_non_finite_factors(tmp_path: Path) -> None:
    huge = np.full((4, 40000), 3e38, dtype=np.float32)  # near the bf16 maximum: large but finite in float64
    nan = np.ones((4, 40000), dtype=np.float32)
    nan[2, 7] = np.nan
    path = write_safetensors(tmp_path / "g.safetensors", {"huge": huge, "nan": nan}, dtype="BF16")
    sf = SafetensorsFile(path)
    for name in ("huge", "nan"):
        bits = sf.read_raw(name)
        want = factor_gram(bf16_to_f32(bits), rows=True)
        got = factor_gram(bits, rows=True, bf16=True)
        assert got.finite == want.finite and got.exp == want.exp
        assert np.array_equal(got.g, want.g, equal_nan=True)
    assert not factor_gram(sf.read_raw("nan"), rows=True, bf16=True).finite


def test_release_drops_pages_and_data_reads_back(tmp_path: Path) -> None:
    a = np.arange(300000, dtype=np.float32).reshape(3, 100000)
    sf = SafetensorsFile(write_safetensors(tmp_path / "r.safetensors", {"a": a, "b": a[:1] * 2}))
    first = sf.read("a").copy()
    sf.release("a")
    sf.release("b")  # never read: still fine
    assert np.array_equal(sf.read("a"), first) and np.array_equal(first, a)
    assert np.array_equal(sf.read("b"), a[:1] * 2)


def test_audit_of_bf16_adapter_equals_in_memory_float32_audit(tmp_path: Path) -> None:
    """The file path (bf16 bits, chunked, pages released) against an in-memory float32 state dict of the same
    values (no bits, no mapping): every number identical."""
    out = write_synthetic_adapter(tmp_path / "ad", layers=2, targets=llama_targets(64, 172, 32), r=8, alpha=16,
                                  dtype="BF16", seed=5)
    loaded = load_adapter(out)
    on_disk = run_audit(loaded).to_summary()
    sf = SafetensorsFile(out / "adapter_model.safetensors")
    tensors = {k: bf16_to_f32(sf.read_raw(k)).copy() for k in sf.tensors}
    from gradience.audit import audit_state_dict

    in_memory = audit_state_dict(tensors, loaded.config).to_summary()
    assert [r["singular_values"] for r in on_disk["layers"]] == [r["singular_values"] for r in in_memory["layers"]]
    assert on_disk["utilization_mean"] == in_memory["utilization_mean"] and on_disk["n_layers"] == 14


def test_unresolved_hint_needs_no_measure_import(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from gradience.udr import measure_udr\n"
        "r = measure_udr([], None, adapter_base_hint=sys.argv[1])\n"
        "print(json.dumps([r.requested, [i.to_dict() for i in r.issues], 'gradience.udr.measure' in sys.modules,"
        " 'concurrent.futures' in sys.modules]))\n"
    )
    missing = str(tmp_path / "no-such-base")
    proc = subprocess.run([sys.executable, "-c", code, missing], capture_output=True, text=True, check=True)
    requested, issues, measure_loaded, pool_loaded = json.loads(proc.stdout)
    assert requested is False and measure_loaded is False and pool_loaded is False
    # Same text as the measuring module gives for the same hint (one copy of it).
    from gradience.udr.measure import measure_udr as full

    assert issues == [i.to_dict() for i in full([], None, adapter_base_hint=missing).issues]
    assert issues[0]["code"] == "base_model_unresolved" and "no-such-base" in issues[0]["message"]
    none = measure_udr([], None)
    assert none.issues[0].to_dict() == base_unresolved_issue(None).to_dict() and not none.requested
    assert set(none.summary) and all(v is None for v in none.summary.values())


def test_cli_json_run_skips_render_gates_and_udr_machinery(tmp_path: Path) -> None:
    out = write_synthetic_adapter(tmp_path / "ad", layers=1, targets=llama_targets(32, 64, 16), r=4, alpha=8)
    # Modules the interpreter already holds at start-up (a site .pth may import certifi, hence tempfile) are
    # not ours: only what the audit run itself imports counts.
    code = ("import sys\nstartup = set(sys.modules)\nfrom gradience.cli.main import main\n"
            "rc = main(['audit', '--peft-dir', sys.argv[1], '--json'])\n"
            "mods = [m for m in ('gradience.audit.gates', 'gradience.udr.measure', 'concurrent.futures', 'tempfile')"
            " if m in sys.modules and m not in startup]\nprint('MODS', mods, rc, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["schema"] == "gradience.audit/v1"
    assert "MODS [] 0" in proc.stderr
