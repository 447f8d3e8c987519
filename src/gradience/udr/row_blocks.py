"""Stored matrices streamed as float32 row blocks, and the implicit operators (diagonal scalings plus a low-rank
term) over them: what lets UDR take norms of weights larger than memory without densifying anything."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

# Row (or column) chunk of W per fused product: small enough to stay in cache between Wᵢ X and Wᵢᵀ(...).
CHUNK_BYTES = 2 * 1024 * 1024
# Float64 temporaries per block in the exact (Frobenius, DoRA row-norm) passes of streamed matrices.
F64_BLOCK_BYTES = 256 * 1024


class RowBlocks:
    """A stored 2-D matrix read in row blocks as float32, converted block by block.

    ``raw`` is the tensor as stored (typically a memory map): float32 blocks are zero-copy views, bf16 (given as
    its uint16 bits, ``bf16=True``), fp16 and fp64 blocks are converted into one reusable buffer. Peak memory is
    one block, never the float32 copy of the whole tensor (6.4 GB for a 40000×40000 bf16 weight).
    """

    def __init__(self, raw: np.ndarray, *, bf16: bool = False, block_bytes: int = CHUNK_BYTES) -> None:
        if raw.ndim != 2:
            raise ValueError(f"RowBlocks needs a 2-D array, got shape {raw.shape}")
        self.raw = raw
        self.bf16 = bf16
        self.shape: tuple[int, int] = (int(raw.shape[0]), int(raw.shape[1]))
        self.rows_per_block = max(1, block_bytes // (4 * max(1, self.shape[1])))
        self._buf: np.ndarray | None = None

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, float32 block of rows start:stop); a block is valid until the next one is produced."""
        return self.blocks()

    def blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Like iteration, with a smaller block when the caller makes float64 temporaries of each block."""
        p, q = self.shape
        step = min(self.rows_per_block, rows_per_block or self.rows_per_block)
        for a in range(0, p, step):
            b = min(p, a + step)
            chunk = self.raw[a:b]
            if chunk.dtype == np.float32 and not self.bf16:
                yield a, b, chunk
                continue
            if self._buf is None:
                self._buf = np.empty(min(self.rows_per_block, p) * q, np.float32)
            out = self._buf[: (b - a) * q].reshape(b - a, q)
            if self.bf16:
                np.left_shift(chunk, 16, out=out.view(np.uint32), dtype=np.uint32)
            else:
                np.copyto(out, chunk, casting="unsafe")
            yield a, b, out


class BlockOperator:
    """Δ = diag(left)·S·diag(right) + U·V over a row-streamed stored matrix S (p×q); every factor optional.

    Plain S is the base weight itself. The DoRA effective update ΔW_eff = diag(d−1)·W + diag(s·d)·B·A has this
    form with W = S (left = d−1, U = diag(s·d)·B, V = A) or, for weights stored transposed, Δᵀ = S·diag(d−1) +
    Aᵀ·(Bᵀ·diag(s·d)). Products run in float32 like :func:`spectral_norm`; the Frobenius norm is exact, in float64.
    """

    def __init__(self, rows: RowBlocks, *, left: np.ndarray | None = None, right: np.ndarray | None = None,
                 u: np.ndarray | None = None, v: np.ndarray | None = None) -> None:
        p, q = rows.shape
        if (u is None) != (v is None):
            raise ValueError("BlockOperator needs both U and V, or neither")
        if u is not None and v is not None and (u.shape[0] != p or v.shape[1] != q or u.shape[1] != v.shape[0]):
            raise ValueError(f"low-rank part {u.shape}·{v.shape} does not fit S {rows.shape}")
        self.rows = rows
        self.shape = (p, q)
        self.left64 = None if left is None else np.asarray(left, np.float64).reshape(p)
        self.right64 = None if right is None else np.asarray(right, np.float64).reshape(q)
        self.u64 = None if u is None else np.asarray(u, np.float64)
        self.v64 = None if v is None else np.asarray(v, np.float64)
        self.left = None if left is None else self.left64.astype(np.float32)[:, None]  # type: ignore[union-attr]
        self.right = None if right is None else self.right64.astype(np.float32)[:, None]  # type: ignore[union-attr]
        self.u = None if u is None else self.u64.astype(np.float32)  # type: ignore[union-attr]
        self.v = None if v is None else self.v64.astype(np.float32)  # type: ignore[union-attr]

    def _adjoint_pass(self, y: np.ndarray) -> np.ndarray:
        """Δᵀy (y: p×k float32) in one pass over S."""
        z = np.zeros((self.shape[1], y.shape[1]), np.float32)
        acc = None if self.u is None else np.zeros((self.u.shape[1], y.shape[1]), np.float32)
        for a, b, blk in self.rows:
            yb = y[a:b]
            z += blk.T @ (yb * self.left[a:b] if self.left is not None else yb)
            if acc is not None and self.u is not None:
                acc += self.u[a:b].T @ yb
        if self.right is not None:
            z *= self.right
        if acc is not None and self.v is not None:
            z += self.v.T @ acc
        return z

    def _forward_block(self, a: int, b: int, blk: np.ndarray, t: np.ndarray, vx: np.ndarray | None) -> np.ndarray:
        y = blk @ t
        if self.left is not None:
            y *= self.left[a:b]
        if vx is not None and self.u is not None:
            y += self.u[a:b] @ vx
        return y

    def gram_cols(self, x: np.ndarray) -> np.ndarray:
        """ΔᵀΔ·x on the q side (x: q×k), fused: each block of S is used for both products while in cache."""
        x32 = x.astype(np.float32)
        t = x32 * self.right if self.right is not None else x32
        vx = None if self.v is None else self.v @ x32
        z = np.zeros_like(x32)
        acc = None if self.u is None else np.zeros((self.u.shape[1], x32.shape[1]), np.float32)
        for a, b, blk in self.rows:
            y = self._forward_block(a, b, blk, t, vx)
            z += blk.T @ (y * self.left[a:b] if self.left is not None else y)
            if acc is not None and self.u is not None:
                acc += self.u[a:b].T @ y
        if self.right is not None:
            z *= self.right
        if acc is not None and self.v is not None:
            z += self.v.T @ acc
        return z.astype(np.float64)

    def gram_rows(self, y: np.ndarray) -> np.ndarray:
        """ΔΔᵀ·y on the p side (y: p×k): two passes over S (Δᵀy, then Δ of it)."""
        w = self._adjoint_pass(y.astype(np.float32))
        t = w * self.right if self.right is not None else w
        vw = None if self.v is None else self.v @ w
        out = np.empty((self.shape[0], y.shape[1]), np.float32)
        for a, b, blk in self.rows:
            out[a:b] = self._forward_block(a, b, blk, t, vw)
        return out.astype(np.float64)

    def frobenius(self) -> float:
        """‖Δ‖_F exactly (float64 per block, one pass)."""
        total = 0.0
        for a, b, blk in self.rows.blocks(_f64_rows(self.shape[1])):
            e = blk.astype(np.float64)
            if self.left64 is not None:
                e *= self.left64[a:b, None]
            if self.right64 is not None:
                e *= self.right64[None, :]
            if self.u64 is not None and self.v64 is not None:
                e += self.u64[a:b] @ self.v64
            total += float(np.einsum("ij,ij->", e, e))
        return math.sqrt(total)


def _f64_rows(cols: int) -> int:
    """Rows per block for passes that hold float64 copies of a block (two or three at a time): ~256 KB each."""
    return max(1, F64_BLOCK_BYTES // (8 * max(1, cols)))


def frobenius_norm_blocks(rows: RowBlocks) -> float:
    """‖S‖_F of a row-streamed matrix with float64 accumulation (one pass)."""
    total = 0.0
    for _a, _b, blk in rows.blocks(_f64_rows(rows.shape[1])):
        flat = blk.reshape(-1).astype(np.float64)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)
