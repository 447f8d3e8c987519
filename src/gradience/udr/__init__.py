"""UDR / SDI: how large a LoRA update is relative to the base weight it modifies.

``udr`` = ‖ΔW‖₂ / ‖W_base‖₂ and ``udr_f`` = ‖ΔW‖_F / ‖W_base‖_F, ``sdi`` = log10(udr). The audit supplies the
update norms (computed from the factors); this package resolves the base checkpoint locally, reads only the
audited base tensors from its safetensors shards and computes their norms (cached on disk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience.issues import Issue

__all__ = ["PER_LAYER_KEYS", "SUMMARY_KEYS", "UdrInput", "UdrReport", "measure_udr"]

# Summary keys (SPEC §4), in output order.
SUMMARY_KEYS: tuple[str, ...] = (
    "udr_mean", "udr_median", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3",
    "sdi_mean", "sdi_median", "sdi_p90", "n_layers_with_udr",
)
# Per-layer keys each row of ``UdrReport.per_layer`` carries. ``dora_eff_*``: norms of a DoRA layer's effective
# weight change m ⊙ (W + s·B·A)/‖W + s·B·A‖ − W (null for plain LoRA, and for DoRA without a usable base).
PER_LAYER_KEYS: tuple[str, ...] = ("base_sigma_max", "base_frob_norm", "udr", "udr_f", "sdi",
                                   "dora_eff_sigma_max", "dora_eff_frob_norm")


@dataclass
class UdrInput:
    """One audited module: its base-model name and the (scaled) norms of its LoRA update."""

    name: str                      # base-model module path, e.g. "model.layers.5.self_attn.q_proj"
    delta_sigma_max: float | None  # |s|·σ1(BA)
    delta_frob_norm: float | None  # |s|·‖BA‖_F
    d_out: int
    d_in: int
    kind: str = "linear"           # "linear" | "embedding" | "conv"
    # DoRA: UDR then comes from the effective update, which needs (A, B, m) and the scale s; ``dora_loader`` returns
    # A (r, d_in), B (d_out, r), m (d_out,). A DoRA input without a loader (magnitude missing) gets no UDR.
    dora: bool = False
    dora_loader: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    scale: float = 1.0
    # A square linear base weight fits ΔW both ways; ``fan_in_fan_out`` (GPT-2 Conv1D) says it is stored (d_in, d_out).
    fan_in_fan_out: bool = False


@dataclass
class UdrReport:
    """Result of :func:`measure_udr`; ``per_layer`` is keyed by ``UdrInput.name``."""

    requested: bool
    base_model: str | None
    per_layer: dict[str, dict[str, float | None]] = field(default_factory=dict)
    summary: dict[str, float | int | None] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def measure_udr(
    layers: list[UdrInput],
    base_model: str | None,
    *,
    adapter_base_hint: str | None = None,
    cache_path: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    device: str | None = None,
    workers: int | None = None,
) -> UdrReport:
    """UDR/SDI of each layer against the base model.

    ``base_model``: a local checkpoint directory or a hub id[@revision] in the local Hugging Face cache; an
    explicit base that cannot be resolved raises ``InputError``. When None, ``adapter_base_hint`` (the adapter
    config's ``base_model_name_or_path``) is used only if it resolves locally; otherwise the report has
    ``requested=False`` and an info issue. ``cache_path``: the base-norms cache file (default under the user
    cache dir); ``use_cache=False`` neither reads nor writes it. ``progress``: draw a bar on stderr when it is
    a TTY. ``device``: "cpu" or "cuda" (default: $GRADIENCE_UDR_DEVICE or cpu). ``workers``: tensors processed
    in parallel (default: $GRADIENCE_UDR_WORKERS or the CPU count, at most 4).
    """
    if not base_model:
        # The common case of a plain `gradience audit`: the config's hint does not resolve. Say so without
        # importing the measuring machinery (thread pool, caches, spectral code: ~20 ms of imports).
        from gradience.udr.resolve import resolve_hint

        found = resolve_hint(adapter_base_hint)
        if isinstance(found, Issue):
            return UdrReport(requested=False, base_model=None, summary=dict.fromkeys(SUMMARY_KEYS),
                             issues=[found])
    from gradience.udr.measure import measure_udr as _impl

    return _impl(layers, base_model, adapter_base_hint=adapter_base_hint, cache_path=cache_path,
                 use_cache=use_cache, progress=progress, device=device, workers=workers)
