"""One LoRA pair → its :class:`LayerAudit` row: the Gram pass, the exact spectrum and the metrics.

Split from :mod:`gradience.audit.core` (which re-exports every name here) so that the per-pair measurement that
compress, compare, merge and series reuse reads apart from the audit's options, summary and issues.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradience.adapter.experts import expert_stack
from gradience.adapter.model import LoraPair
from gradience.audit.spectrum import (
    FactorGram,
    SpectrumMetrics,
    pair_grams,
    singular_values_many,
    spectrum_metrics,
    spectrum_metrics_many,
)
from gradience.audit.stacked import stacked_pair_grams
from gradience.modules import classify_module, layer_index
from gradience.udr import PER_LAYER_KEYS

# SPEC §4 per-layer keys, owned by gradience.udr: rows always carry them (null without a base model).
UDR_ROW_KEYS: tuple[str, ...] = PER_LAYER_KEYS

LayerStatus = Literal["ok", "zero_update", "non_finite"]


@dataclass
class LayerAudit:
    """One audited LoRA pair: identity, shapes, σ vector and the metrics derived from it."""

    name: str
    peft_prefix: str
    module_type: str
    layer: int | None
    kind: str
    dora: bool
    r: int
    alpha: float | None
    scale: float
    d_in: int
    d_out: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    status: LayerStatus
    singular_values: np.ndarray | None = None   # unscaled, descending, length r; None when non-finite
    out_of_range: bool = False                  # finite factors whose σ exceeds float64: norms null, ranks kept
    frob_norm: float | None = None
    sigma_max: float | None = None
    delta_frob_norm: float | None = None
    delta_sigma_max: float | None = None
    stable_rank: float | None = None
    utilization: float | None = None
    effective_rank: float | None = None
    energy_rank_90: int | None = None
    energy_rank_95: int | None = None
    energy_rank_99: int | None = None
    udr: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(UDR_ROW_KEYS))
    intruders: dict[str, Any] | None = None     # gradience.intruders.ROW_KEYS, only with --intruders
    expert: int | None = None                   # MoE expert LoRA: expert index (row keys only for expert rows)
    num_experts: int | None = None
    parameter: str | None = None
    energy_share: float | None = None           # share of Σ‖ΔW_e‖² over its parameter's experts (audit/experts.py)
    adapted: bool | None = None                 # False: zero or negligible expert update

    @property
    def params(self) -> int:
        return self.r * (self.d_in + self.d_out)

    def to_row(self, top_singular_values: int | None = None) -> dict[str, Any]:
        sv: list[float] | None = None
        if self.singular_values is not None:
            vec = self.singular_values if top_singular_values is None else self.singular_values[:top_singular_values]
            sv = vec.tolist()  # Python floats in one C call (this runs once per row of every JSON output)
        row: dict[str, Any] = {
            "name": self.name, "peft_prefix": self.peft_prefix, "module_type": self.module_type,
            "layer": self.layer, "kind": self.kind, "dora": self.dora, "r": self.r, "alpha": self.alpha,
            "scale": self.scale, "params": self.params, "a_shape": list(self.a_shape),
            "b_shape": list(self.b_shape), "status": self.status,
            "frob_norm": self.frob_norm, "sigma_max": self.sigma_max,
            "delta_frob_norm": self.delta_frob_norm, "delta_sigma_max": self.delta_sigma_max,
            "delta_fro_norm": self.delta_frob_norm,  # the reference tool's spelling: saved audits stay comparable
            "stable_rank": self.stable_rank, "utilization": self.utilization,
            "effective_rank": self.effective_rank, "energy_rank_90": self.energy_rank_90,
            "energy_rank_95": self.energy_rank_95, "energy_rank_99": self.energy_rank_99,
            "singular_values": sv,
        }
        udr = self.udr  # as built (UDR_ROW_KEYS, in order): taken whole, not key by key (12k rows on an MoE)
        row.update(udr if tuple(udr) == UDR_ROW_KEYS else {key: udr.get(key) for key in UDR_ROW_KEYS})
        row["base_fro_norm"] = row["base_frob_norm"]  # the reference tool's spelling
        if self.intruders is not None:
            row.update(self.intruders)
        if self.expert is not None:
            row.update(expert=self.expert, num_experts=self.num_experts, parameter=self.parameter,
                       energy_share=self.energy_share, adapted=self.adapted)
        return row


def _layer_from_pair(pair: LoraPair, sigma: np.ndarray, *, out_of_range: bool = False,
                     metrics: SpectrumMetrics | None = None,
                     identity: tuple[str, int | None] | None = None) -> LayerAudit:
    """``out_of_range``: σ is given scaled by a power of two because the true σ exceeds float64; only the
    scale-free metrics (ranks, utilization) are kept, the norms stay null. ``metrics``: σ's
    :func:`spectrum_metrics` when the caller computed them batched (σ is then finite); ``identity``: the
    name's (module type, layer index) when the caller already classified it."""
    module_type, layer_no = identity or (classify_module(pair.name), layer_index(pair.name))
    layer = LayerAudit(
        name=pair.name, peft_prefix=pair.peft_prefix, module_type=module_type,
        layer=layer_no, kind=pair.kind, dora=pair.dora, r=pair.r, alpha=pair.alpha,
        scale=pair.scale, d_in=pair.d_in, d_out=pair.d_out, a_shape=tuple(pair.a_shape),
        b_shape=tuple(pair.b_shape), status="ok", expert=pair.expert, num_experts=pair.num_experts,
        parameter=pair.parameter,
    )
    if metrics is None and not np.isfinite(sigma).all():
        layer.status = "non_finite"
        return layer
    m = metrics if metrics is not None else spectrum_metrics(sigma, pair.r)
    s = abs(pair.scale)
    layer.status = "zero_update" if m.sigma_max == 0.0 else "ok"
    layer.out_of_range = out_of_range
    if not out_of_range:
        layer.singular_values = sigma
        layer.frob_norm, layer.sigma_max = m.frob_norm, m.sigma_max
        layer.delta_frob_norm, layer.delta_sigma_max = s * m.frob_norm, s * m.sigma_max
    layer.stable_rank, layer.utilization, layer.effective_rank = m.stable_rank, m.utilization, m.effective_rank
    layer.energy_rank_90, layer.energy_rank_95, layer.energy_rank_99 = (
        m.energy_rank_90, m.energy_rank_95, m.energy_rank_99)
    return layer


