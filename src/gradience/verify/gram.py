"""A merged module's sums without forming the update: ⟨E, s·B·A⟩ through one skinny product (issue 20 item 5).

With E = W_merged − W_base (one subtraction per block, in place), the sums :class:`ModuleSums` needs are

    ‖E‖²            per-row float32 dot products, summed in float64
    ⟨E, D⟩ = s·Σ B ∘ (E·Aᵀ)      one (rows × in) @ (in × r) product per block and an r-wide dot in float64
    ‖D‖²           from the r × r Gram matrices of the factors (merged._frobenius_sq, float64)
    ‖R‖² = ‖E‖² − 2⟨E, D⟩ + ‖D‖²,  ⟨R, D⟩ = ⟨E, D⟩ − ‖D‖²

instead of forming D = s·B·A block by block (a (rows × r) @ (r × in) product, K = r: the least efficient shape
for BLAS), subtracting it and taking ⟨R, R⟩ and ⟨R, D⟩ over the block: two passes and the slower product saved
(measured on one 11008 × 4096 module, one core: 63 → 45 ms of arithmetic, against ~50 ms to read both copies).

The price is cancellation: ‖R‖² is now a difference of sums of the size of ‖D‖², so their errors must be far below
the dtype's rounding floor. One float32 dot over a 128K-element block is off by ~2e-7 relative (a bf16 7B module:
1.2e-3 of ‖R‖², measured); per-row dots (numpy's stacked matmul: one BLAS dot per row, same speed) are off by
~5e-9, and ⟨E, D⟩ through the product by ~1e-9 (both measured against dense float64). For bf16 that leaves ‖R‖
within 1e-3 of the dense value down to an update as large as the weight (the worst case, ‖R‖²/‖D‖² ≈ u²/3; tested),
far inside the factor between a correct merge's residual and the rounding floor. fp16 (u = 2⁻¹¹), fp32/fp64
checkpoints (u = 2⁻²⁴) and DoRA (its update depends on W) keep the direct path of
:func:`gradience.verify.merged._accumulate`.
"""

from __future__ import annotations

import numpy as np

from gradience.verify.blocks import ArrayBlocks, TensorBlocks
from gradience.verify.verdict import ModuleSums

# Merged checkpoints whose rounding floor (u = 2⁻⁸) leaves room for the Gram sums' error; the base may be anything
# (an fp32 or de-quantised 4-bit base's E = W_merged − W_base is off by ~2⁻²⁴ relative, far below u). Not fp16:
# with an update as large as the weight its ‖R‖ came out 10 % high (3.2e-4 against 2.9e-4, floor 3e-3: the
# verdict held, the number did not), so fp16 keeps the direct path.
NARROW_DTYPES = frozenset({"BF16"})
# Blocks of this many times merged.ACCUMULATE_BLOCK_BYTES: two block buffers here against the direct path's three,
# and fewer Python steps per module (whole verify in-process, one thread, 4 interleaved runs: median 1.11 s CPU at
# 512 KiB blocks, 1.01 s at 1 MiB, 1.10 s at 2 MiB).
GRAM_BLOCK_FACTOR = 2


def _sq_sum(x: np.ndarray, scratch: np.ndarray) -> float:
    """Σ x² of a (rows, cols) float32 block: per-row float32 dots summed in float64."""
    out = scratch[: x.shape[0]].reshape(-1, 1, 1)
    np.matmul(x[:, None, :], x[:, :, None], out=out)
    return float(out.sum(dtype=np.float64))


def accumulate_gram(blocks_b: TensorBlocks | ArrayBlocks, blocks_m: TensorBlocks, left: np.ndarray,
                    right: np.ndarray, s: float, dd: float, rows: int) -> ModuleSums:
    """The sums of one plain LoRA module (ΔW as stored = s·left @ right) in blocks of ``rows`` rows."""
    sums = ModuleSums()
    cols = blocks_b.shape[1]
    w_buf = np.empty(rows * cols, np.float32)        # merged block
    e_buf = np.empty_like(w_buf)                     # base block, then E in place
    right_t = np.ascontiguousarray(right.T)          # (cols, r): the product's contiguous operand
    scaled = np.asarray(left, np.float64) * s        # (rows_total, r) in float64: ⟨E, D⟩ consistent with ‖D‖²
    ea = np.empty((rows, right_t.shape[1]), np.float32)
    scratch = np.empty(rows, np.float32)
    ee = ed = 0.0
    for (i, j, wb), (_, _, wm) in zip(blocks_b.blocks(rows, out=e_buf), blocks_m.blocks(rows, out=w_buf),
                                      strict=True):
        e = np.subtract(wm, wb, out=wb)
        ee += _sq_sum(e, scratch)
        sums.mm += _sq_sum(wm, scratch)
        prod = np.matmul(e, right_t, out=ea[: j - i])
        ed += float(np.vdot(scaled[i:j], prod))
        sums.n += (j - i) * cols
    sums.dd = dd
    sums.rd = ed - dd
    sums.rr = ee - 2.0 * ed + dd
    return sums
