"""One base tensor's share of the UDR measurement: a single read gives its norms and the effective norms of the
DoRA layers on it; plus where (CPU / CUDA) and on how many threads those reads run."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from math import prod

import numpy as np

from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import UDR_SIGMA_RTOL
from gradience.udr import UdrInput
from gradience.udr.base import BaseTensorInfo, BaseWeights
from gradience.udr.cache import CachedNorms
from gradience.udr.layout import _stored_transposed
from gradience.udr.row_blocks import BlockOperator, RowBlocks, frobenius_norm_blocks
from gradience.udr.spectral import (
    DoraEffective,
    SpectralNorm,
    dora_effective_norms,
    frobenius_norm,
    spectral_norm,
    spectral_norm_operator,
)

# Parallel tensors: each worker holds one float32 copy of its tensor (180 MB for 7B MLP shapes, 940 MB for 70B).
MAX_WORKERS = 4


@dataclass
class _TensorOutcome:
    norms: CachedNorms | None                      # None when the cache already had them
    dora: dict[str, DoraEffective | str]           # input name -> norms, or why they could not be computed
    t_read: float
    t_sigma: float
    streamed: bool


def _streams(info: BaseTensorInfo, stream_min_bytes: int) -> bool:
    """Convert-once needs a float32 copy of the tensor; above the limit it is streamed block by block instead."""
    return info.dtype not in ("F32", "float32") and 4 * prod(info.shape) > stream_min_bytes


def _compute_tensor(weights: BaseWeights, info: BaseTensorInfo, device: str, need_base: bool,
                    dora_inputs: list[UdrInput], stream_min_bytes: int) -> _TensorOutcome:
    """Base norms (when ``need_base``) and the DoRA effective norms of ``dora_inputs``, from one read of the tensor.

    A tensor small enough is converted to float32 once (bf16/fp16 -> one reusable buffer per thread); a larger
    one is streamed, so peak memory is a few MB whatever the tensor's size.
    """
    t0 = time.perf_counter()
    streamed = _streams(info, stream_min_bytes)
    mat: np.ndarray | None = None
    if streamed:
        rows = weights.row_blocks(info.name)
    else:
        arr = weights.read_f32(info.name)
        mat = arr.reshape(arr.shape[0], -1) if arr.ndim != 2 else arr
        rows = RowBlocks(mat)
    norms: CachedNorms | None = None
    t_read = t_sigma = 0.0
    finite = True
    if need_base:
        # first pass over the data: also what pages a memory-mapped F32 tensor in
        frob = frobenius_norm_blocks(rows) if mat is None else frobenius_norm(mat)
        t_read = time.perf_counter() - t0
        if not math.isfinite(frob):
            norms, finite = CachedNorms(math.nan, frob, UDR_SIGMA_RTOL, 0), False
        else:
            t1 = time.perf_counter()
            result: SpectralNorm
            if mat is None:
                result = spectral_norm_operator(BlockOperator(rows))
            else:
                result = _spectral_cuda(mat) if device == "cuda" else spectral_norm(mat)
            t_sigma = time.perf_counter() - t1
            norms = CachedNorms(result.sigma_max, frob, result.rel_error_bound if result.converged else 1.0,
                                result.iterations)
    else:
        t_read = time.perf_counter() - t0
    dora: dict[str, DoraEffective | str] = {}
    t2 = time.perf_counter()
    for inp in dora_inputs:
        if not finite:
            dora[inp.name] = "the base weight contains NaN/Inf"
            continue
        if inp.dora_loader is None:
            dora[inp.name] = "its magnitude vector is missing or misshapen"
            continue
        a, b, m = inp.dora_loader()
        eff = dora_effective_norms(rows, transposed=_stored_transposed(inp, info.shape), a=a, b=b,
                                   scale=inp.scale, magnitude=m)
        if not (math.isfinite(eff.sigma_max) and math.isfinite(eff.frob_norm)):
            dora[inp.name] = ("W + s·B·A has a zero row norm or non-finite values, so m ⊙ (W + s·B·A)/‖W + s·B·A‖ "
                              "is undefined")
        else:
            dora[inp.name] = eff
    t_sigma += time.perf_counter() - t2
    return _TensorOutcome(norms, dora, t_read, t_sigma, streamed)


def _spectral_cuda(mat: np.ndarray) -> SpectralNorm:
    import torch

    from gradience.udr.spectral import spectral_norm_torch

    return spectral_norm_torch(torch.from_numpy(np.ascontiguousarray(mat, dtype=np.float32)).cuda())


def _select_device(requested: str) -> tuple[str, Issue | None]:
    """"cpu", or "cuda" when torch sees a CUDA device (else the CPU, with an info issue saying so)."""
    if requested not in ("cpu", "cuda"):
        raise InputError(f"UDR device must be 'cpu' or 'cuda', not {requested!r} (GRADIENCE_UDR_DEVICE)")
    if requested == "cpu":
        return "cpu", None
    try:
        import torch

        available = bool(torch.cuda.is_available())
    except ImportError:
        available = False
    if available:
        return "cuda", None
    return "cpu", Issue("udr_device_fallback", "UDR on 'cuda' was requested but torch with a CUDA device is not "
                        "available; base norms were computed on the CPU", "info")


def _workers(n_tasks: int, requested: int | None) -> int:
    if requested is None:
        env = os.environ.get("GRADIENCE_UDR_WORKERS", "")
        requested = int(env) if env.isdigit() and int(env) > 0 else min(os.cpu_count() or 1, MAX_WORKERS)
    return max(1, min(requested, n_tasks))
