"""Base tensors too large to convert at once (SPEC §4, issue 9: 40000×40000 bf16 needs 6.4 GB as float32).

Above ``UDR_STREAM_MIN_BYTES`` a non-float32 base tensor is streamed: ‖W‖_F and every σ₁ product convert one
row block at a time from the memory map. The tests lower the threshold so a moderately large tensor (67 MB as
float32) takes that path, and bound the Python-visible peak memory with tracemalloc (numpy reports its buffers
there); the same tensor through the convert-once path shows the bound would catch a full float32 copy.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gradience.udr import UdrInput
from gradience.udr.measure import measure_udr
from gradience.udr.spectral import BlockOperator, RowBlocks, frobenius_norm_blocks, spectral_norm_operator
from support.synthetic import bf16_bits_to_f32, f32_to_bf16_bits, write_safetensors

NAME = "model.layers.0.mlp.down_proj"
ROWS, COLS = 65536, 256          # stored (d_out, d_in): 33.5 MB as bf16, 67 MB as float32
F32_BYTES = 4 * ROWS * COLS


@pytest.fixture(scope="module")
def big_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A bf16 base with one large tensor: a clear rank-3 structure plus noise (a gap, so σ₁ converges fast)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((ROWS, COLS), dtype=np.float32)
    w *= 0.02
    u = rng.standard_normal((ROWS, 3), dtype=np.float32) / np.sqrt(ROWS)
    v = rng.standard_normal((3, COLS), dtype=np.float32) / np.sqrt(COLS)
    w += (u * np.array([40.0, 20.0, 10.0], np.float32)) @ v
    base = tmp_path_factory.mktemp("big_base")
    write_safetensors(base / "model.safetensors", {NAME + ".weight": w}, dtype="BF16")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return base, f32_to_bf16_bits(w)


def _reference(bits: np.ndarray) -> tuple[float, float]:
    w = bf16_bits_to_f32(bits)
    gram = w.T.astype(np.float64) @ w.astype(np.float64)
    return float(np.sqrt(np.linalg.eigvalsh(gram)[-1])), float(np.sqrt(np.trace(gram)))


def _measure_peak(base: Path, stream_min_bytes: int, inputs: list[UdrInput]) -> tuple[dict, dict, int]:
    tracemalloc.start()
    try:
        report = measure_udr(inputs, str(base), use_cache=False, workers=1, stream_min_bytes=stream_min_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return report.per_layer[NAME], report.stats, peak


def test_streamed_tensor_has_bounded_memory_and_exact_norms(big_base: tuple[Path, np.ndarray]) -> None:
    base, bits = big_base
    inp = UdrInput(NAME, delta_sigma_max=1.0, delta_frob_norm=2.0, d_out=ROWS, d_in=COLS)
    row, stats, peak = _measure_peak(base, 1 << 20, [inp])
    assert stats["streamed_tensors"] == [NAME + ".weight"]
    assert peak < 0.25 * F32_BYTES, f"streamed peak {peak / 1e6:.1f} MB"
    sigma, frob = _reference(bits)
    assert row["base_sigma_max"] == pytest.approx(sigma, rel=2e-4)
    assert row["base_frob_norm"] == pytest.approx(frob, rel=1e-9)
    assert row["udr"] == pytest.approx(1.0 / sigma, rel=2e-4)

    # The default path converts the tensor once: its peak holds the whole float32 copy (what the bound catches).
    row_once, stats_once, peak_once = _measure_peak(base, 1 << 40, [inp])
    assert stats_once["streamed_tensors"] == [] and peak_once >= F32_BYTES
    assert row_once["base_sigma_max"] == pytest.approx(row["base_sigma_max"], rel=2e-4)


def test_streamed_dora_effective_update_has_bounded_memory(big_base: tuple[Path, np.ndarray]) -> None:
    """DoRA on a streamed base: the row norms of W + s·B·A and the operator products stream as well."""
    base, bits = big_base
    rng = np.random.default_rng(1)
    a = (0.05 * rng.standard_normal((4, COLS))).astype(np.float32)
    b = (0.05 * rng.standard_normal((ROWS, 4))).astype(np.float32)
    s = 2.0
    w = bf16_bits_to_f32(bits).astype(np.float64)
    full = w + s * (b.astype(np.float64) @ a)
    norms = np.linalg.norm(full, axis=1)
    m = norms * (1.0 + 0.1 * rng.standard_normal(ROWS))
    dense = (m / norms)[:, None] * full - w
    gram = dense.T @ dense
    want_sigma, want_frob = float(np.sqrt(np.linalg.eigvalsh(gram)[-1])), float(np.sqrt(np.trace(gram)))
    del w, full, dense, gram
    inp = UdrInput(NAME, delta_sigma_max=None, delta_frob_norm=None, d_out=ROWS, d_in=COLS, dora=True,
                   dora_loader=lambda: (a, b, m), scale=s)
    row, stats, peak = _measure_peak(base, 1 << 20, [inp])
    assert stats["dora_effective"] == 1 and stats["streamed_tensors"] == [NAME + ".weight"]
    # Inputs a, b, m are the caller's (allocated before tracing); the effective update's work stays small.
    assert peak < 0.25 * F32_BYTES, f"streamed DoRA peak {peak / 1e6:.1f} MB"
    assert row["dora_eff_sigma_max"] == pytest.approx(want_sigma, rel=1e-3)
    assert row["dora_eff_frob_norm"] == pytest.approx(want_frob, rel=1e-9)
    assert row["udr"] == pytest.approx(row["dora_eff_sigma_max"] / row["base_sigma_max"], rel=1e-12)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (1, 50), (50, 1)])
def test_block_operator_on_bf16_rows_matches_dense_svd(shape: tuple[int, int]) -> None:
    """Tall (fused ΔᵀΔ) and wide (two-pass ΔΔᵀ) stored matrices, many small blocks, against numpy's SVD."""
    rng = np.random.default_rng(shape[0])
    bits = f32_to_bf16_bits(rng.standard_normal(shape).astype(np.float32))
    w = bf16_bits_to_f32(bits).astype(np.float64)
    rows = RowBlocks(bits, bf16=True, block_bytes=4 * shape[1] * 3)
    assert rows.rows_per_block == 3
    assert frobenius_norm_blocks(rows) == pytest.approx(float(np.linalg.norm(w)), rel=1e-12)
    result = spectral_norm_operator(BlockOperator(rows))
    assert result.converged
    assert result.sigma_max == pytest.approx(float(np.linalg.svd(w, compute_uv=False)[0]), rel=2e-4)
