"""What ``compress`` decided and wrote: options, one :class:`LayerPlan` per module, and the
:class:`CompressResult` whose ``to_dict()`` is the ``gradience.compress/v1`` document (SPEC §12).

Kept apart from the planning and writing code so that ``merge`` and ``report`` can use the result types without
importing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.compress.policy import Policy
from gradience.issues import Issue
from gradience.policy.thresholds import COMPRESS_SCALE_RTOL

SCHEMA = "gradience.compress/v1"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
REPORT_NAME = "compress.json"
DTYPE_CHOICES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class CompressOptions:
    policy: Policy
    dtype: str = "keep"
    base_model: str | None = None
    base_norms_cache: str | None = None
    dry_run: bool = False
    force: bool = False
    # {engine: version} the portability verdict assumes (e.g. {"vllm": "0.10.2"}); default: current releases.
    engine_versions: dict[str, str] = field(default_factory=dict)
    # Output layout (issue 21): "peft" or "mlx"; None = the input's (gradience.compress.formats).
    format: str | None = None


@dataclass
class LayerPlan:
    """One module: what compress decided and what it costs in accuracy (relative, unscaled-invariant)."""

    name: str
    peft_prefix: str
    module_type: str
    kind: str
    dora: bool
    r_before: int
    r_after: int
    d_in: int
    d_out: int
    action: str                      # "truncated" | "kept" | "padded"
    energy_retained: float | None
    rel_frob_error: float | None
    rel_spectral_error: float | None
    coef: float                      # s·k/α: the factor scale change the output config needs
    method: str | None = None        # "gram" | "qr" (truncated), "copy" | "rescale" (kept / padded)
    pair: LoraPair | None = field(default=None, repr=False)
    sigma: np.ndarray | None = field(default=None, repr=False)  # the audit's σ (unscaled), None if non-finite
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return self.r_before * (self.d_in + self.d_out)

    @property
    def params_after(self) -> int:
        return self.r_after * (self.d_in + self.d_out)

    @property
    def verbatim(self) -> bool:
        """Kept at its rank with no scale change: its stored bytes are copied."""
        return self.action == "kept" and abs(self.coef - 1.0) <= COMPRESS_SCALE_RTOL

    def to_row(self) -> dict[str, Any]:
        row = {"name": self.name, "peft_prefix": self.peft_prefix, "module_type": self.module_type,
               "kind": self.kind, "dora": self.dora, "r_before": self.r_before, "r_after": self.r_after,
               "action": self.action, "method": self.method, "energy_retained": self.energy_retained,
               "rel_frob_error": self.rel_frob_error, "rel_spectral_error": self.rel_spectral_error,
               "params_before": self.params_before, "params_after": self.params_after}
        row.update(self.extra)
        return row


@dataclass
class CompressResult:
    """Everything compress decided and wrote; ``to_dict`` is the ``gradience.compress/v1`` document."""

    loaded: LoadedAdapter
    options: CompressOptions
    layers: list[LayerPlan]
    out_config: dict[str, Any]
    portability: dict[str, dict[str, Any]]
    issues: list[Issue]
    source_sha256: str
    out_dir: str | None
    written: bool = False
    dtype_out: dict[str, int] = field(default_factory=dict)
    non_lora: dict[str, Any] = field(default_factory=dict)
    dora: dict[str, Any] | None = None
    udr: dict[str, Any] | None = None
    out_format: str = "peft"         # the layout written (gradience.compress.formats)
    weights_name: str = WEIGHTS_NAME

    def summary(self) -> dict[str, Any]:
        before = sum(la.params_before for la in self.layers)
        after = sum(la.params_after for la in self.layers)
        energies = [la.energy_retained for la in self.layers if la.energy_retained is not None]
        frob = [la.rel_frob_error for la in self.layers if la.rel_frob_error is not None]
        return {
            "n_layers": len(self.layers),
            "n_truncated": sum(la.action == "truncated" for la in self.layers),
            "n_kept": sum(la.action == "kept" for la in self.layers),
            "n_padded": sum(la.action == "padded" for la in self.layers),
            "params_before": before,
            "params_after": after,
            "reduction_ratio": None if before <= 0 else 1.0 - after / before,
            "energy_retained_min": min(energies) if energies else None,
            "energy_retained_mean": (sum(energies) / len(energies)) if energies else None,
            "rel_frob_error_max": max(frob) if frob else None,
            "ranks_after": sorted(set(la.r_after for la in self.layers)),
        }

    def to_dict(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "schema": SCHEMA,
            "source": {"path": loaded.peft_dir, "adapter_name": loaded.adapter_name,
                       "adapter_config_path": loaded.adapter_config_path,
                       "weights_path": loaded.adapter_weights_path, "sha256": self.source_sha256},
            "output": {"path": self.out_dir, "written": self.written, "dry_run": self.options.dry_run,
                       "dtype": self.options.dtype, "tensor_dtypes": dict(self.dtype_out),
                       "weights": self.weights_name, "config": CONFIG_NAME, "format": self.out_format},
            "policy": self.options.policy.to_dict(),
            "config": {key: self.out_config.get(key) for key in
                       ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                        "target_modules", "modules_to_save")},
            "layers": [la.to_row() for la in self.layers],
            "summary": self.summary(),
            "portability": self.portability,
            "non_lora_tensors": self.non_lora,
            "dora": self.dora,
            "udr": self.udr,
            "issues": [issue.to_dict() for issue in self.issues],
        }
