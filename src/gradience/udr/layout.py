"""How a base weight is laid out relative to its LoRA update ΔW (does the shape fit, is it stored transposed):
one set of rules for the UDR, verify and the intruder measurement."""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradience.udr import UdrInput


def _fits(kind: str, shape: tuple[int, ...], d_out: int, d_in: int) -> bool:
    """Does the base weight have the shape of ΔW? GPT-2 Conv1D and embeddings store the transpose
    (norms are transpose-invariant); a conv weight (out, in, kh, kw) is compared flattened like its ΔW."""
    if len(shape) == 2:
        return shape in ((d_out, d_in), (d_in, d_out))
    if kind == "conv" and len(shape) >= 3:
        return shape[0] == d_out and prod(shape[1:]) == d_in
    return False


def _stored_transposed(inp: UdrInput, shape: tuple[int, ...]) -> bool:
    """Is the base weight stored as (d_in, d_out) relative to ΔW (d_out, d_in)? Embeddings always are
    (num_embeddings, dim); a square linear weight is when the adapter says ``fan_in_fan_out`` (GPT-2 Conv1D)."""
    if inp.kind == "conv" or len(shape) != 2:
        return False
    plain, flipped = shape == (inp.d_out, inp.d_in), shape == (inp.d_in, inp.d_out)
    if inp.kind == "embedding":
        return flipped
    return inp.fan_in_fan_out if (plain and flipped) else flipped


# Public names for verify (issue 20), which resolves adapted weights exactly as the UDR does.
weight_fits = _fits
stored_transposed = _stored_transposed
