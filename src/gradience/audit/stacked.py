"""Grams of every expert of one stacked MoE parameter (PEFT ``target_parameters``) at once.

Why: a Qwen3-30B-A3B expert adapter has 12,288 expert pairs; sent one by one through the per-pair Gram pass
(:func:`gradience.audit.spectrum.pair_grams`) each costs ~1 ms of Python and small-array overhead, 11x the time to
read the file. Here the E experts of one stacked parameter cost a few batched float64 matmuls from one read of
the stack; the result is the same :class:`FactorGram` per expert (same float64 Gram up to summation order), which
then goes through the one spectrum path (:func:`gradience.audit.spectrum.singular_values_many`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradience.audit.spectrum import _SAFE_EXP, FactorGram, factor_gram
from gradience.io.safetensors import bf16_to_f32

# Stacked (MoE expert) Grams convert about this many factor elements to float64 at a time (1 MiB of float64):
# large enough that each BLAS call has work, small enough that the buffers stay in cache and are reused.
_STACK_CHUNK_ELEMS = 1 << 17


def _to_f64(x: np.ndarray, bf16: bool, u32: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` (float, or bf16 bits) written as float64 into ``out`` (x's shape, any strides: a transposing view
    of a buffer is how B's layout is changed during the conversion itself); bf16 goes through the reused uint32
    buffer ``u32`` (x's shape). Exact, and no fresh allocation per chunk."""
    out[...] = bf16_to_f32(x, u32.view(np.float32)) if bf16 else x
    return out


def _stacked_grams(a: np.ndarray, b: np.ndarray, a_bf16: bool, b_bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """(G_A (E, r, r), G_B (E, r, r)) in float64 of a (E, r, d_in) and b (d_out, r, E).

    A: chunks of whole experts (contiguous rows), one batched ``A_e·A_eᵀ`` per chunk (an expert wider than a
    chunk is taken in column blocks, so the float64 buffer stays bounded whatever d_in). B: expert e's slice is
    every E-th column of the stored (d_out, r·E) factor, so B is taken in chunks of rows, each converted into a
    (rows, E, r) buffer (a transpose inside each row only, cache-resident), where every expert's (rows, r)
    block is a BLAS-ready strided matrix; ``G_B`` accumulates ``B_eᵀ·B_e`` over the row chunks. The buffer's
    rows are padded by one cache line: a power-of-two row pitch (E·r·8 bytes) made the strided matmul ~2x
    slower through cache-set conflicts.
    """
    n_exp, r, d_in = a.shape
    d_out = b.shape[0]
    ga = np.zeros((n_exp, r, r))
    gb = np.zeros((n_exp, r, r))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # checked per expert by the caller
        cols = max(1, min(d_in, _STACK_CHUNK_ELEMS // max(1, r)))
        step = max(1, min(n_exp, _STACK_CHUNK_ELEMS // max(1, r * cols)))
        buf, u32 = np.empty((step, r, cols)), np.empty((step, r, cols), np.uint32)
        for lo in range(0, n_exp, step):
            k = min(n_exp, lo + step) - lo
            for c0 in range(0, d_in, cols):
                w = min(d_in, c0 + cols) - c0
                x = _to_f64(a[lo:lo + k, :, c0:c0 + w], a_bf16, u32[:k, :, :w], buf[:k, :, :w])
                if w == d_in:
                    np.matmul(x, np.swapaxes(x, 1, 2), out=ga[lo:lo + k])
                else:
                    ga[lo:lo + k] += np.matmul(x, np.swapaxes(x, 1, 2))
        step = max(1, min(d_out, _STACK_CHUNK_ELEMS // max(1, r * n_exp)))
        padded, u32 = np.empty((step, n_exp * r + 8)), np.empty((step, n_exp, r), np.uint32)
        for lo in range(0, d_out, step):
            k = min(d_out, lo + step) - lo
            x = padded[:k, : n_exp * r].reshape(k, n_exp, r)
            if b_bf16:  # the transpose on the 4-byte bits, the float64 write contiguous
                np.left_shift(b[lo:lo + k], 16, out=np.swapaxes(u32[:k], 1, 2), dtype=np.uint32)
                x[...] = u32[:k].view(np.float32)
            else:
                x[...] = np.swapaxes(b[lo:lo + k], 1, 2)
            gb += np.matmul(x.transpose(1, 2, 0), x.transpose(1, 0, 2))
    return ga, gb


def _stack_checked(g: np.ndarray, factor: Callable[[int], np.ndarray], *, rows: bool,
                   bf16: bool) -> list[FactorGram]:
    """One :class:`FactorGram` per expert from a stack of plain Grams: the ones :func:`_safe_gram` would
    redo (non-finite, overflowed or underflowed, zero) go through :func:`factor_gram` on the expert's own slice,
    so that every expert's Gram is the one the per-pair path computes."""
    g = 0.5 * (g + np.swapaxes(g, 1, 2))
    with np.errstate(over="ignore", invalid="ignore"):
        tr = np.trace(g, axis1=1, axis2=2)
    redo = ~np.isfinite(tr) | (tr < 2.0 ** -_SAFE_EXP)
    out = [FactorGram(m) for m in g]
    for e in np.flatnonzero(redo).tolist():
        out[e] = factor_gram(factor(e), rows=rows, bf16=bf16)
    return out


def stacked_pair_grams(a: np.ndarray, b: np.ndarray, *, a_bf16: bool = False,
                       b_bf16: bool = False) -> list[tuple[FactorGram, FactorGram]]:
    """:func:`pair_grams` of every expert of one stacked MoE parameter at once: a is (E, r, d_in) (expert e's A
    is ``a[e]``), b is (d_out, r, E) (expert e's B is ``b[:, :, e]``), as PEFT's ``ParamWrapper`` stores them
    reshaped. Batched float64 matmuls over chunks of experts instead of 2·E Python-level Gram passes; the
    rare expert whose Gram needs a power-of-two rescale (or is zero) is redone alone by the per-pair code.
    ``*_bf16``: that stack is given as bf16 bits (uint16)."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[2] or a.shape[1] != b.shape[1]:
        raise ValueError(f"stacked factors {a.shape} / {b.shape} are not (E, r, d_in) / (d_out, r, E)")
    ga, gb = _stacked_grams(a, b, a_bf16, b_bf16)
    fa = _stack_checked(ga, lambda e: a[e], rows=True, bf16=a_bf16)
    fb = _stack_checked(gb, lambda e: b[:, :, e], rows=False, bf16=b_bf16)
    return list(zip(fa, fb, strict=True))
