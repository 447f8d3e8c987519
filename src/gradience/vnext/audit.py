"""``gradience.vnext.audit``: the reference tool's ``audit_lora_peft_dir`` over this project's audit.

Its docs call ``audit_lora_peft_dir(DIR, base_model_id=..., base_norms_cache=..., include_top_singular_values=K)``
and read ``result.layers``, ``result.config.r`` and ``result.to_summary_dict(include_layers=...)``. Here the
adapter is read by :func:`gradience.adapter.load_adapter` and audited by :func:`gradience.audit.run_audit`
(exact σ from the factors; no torch); the result is that :class:`~gradience.audit.core.AuditResult` with those
two reference spellings added. Its torch-only knobs (``map_location``, ``compute_dtype``, ``eps``) are accepted
and have no effect (float64 Gram products throughout); in-memory ``base_model_weights`` are not supported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from gradience.audit.core import AuditOptions, AuditResult
from gradience.errors import GradienceError


@dataclass
class ReferenceAuditResult(AuditResult):
    """Our audit result, readable the reference's way too."""

    @property
    def config(self) -> SimpleNamespace:
        """The adapter config with attribute access (``result.config.r``, ``.lora_alpha``, ``.target_modules``)."""
        return SimpleNamespace(**{str(k): v for k, v in self.adapter.config.items()})

    def to_summary_dict(self, *, include_layers: bool = False, topk_layers: int | None = None) -> dict[str, Any]:
        """:meth:`to_summary`; ``topk_layers`` keeps that many lowest-utilization rows, as the reference did."""
        summary = self.to_summary(include_layers=include_layers)
        if include_layers and topk_layers is not None:
            summary["layers"] = sorted(summary["layers"], key=lambda row: row["utilization"])[:topk_layers]
        return summary


def audit_lora_peft_dir(peft_dir: str | os.PathLike[str], *, adapter_config_path: str | os.PathLike[str] | None = None,
                        adapter_weights_path: str | os.PathLike[str] | None = None, map_location: str = "cpu",
                        compute_dtype: Any = None, eps: float = 1e-12, include_top_singular_values: int = 0,
                        base_model_id: str | None = None, base_norms_cache: str | os.PathLike[str] | None = None,
                        compute_udr: bool = True, base_model_weights: Any = None) -> ReferenceAuditResult:
    """Audit a PEFT adapter directory (UDR when ``base_model_id`` is given and ``compute_udr``)."""
    from gradience.adapter import load_adapter
    from gradience.audit import run_audit

    if base_model_weights is not None:
        raise GradienceError("base_model_weights (in-memory tensors) is not supported: save the base with "
                             "save_pretrained(DIR) and pass base_model_id=DIR")
    loaded = load_adapter(os.fspath(peft_dir),
                          adapter_config=None if adapter_config_path is None else os.fspath(adapter_config_path),
                          weights=None if adapter_weights_path is None else os.fspath(adapter_weights_path))
    options = AuditOptions(top_singular_values=max(int(include_top_singular_values), 0),
                           udr=bool(compute_udr and base_model_id), base_model=base_model_id,
                           base_norms_cache=None if base_norms_cache is None else os.fspath(base_norms_cache))
    result = run_audit(loaded, options)
    return ReferenceAuditResult(**{f.name: getattr(result, f.name) for f in fields(result)})


__all__ = ["ReferenceAuditResult", "audit_lora_peft_dir"]
