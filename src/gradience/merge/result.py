"""What ``merge`` decided and measured; ``MergeResult.to_dict()`` is the ``gradience.merge/v1`` document."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience.compress.policy import Policy
from gradience.issues import Issue
from gradience.merge.inputs import ModuleGroup
from gradience.policy.thresholds import (
    MERGE_DARE_DROP_DEFAULT,
    MERGE_TEXT_TOP_MODULES,
    MERGE_TIES_DENSITY_DEFAULT,
)

SCHEMA = "gradience.merge/v1"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
REPORT_NAME = "merge.json"
METHODS = ("cat", "linear", "svd", "ties", "dare")
DTYPE_CHOICES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class MergeOptions:
    method: str = "linear"
    weights: str | list[float] | None = None     # None: 1.0 each
    policy: Policy | None = None                 # truncation policy (linear / svd / ties / dare)
    dtype: str = "keep"
    density: float = MERGE_TIES_DENSITY_DEFAULT  # ties: fraction of entries kept per input
    drop_rate: float = MERGE_DARE_DROP_DEFAULT   # dare: p
    seed: int = 0                                # dare: mask seed
    force: bool = False
    dry_run: bool = False


def _expert_keys(group: ModuleGroup) -> dict[str, Any]:
    """Additive ``expert`` / ``num_experts`` / ``parameter`` keys of an MoE expert row."""
    tpl = group.template
    if tpl.expert is None:
        return {}
    from gradience.compress.experts import expert_row

    return expert_row(tpl)


@dataclass
class ModulePlan:
    """One merged module."""

    group: ModuleGroup
    r_after: int
    cap: int
    sigma: np.ndarray | None = field(default=None, repr=False)   # spectrum that was truncated
    grams: Any = field(default=None, repr=False)                 # StackSpectrum (linear/svd), kept for writing
    factor_method: str | None = None     # cat | gram | qr | eigh
    energy_retained: float | None = None
    rel_frob_error: float | None = None
    interference: list[dict[str, Any]] = field(default_factory=list)
    sign_conflict_rate: float | None = None
    kept_fraction: list[float] | None = None
    cancelled: bool = False              # the weighted updates cancel (zero up to rounding)
    ready: dict[str, np.ndarray] | None = field(default=None, repr=False)  # encoded A/B made in phase 1
    fro2: float | None = None             # ties/dare: ‖M‖_F² of the element-wise merge
    subspace: dict[str, Any] | None = None  # ties/dare on a large module: iterations, converged

    @property
    def conflict(self) -> float | None:
        vals = [p["conflict"] for p in self.interference if p.get("conflict") is not None]
        return max(vals) if vals else None

    @property
    def params_after(self) -> int:
        return self.r_after * (self.group.d_in + self.group.d_out)

    def to_row(self) -> dict[str, Any]:
        g = self.group
        cos = [p["cos"] for p in self.interference if p.get("cos") is not None]
        return {"name": g.name, "kind": g.kind, "d_in": g.d_in, "d_out": g.d_out, "ranks_before": g.ranks,
                "r_sum": g.summed_rank, "r_after": self.r_after, "present_in": [i for i, r in enumerate(g.ranks)
                                                                                   if r is not None],
                "partial": g.partial, "factor_method": self.factor_method,
                "energy_retained": self.energy_retained, "rel_frob_error": self.rel_frob_error,
                "params_after": self.params_after,
                "interference": {"conflict_max": self.conflict, "cos_min": min(cos) if cos else None,
                                 "pairs": self.interference},
                "sign_conflict_rate": self.sign_conflict_rate, "kept_fraction": self.kept_fraction,
                "subspace": self.subspace} | _expert_keys(g)


@dataclass
class MergeResult:
    options: MergeOptions
    inputs: list[dict[str, Any]]
    modules: list[ModulePlan]
    out_config: dict[str, Any]
    out_dir: str | None
    issues: list[Issue]
    policy_extra: dict[str, Any] = field(default_factory=dict)
    portability: dict[str, Any] = field(default_factory=dict)
    dtype_out: dict[str, int] = field(default_factory=dict)
    written: bool = False

    def summary(self) -> dict[str, Any]:
        mods = self.modules
        energies = [m.energy_retained for m in mods if m.energy_retained is not None]
        frob = [m.rel_frob_error for m in mods if m.rel_frob_error is not None]
        conflicts = [m.conflict for m in mods if m.conflict is not None]
        signs = [m.sign_conflict_rate for m in mods if m.sign_conflict_rate is not None]
        ranked = sorted((m for m in mods if m.conflict is not None), key=lambda m: (-(m.conflict or 0.0),
                                                                                    m.group.name))
        return {
            "n_modules": len(mods),
            "n_partial": sum(m.group.partial for m in mods),
            "params_sum": sum(m.group.summed_rank * (m.group.d_in + m.group.d_out) for m in mods),
            "params_after": sum(m.params_after for m in mods),
            "ranks_after": sorted({m.r_after for m in mods}),
            "energy_retained_min": min(energies) if energies else None,
            "energy_retained_mean": sum(energies) / len(energies) if energies else None,
            "rel_frob_error_max": max(frob) if frob else None,
            "conflict_max": max(conflicts) if conflicts else None,
            "conflict_mean": sum(conflicts) / len(conflicts) if conflicts else None,
            "sign_conflict_rate_mean": sum(signs) / len(signs) if signs else None,
            "most_interfering": [m.group.name for m in ranked[:MERGE_TEXT_TOP_MODULES]],
        }

    def to_dict(self) -> dict[str, Any]:
        opt = self.options
        method_opts: dict[str, Any] = {}
        if opt.method == "ties":
            method_opts["density"] = opt.density
        if opt.method == "dare":
            method_opts.update({"drop_rate": opt.drop_rate, "seed": opt.seed})
        cfg = self.out_config
        return {
            "schema": SCHEMA,
            "method": opt.method,
            "method_options": method_opts,
            "inputs": self.inputs,
            "policy": None if opt.policy is None else {**opt.policy.to_dict(), **self.policy_extra},
            "output": {"path": self.out_dir, "written": self.written, "dry_run": opt.dry_run, "dtype": opt.dtype,
                       "tensor_dtypes": dict(self.dtype_out), "weights": WEIGHTS_NAME, "config": CONFIG_NAME,
                       "report": REPORT_NAME},
            "config": {key: cfg.get(key) for key in ("r", "lora_alpha", "rank_pattern", "use_rslora", "use_dora",
                                                     "base_model_name_or_path")},
            "summary": self.summary(),
            "partial_modules": [m.group.name for m in self.modules if m.group.partial],
            "modules": [m.to_row() for m in self.modules],
            "portability": self.portability,
            "issues": [i.to_dict() for i in self.issues],
        }
