"""The audit as a library: ``run_audit(loaded, options) -> AuditResult`` and its JSON summary (SPEC §3).

Each pair's factors are read once (zero-copy from the memory map), reduced to two float64 r×r Grams and
dropped; the eigen-solves and the SVDs of the r×r cores then run batched over pairs of equal rank. Only a
pair with a rank-deficient factor (or one steep in a rotated basis) is read a second time, for a thin product
over the data (see :mod:`gradience.audit.spectrum`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience import stats
from gradience.adapter.config import mutated_base_init
from gradience.adapter.model import LoadedAdapter, LoraPair, NonLoraTensors
from gradience.audit.composition import composition
from gradience.audit.experts import annotate_experts, expert_summary
from gradience.audit.layers import (  # noqa: F401  (re-exported: the per-pair measurement lived here)
    UDR_ROW_KEYS,
    LayerAudit,
    LayerStatus,
    _grams_once,
    _layer_from_pair,
    _single_threaded_blas,
    audit_pairs,
)
from gradience.audit.suggest import global_suggestion, per_layer_suggestions
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.modules import MODULE_TYPES
from gradience.policy.thresholds import (
    ALLOWED_RANKS_DEFAULT,
    SUGGEST_MARGIN_DEFAULT,
    TOP_WASTEFUL_TEXT_DEFAULT,
)
from gradience.quant.residual import qlora_block, trained_on_4bit
from gradience.textfmt import safe_text
from gradience.udr import SUMMARY_KEYS

SCHEMA = "gradience.audit/v1"
MULTI_SCHEMA = "gradience.audit.multi/v1"

# SPEC §4 keys, owned by gradience.udr. Summary keys are always present (null without a base model) so
# scripts reading them never KeyError; rows always carry the per-layer keys.
UDR_SUMMARY_KEYS: tuple[str, ...] = SUMMARY_KEYS

@dataclass
class AuditOptions:
    """What to compute beyond the always-present summary. ``base_model``/``udr`` drive the UDR seam."""

    top_wasteful: int | None = None          # add ``top_wasteful`` (N rows of lowest utilization)
    top_singular_values: int | None = None   # rows carry only the top-K σ (all when None)
    suggest_per_layer: bool = False
    margin: float = SUGGEST_MARGIN_DEFAULT
    allowed_ranks: tuple[int, ...] = ALLOWED_RANKS_DEFAULT
    udr: bool = False                        # try UDR (with base_model, else the adapter's own base hint)
    base_model: str | None = None
    base_norms_cache: str | None = None
    progress: bool = False
    # An explicit ``base_model`` that cannot be resolved: InputError when True (compare, report); when False the
    # audit stands with UDR "not computed" and a warning issue (``gradience audit`` without --require-udr, the
    # reference tool's behaviour that scripts rely on).
    base_required: bool = True
    # Intruder dimensions (issue 23): a gradience.intruders.IntruderOptions, or None (not computed).
    intruders: Any = None
    # QLoRA merge residual (issue 21): with a 16-bit base, ‖W₁₆ − deq(Q(W₁₆))‖ / ‖s·B·A‖ per layer
    # (gradience.quant.residual); also computed when the config's base name says it was a 4-bit base.
    qlora: bool = False


@dataclass
class AuditResult:
    """Everything an audit found; ``to_summary`` renders the SPEC §3.2 JSON object."""

    adapter: LoadedAdapter
    layers: list[LayerAudit]
    options: AuditOptions
    issues: list[Issue] = field(default_factory=list)
    udr_requested: bool = False
    udr_base_model: str | None = None
    udr_summary: dict[str, Any] = field(default_factory=dict)
    udr_stats: dict[str, Any] = field(default_factory=dict)
    intruder_summary: dict[str, Any] | None = None   # issue 23 keys, only when intruders were requested
    intruder_stats: dict[str, Any] = field(default_factory=dict)
    qlora: dict[str, Any] | None = None                # the qlora block (gradience.quant.residual.qlora_block)

    # -- summary pieces --------------------------------------------------------------------------
    def adapter_r(self) -> int:
        r = self.adapter.config.get("r")
        pair_max = max((layer.r for layer in self.layers), default=0)
        return max(pair_max, int(r)) if isinstance(r, int) and not isinstance(r, bool) else pair_max

    def _adapter_block(self) -> dict[str, Any]:
        cfg = self.adapter.config
        keys = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
                "base_model_name_or_path", "peft_type", "task_type")
        block = {key: cfg.get(key) for key in keys}
        block["use_dora"] = bool(cfg.get("use_dora")) or any(layer.dora for layer in self.layers)
        if block["r"] is None and self.layers:
            block["r"] = self.adapter_r()
        return block

    def _by_type(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        by_type: dict[str, list[LayerAudit]] = {}
        for layer in self.layers:  # one pass (an MoE adapter has 12k rows), then MODULE_TYPES' order
            by_type.setdefault(layer.module_type, []).append(layer)
        for mtype in MODULE_TYPES:
            sel = by_type.get(mtype)
            if not sel:
                continue
            k90 = [layer.energy_rank_90 for layer in sel]
            out[mtype] = {
                "n_layers": len(sel),
                "params": sum(layer.params for layer in sel),
                "stable_rank_mean": stats.mean(layer.stable_rank for layer in sel),
                "utilization_mean": stats.mean(layer.utilization for layer in sel),
                "energy_rank_90_p50": stats.percentile(k90, 50.0),
                "energy_rank_90_p90": stats.percentile(k90, 90.0),
            }
        return out

    def _composition(self) -> dict[str, Any]:
        """How concentrated the update energy (Σ delta_frob_norm²) is across layers and blocks."""
        return composition(self.layers)

    def wasteful(self, n: int) -> list[LayerAudit]:
        """The n rows of lowest utilization (ties: by name), non-finite rows excluded, and never-adapted MoE
        experts too: they have no update to waste rank on (a coverage fact, in the ``experts`` block)."""
        import heapq

        rated = [layer for layer in self.layers if layer.utilization is not None and layer.adapted is not False]
        return heapq.nsmallest(max(0, n), rated, key=lambda la: (la.utilization, la.name))

    def to_summary(self, include_layers: bool = True) -> dict[str, Any]:
        """The SPEC §3.2 summary (insertion order is the JSON key order)."""
        layers = self.layers
        opts = self.options
        sr = [la.stable_rank for la in layers]
        k90 = [la.energy_rank_90 for la in layers]
        dsm = [la.delta_sigma_max for la in layers]
        dfn = [la.delta_frob_norm for la in layers]
        adapter_r = self.adapter_r()
        g50 = global_suggestion(layers, opts.allowed_ranks, adapter_r, 50.0)
        g90 = global_suggestion(layers, opts.allowed_ranks, adapter_r, 90.0)
        params = [la.params for la in layers]
        total_params = sum(params)
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "peft_dir": self.adapter.peft_dir,
            "adapter_name": self.adapter.adapter_name,
            "adapter_config_path": self.adapter.adapter_config_path,
            "adapter_weights_path": self.adapter.adapter_weights_path,
            "adapter": self._adapter_block(),
            "total_lora_params": total_params,
            "n_layers": len(layers),
            "n_layers_zero_update": sum(la.status == "zero_update" for la in layers),
            "n_layers_non_finite": sum(la.status == "non_finite" for la in layers),
            "stable_rank_mean": stats.mean(sr),
            "stable_rank_median": stats.median(sr),
            "stable_rank_weighted_mean": stats.weighted_mean(sr, params),
            "effective_rank_mean": stats.mean(la.effective_rank for la in layers),
            "utilization_mean": stats.mean(la.utilization for la in layers),
            "energy_rank_90_p50": stats.percentile(k90, 50.0),
            "energy_rank_90_p90": stats.percentile(k90, 90.0),
            "delta_sigma_max_scaled_mean": stats.mean(dsm),
            "delta_sigma_max_scaled_p50": stats.percentile(dsm, 50.0),
            "delta_sigma_max_scaled_p90": stats.percentile(dsm, 90.0),
            "delta_frob_norm_scaled_mean": stats.mean(dfn),
            "delta_frob_norm_scaled_p50": stats.percentile(dfn, 50.0),
            "delta_frob_norm_scaled_p90": stats.percentile(dfn, 90.0),
            "by_type": self._by_type(),
            "suggested_r_global_median": g50["r"],
            "suggested_r_global_90": g90["r"],
            "global_rank_suggestions": {
                "allowed_ranks": list(opts.allowed_ranks), "adapter_r": adapter_r,
                "params_current": total_params, "median": g50, "p90": g90,
            },
            "composition": self._composition(),
        }
        experts = expert_summary(layers)
        if experts is not None:
            out["experts"] = experts
        if self.qlora is not None:
            out["qlora"] = self.qlora
        out["udr_requested"] = self.udr_requested
        out["udr_base_model"] = self.udr_base_model
        for key in UDR_SUMMARY_KEYS:
            out[key] = self.udr_summary.get(key)
        if self.intruder_summary is not None:
            out.update(self.intruder_summary)
            out["intruder_stats"] = self.intruder_stats
        non_lora: NonLoraTensors = self.adapter.non_lora
        out["non_lora_tensors"] = {"count": non_lora.count, "params": non_lora.params,
                                   "names": list(non_lora.names)}
        out["issues"] = [issue.to_dict() for issue in self.issues]
        if include_layers:
            out["layers"] = [la.to_row(opts.top_singular_values) for la in layers]
        if opts.top_wasteful is not None:
            out["top_wasteful"] = [la.to_row(opts.top_singular_values) for la in self.wasteful(opts.top_wasteful)]
        if opts.suggest_per_layer:
            use_rslora = bool(self.adapter.config.get("use_rslora", False))
            out["rank_suggestions"] = per_layer_suggestions(layers, opts.allowed_ranks, opts.margin, use_rslora)
        return out


def layer_issues(layers: Sequence[LayerAudit], non_lora: NonLoraTensors) -> list[Issue]:
    issues: list[Issue] = []
    zero = [la.name for la in layers if la.status == "zero_update"]
    if zero:
        experts = sum(1 for la in layers if la.status == "zero_update" and la.expert is not None)
        # an MoE expert left at B = 0 was never routed to, not an adapter saved untrained: said apart
        why = ("e.g. an adapter saved before training" if experts < len(zero) else
               "MoE experts never routed to in training, see expert_never_adapted")
        if 0 < experts < len(zero):
            why += f"; {experts} of them MoE experts, see expert_never_adapted"
        issues.append(Issue(
            "zero_update",
            f"{len(zero)} of {len(layers)} LoRA {'pair has' if len(zero) == 1 else 'pairs have'} a zero update "
            f"(B or A all zeros, {why}); their metrics are 0",
            "warning", modules=zero))
    bad = [la.name for la in layers if la.status == "non_finite"]
    if bad:
        issues.append(Issue(
            "non_finite_weights",
            f"{len(bad)} LoRA {'pair contains' if len(bad) == 1 else 'pairs contain'} NaN or Inf factors; "
            "their metrics are null",
            "error", modules=bad))
    huge = [la.name for la in layers if la.out_of_range]
    if huge:
        issues.append(Issue(
            "spectrum_out_of_range",
            f"{len(huge)} LoRA {'pair has' if len(huge) == 1 else 'pairs have'} finite factors whose update's "
            "singular values exceed float64's range (~1.8e308); their norms are null, their ranks and "
            "utilization are computed on the spectrum scaled by a power of two (exact)",
            "warning", modules=huge))
    if non_lora.count:
        issues.append(Issue(
            "non_lora_tensors",
            f"{non_lora.count} non-LoRA {'tensor' if non_lora.count == 1 else 'tensors'} ({non_lora.params} params, "
            "e.g. modules_to_save or heads) "
            "are counted separately and not audited as LoRA",
            "info", modules=list(non_lora.names)))
    return issues


def _apply_udr(result: AuditResult, loaded: LoadedAdapter, options: AuditOptions) -> None:
    """Call the UDR seam (``gradience.udr.measure_udr``) and merge its per-layer values and summary."""
    hint = loaded.config.get("base_model_name_or_path")
    hint = hint if isinstance(hint, str) and hint else None
    try:
        from gradience.udr import UdrInput, measure_udr
    except ImportError as exc:  # UDR package missing or partial: the audit still stands on its own
        result.issues.append(Issue("udr_unavailable", f"UDR could not be computed: {exc}", "info"))
        return
    pairs = {pair.name: pair for pair in loaded.pairs}
    fan_in_fan_out = loaded.config.get("fan_in_fan_out") is True
    inputs = [UdrInput(name=la.name, delta_sigma_max=la.delta_sigma_max, delta_frob_norm=la.delta_frob_norm,
                       d_out=la.d_out, d_in=la.d_in, kind=la.kind, dora=la.dora,
                       dora_loader=_dora_loader(pairs.get(la.name)) if la.dora else None, scale=la.scale,
                       fan_in_fan_out=fan_in_fan_out) for la in result.layers]
    base_model = options.base_model
    if not base_model:
        # The toy run, the demo and the bench save the exact base they trained on as <run>/base beside
        # <run>/peft: that is the base (the one resolver report/compare/audit share), and the output says so.
        from gradience.udr.resolve import base_beside_adapter

        beside = base_beside_adapter(loaded.peft_dir)
        if beside is not None:
            base_model = str(beside)
            result.issues.append(Issue(
                "base_model_beside_adapter",
                f"UDR/SDI against the base model saved beside the adapter: {safe_text(base_model, max_len=300)} "
                "(pass --base-model to use another, --no-udr for none)", "info", extra={"base_model": base_model}))
    try:
        report = measure_udr(inputs, base_model, adapter_base_hint=hint,
                             cache_path=options.base_norms_cache, progress=options.progress)
    except ImportError as exc:
        result.issues.append(Issue("udr_unavailable", f"UDR could not be computed: {exc}", "info"))
        return
    except InputError as exc:
        if options.base_required and options.base_model:
            raise
        result.issues.append(Issue("base_model_unresolved", f"UDR/SDI not computed: {exc}", "warning",
                                   extra={"base_model": base_model}))
        result.udr_requested = True
        result.udr_summary = dict.fromkeys(SUMMARY_KEYS)
        return
    result.issues.extend(report.issues)
    result.udr_requested = bool(report.requested)
    result.udr_base_model = getattr(report, "base_model", None)
    result.udr_stats = dict(getattr(report, "stats", {}) or {})
    if report.requested:
        result.udr_summary = dict(report.summary)
        for la in result.layers:
            values = report.per_layer.get(la.name)
            if values:
                la.udr = {key: values.get(key) for key in UDR_ROW_KEYS}


def run_audit(loaded: LoadedAdapter, options: AuditOptions | None = None) -> AuditResult:
    """Audit a loaded adapter: per-pair spectra, summary inputs, issues, and UDR when asked."""
    options = options or AuditOptions()
    layers = audit_pairs(loaded.pairs)
    result = AuditResult(adapter=loaded, layers=layers, options=options,
                         issues=list(loaded.issues) + layer_issues(layers, loaded.non_lora)
                         + annotate_experts(layers))
    mutated = mutated_base_init(loaded.config)
    if mutated is not None:
        result.issues.append(_mutated_base_issue(mutated))
    elif options.udr:
        _apply_udr(result, loaded, options)
    if result.udr_base_model and (options.qlora or trained_on_4bit(loaded.config)):
        result.qlora, qlora_issues = qlora_block(result.layers, result.udr_base_model)
        result.issues.extend(qlora_issues)
    dora_issue = _dora_directional_issue(result.layers)
    if dora_issue is not None:
        result.issues.append(dora_issue)
    if options.intruders is not None:
        from gradience.intruders.audit import apply_intruders

        apply_intruders(result, loaded, options, mutated)
    return result


def _dora_loader(pair: LoraPair | None) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """(A, B, m) of a DoRA pair for the UDR seam; None when its magnitude vector is unusable."""
    if pair is None or pair.magnitude_loader is None:
        return None

    def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = pair.load_factors()
        m = pair.load_magnitude()
        assert m is not None
        return a, b, m

    return load


def _mutated_base_issue(init: str) -> Issue:
    if init.strip().lower() == "loftq":
        why = ("LoftQ pairs the factors with a quantized copy of the base, so s·B·A also holds the quantization "
               "error W − Q(W)")
    else:
        why = ("at initialisation PEFT moved s·B₀·A₀ out of the base weight (W ← W − s·B₀·A₀; for PiSSA the top "
               "singular components of W) and the adapter was saved without save_pretrained(..., "
               "path_initial_model_for_weight_conversion=...), which would have made it a plain rank-2r delta")
    return Issue("mutated_base_init",
                 f"init_lora_weights is {init!r}: {why}; s·B·A is not a change to the published base weight, so its "
                 "magnitudes are not an update's and UDR/SDI are not computed", "warning",
                 extra={"init_lora_weights": init})


def _dora_directional_issue(layers: Sequence[LayerAudit]) -> Issue | None:
    """DoRA layers whose effective update was not computed: their magnitudes are the directional part only."""
    names = [la.name for la in layers if la.dora and la.udr.get("dora_eff_sigma_max") is None]
    if not names:
        return None
    return Issue("dora_directional_only",
                 f"{len(names)} DoRA {'layer' if len(names) == 1 else 'layers'}: their magnitudes (delta_sigma_max, delta_frob_norm) are those of the "
                 "directional part s·B·A only, not of the weight change m ⊙ (W + s·B·A)/‖W + s·B·A‖ − W; that "
                 "needs the base weight (pass --base-model DIR_OR_ID, or see the UDR issues above); no UDR for them",
                 "info", modules=names)


def audit_state_dict(
    tensors: Mapping[str, Any], config: Mapping[str, Any] | Any, options: AuditOptions | None = None,
) -> AuditResult:
    """Audit in-memory adapter weights (a PEFT state dict and its config), e.g. from a training callback."""
    from gradience.adapter import adapter_from_state_dict

    return run_audit(adapter_from_state_dict(tensors, config), options)


def default_top_wasteful(options: AuditOptions) -> int:
    return options.top_wasteful if options.top_wasteful is not None else TOP_WASTEFUL_TEXT_DEFAULT
