"""LoRA adapter audit (SPEC §3): exact per-pair spectra from the factors, summary, rank suggestions.

Entry points: :func:`run_audit` on a :class:`~gradience.adapter.model.LoadedAdapter`, and
:func:`audit_state_dict` for in-memory weights (training callbacks). Both return an :class:`AuditResult`
whose ``to_summary(include_layers)`` is the ``gradience.audit/v1`` JSON object. Nothing here prints.
"""

from gradience.audit.core import (
    MULTI_SCHEMA,
    SCHEMA,
    AuditOptions,
    AuditResult,
    LayerAudit,
    audit_pairs,
    audit_state_dict,
    run_audit,
)
from gradience.audit.spectrum import SpectrumMetrics, singular_values, spectrum_metrics

__all__ = [
    "MULTI_SCHEMA",
    "SCHEMA",
    "AuditOptions",
    "AuditResult",
    "LayerAudit",
    "SpectrumMetrics",
    "audit_pairs",
    "audit_state_dict",
    "run_audit",
    "singular_values",
    "spectrum_metrics",
]