def _single_threaded_blas() -> AbstractContextManager[object]:
    """Tiny r×r LAPACK calls run several times slower multi-threaded (SPEC §11). The CLI pins BLAS to one
    thread before numpy loads; library callers (a training process, a notebook) get the same through the
    loaded BLAS's own thread setter (:func:`gradience.blas.limited_blas_threads`), restored on exit."""
    if os.environ.get("OPENBLAS_NUM_THREADS") == "1" and os.environ.get("OMP_NUM_THREADS") == "1":
        return nullcontext()
    from gradience.blas import limited_blas_threads

    return limited_blas_threads(1)


def _grams_once(pair: LoraPair) -> tuple[FactorGram, FactorGram]:
    """A pair's two Grams from one pass over its data (bf16 converted chunk by chunk); its mapped pages are
    dropped afterwards, so peak memory is the interpreter plus one pair, not the whole file (SPEC §11)."""
    (a, a_bf16), (b, b_bf16) = pair.load_factors_for_gram()
    grams = pair_grams(a, b, a_bf16=a_bf16, b_bf16=b_bf16)
    del a, b
    pair.release()
    return grams


def audit_pairs(pairs: Sequence[LoraPair], *,
                grams_out: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[LayerAudit]:
    """Spectrum and metrics of every pair (reads each pair's factors once; a second time, for a thin product,
    only for a pair with a rank-deficient factor or one steep in a rotated basis).

    ``grams_out``: when given, receives each pair's float64 (G_A, G_B), so that compress can split the factors
    without reading them a second time.
    """
    with _single_threaded_blas():
        grams = _all_grams(pairs)
        if grams_out is not None:
            grams_out.extend((ga.unscaled(), gb.unscaled()) for ga, gb in grams)
        overflow: dict[int, int] = {}
        sigmas, _ = singular_values_many(grams, _Reload(pairs), overflow)
        metrics = _batched_metrics(pairs, sigmas, overflow)
        identity = _Identity()
        layers = [_layer_from_pair(pair, sigma, out_of_range=i in overflow, metrics=metrics.get(i),
                                   identity=identity(pair))
                  for i, (pair, sigma) in enumerate(zip(pairs, sigmas, strict=True))]
    return layers


class _Identity:
    """(module type, layer index) of each pair, classified once per stacked expert parameter: an expert name is
    its parameter's name plus ``[e]``, a suffix that no branch of :func:`classify_module` or
    :func:`layer_index` can see (no leaf set holds a bracket; the index only joins ``<container>.<N>``
    segments before the leaf), so every expert of a parameter gets what the first one got."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int | None]] = {}

    def __call__(self, pair: LoraPair) -> tuple[str, int | None]:
        key = pair.name.rpartition("[")[0] if pair.expert is not None else None
        if key is not None and key in self._seen:
            return self._seen[key]
        found = (classify_module(pair.name), layer_index(pair.name))
        if key is not None:
            self._seen[key] = found
        return found


def _all_grams(pairs: Sequence[LoraPair]) -> list[tuple[FactorGram, FactorGram]]:
    """Every pair's Grams. MoE expert pairs of one stacked parameter are measured together, from one read of
    the stack (:func:`stacked_pair_grams`), whose pages are dropped before the next stack: memory holds one
    stacked parameter at a time, and the E experts cost a few batched matmuls instead of 2·E Gram passes."""
    stacks: dict[int, list[tuple[FactorGram, FactorGram]]] = {}
    out: list[tuple[FactorGram, FactorGram]] = []
    for pair in pairs:
        found = expert_stack(pair)
        if found is None:
            out.append(_grams_once(pair))
            continue
        group, expert = found
        done = stacks.get(id(group))
        if done is None:
            (a, a_bf16), (b, b_bf16) = group.stacks_for_gram()
            done = stacks[id(group)] = stacked_pair_grams(a, b, a_bf16=a_bf16, b_bf16=b_bf16)
            del a, b
            group.release()
        out.append(done[expert])
    return out


class _Reload:
    """Pair i's factors read again (the second read of the spectrum pass, for a rank-deficient or steep factor).
    The pass asks in pair order, so an expert stack is converted once for all its experts that need it and
    dropped when the next stack is asked for: never more than one stack's float copy alive, and no cache left
    in the reader afterwards."""

    def __init__(self, pairs: Sequence[LoraPair]) -> None:
        self.pairs = pairs
        self._group: object = None
        self._stack: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[i]
        found = expert_stack(pair)
        if found is None:
            return pair.load_factors()
        group, expert = found
        if self._stack is None or group is not self._group:
            self._group, self._stack = group, None
            self._stack = group.float_stacks()
        a, b = self._stack
        return a[expert * group.r:(expert + 1) * group.r], b[expert]


def _batched_metrics(pairs: Sequence[LoraPair], sigmas: Sequence[np.ndarray],
                     overflow: dict[int, int]) -> dict[int, SpectrumMetrics]:
    """:func:`spectrum_metrics_many` for the finite σ vectors, batched by rank (pair index -> metrics)."""
    by_rank: dict[tuple[int, int], list[int]] = {}
    for i, (pair, sigma) in enumerate(zip(pairs, sigmas, strict=True)):
        if i not in overflow and sigma.ndim == 1 and np.isfinite(sigma).all():
            by_rank.setdefault((pair.r, sigma.shape[0]), []).append(i)
    out: dict[int, SpectrumMetrics] = {}
    for (r, _), idx in by_rank.items():
        out.update(zip(idx, spectrum_metrics_many(np.stack([sigmas[i] for i in idx]), r), strict=True))
    return out
