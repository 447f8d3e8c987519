"""``compress`` as a library: plan every layer's rank, then write the smaller adapter (SPEC §12).

Data flow: the adapter reader (headers only) → the audit's exact spectra (one read of every pair; its Grams are
kept) → the policy decides k per layer → :class:`CompressResult` (the ``gradience.compress/v1`` document) →
the writer streams the new factors, pair by pair, into a temporary directory beside OUT, which is renamed into
place at the end. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.adapter.sources import SafetensorsSource
from gradience.audit.core import LayerAudit, audit_pairs, layer_issues
from gradience.audit.spectrum import factor_grams
from gradience.audit.suggest import per_layer_suggestions, unique_pattern_key
from gradience.compress.budget import BudgetLayer, allocate, parse_budget, retained
from gradience.compress.factors import rescaled_factors, truncated_factors
from gradience.compress.policy import Policy, apply_modifiers, budget_candidates, raw_rank, validate
from gradience.compress.portability import OutputFacts, portability
from gradience.errors import InputError
from gradience.io.safetensors_write import TensorSpec
from gradience.issues import Issue
from gradience.jsonio import make_staging_dir
from gradience.policy.thresholds import ALLOWED_RANKS_DEFAULT, COMPRESS_SCALE_RTOL

SCHEMA = "gradience.compress/v1"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
REPORT_NAME = "compress.json"
DTYPE_CHOICES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# init_lora_weights values whose saved factors are not a delta (SPEC §2), used when the adapter package does
# not provide mutated_base_init (the DoRA/mutated-base work adds it to gradience.adapter.config).
_MUTATED_PREFIXES = ("pissa", "olora", "corda", "loftq", "lora_ga")
_BROKEN_INPUT_CODES = ("unpaired_factor", "shape_mismatch", "unsupported_dtype")
_STORED_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                 "F32": "F32", "BF16": "BF16", "F16": "F16", "F64": "F64"}


@dataclass
class CompressOptions:
    policy: Policy
    dtype: str = "keep"
    base_model: str | None = None
    base_norms_cache: str | None = None
    dry_run: bool = False
    force: bool = False


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
                       "weights": WEIGHTS_NAME, "config": CONFIG_NAME},
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


# -- preflight ---------------------------------------------------------------------------------------------
def mutated_init(config: dict[str, Any]) -> str | None:
    """The mutated-base ``init_lora_weights`` value of ``config`` (pissa*, olora, corda, loftq, lora_ga), or None.

    Uses the adapter package's ``mutated_base_init`` (the audit's rule) when present.
    """
    from gradience.adapter import config as adapter_config

    rule = getattr(adapter_config, "mutated_base_init", None)
    if rule is not None:
        found: str | None = rule(config)
        return found
    value = config.get("init_lora_weights")
    if isinstance(value, str) and value.strip().lower().startswith(_MUTATED_PREFIXES):
        return value
    return None


def _output_alpha(loaded: LoadedAdapter) -> float:
    where = loaded.adapter_config_path or loaded.adapter_weights_path
    if not loaded.config:
        raise InputError("compress needs the adapter's adapter_config.json (the output config is derived from it)",
                         where)
    alpha = loaded.config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise InputError(f"lora_alpha is {alpha!r}: compress needs a finite, non-zero lora_alpha to know each "
                         "module's scale", where)
    return float(alpha)


def preflight(loaded: LoadedAdapter) -> float:
    """Refuse inputs compress cannot turn into a faithful adapter; returns the output's lora_alpha."""
    where = loaded.adapter_config_path or loaded.adapter_weights_path
    mutated = mutated_init(loaded.config)
    if mutated is not None:
        raise InputError(f"init_lora_weights is {mutated!r}: the saved factors hold principal components of the "
                         "base model, not a delta (s·B·A is not the update), so truncating them would change the "
                         "base; convert the adapter with PEFT's path_initial_model_for_weight_conversion first",
                         where)
    broken = [i for i in loaded.issues if i.code in _BROKEN_INPUT_CODES]
    if broken:
        raise InputError("cannot write a loadable adapter from this one: " + "; ".join(i.message for i in broken),
                         loaded.adapter_weights_path)
    return _output_alpha(loaded)


def _resolve(p: str | os.PathLike[str]) -> Path:
    return Path(p).expanduser().resolve(strict=False)


def check_output_dir(out: str | os.PathLike[str], loaded: LoadedAdapter, force: bool) -> Path:
    """Refuse OUT == IN, OUT inside IN, IN inside OUT, a file, or a non-empty OUT without ``force``."""
    out_path = Path(out)
    out_r = _resolve(out_path)
    inputs = {_resolve(p) for p in (loaded.peft_dir,) if p}
    inputs |= {_resolve(p).parent for p in (loaded.adapter_weights_path, loaded.adapter_config_path) if p}
    for in_dir in inputs:
        if out_r == in_dir or in_dir in out_r.parents:
            raise InputError(f"--out is the input adapter directory or inside it ({in_dir}); choose another "
                             "directory", out_path)
        if out_r in in_dir.parents:
            raise InputError(f"the input adapter ({in_dir}) is inside --out; replacing --out would delete it",
                             out_path)
    if out_path.exists() or out_path.is_symlink():
        if not out_path.is_dir():
            raise InputError("--out exists and is not a directory", out_path)
        try:
            non_empty = any(os.scandir(out_path))
        except OSError as exc:
            raise InputError(f"cannot read --out: {exc.strerror or exc}", out_path) from None
        if non_empty and not force:
            raise InputError("--out is not empty; pass --force to replace it", out_path)
    parent = out_r.parent
    if parent.exists() and not parent.is_dir():
        raise InputError("the parent of --out is not a directory", out_path)
    return out_path


# -- planning ----------------------------------------------------------------------------------------------
def _layer_ranks(audits: list[LayerAudit], policy: Policy, use_rslora: bool) -> tuple[list[int], dict[str, Any]]:
    """k per layer after the policy and its modifiers (before --uniform); extra policy facts for the report."""
    extra: dict[str, Any] = {}
    finite = [la.singular_values is not None for la in audits]
    if policy.name == "per_layer":
        allowed = policy.allowed_ranks or ALLOWED_RANKS_DEFAULT
        rows = per_layer_suggestions(audits, allowed, policy.margin, use_rslora)["layers"]
        ks = [apply_modifiers(int(row["suggested_r"]), la.r, policy, round_to=None)
              for row, la in zip(rows, audits, strict=True)]
        return ks, extra
    if policy.name == "budget":
        before = sum(la.params for la in audits)
        budget = parse_budget(str(policy.value), before)
        extra["budget_params"] = budget
        if policy.uniform:
            return _uniform_budget(audits, budget, policy), extra
        blayers = [BudgetLayer(sigma=la.singular_values if la.singular_values is not None else np.zeros(la.r),
                               cost=la.d_in + la.d_out,
                               candidates=budget_candidates(la.r, policy) if ok else (la.r,))
                   for la, ok in zip(audits, finite, strict=True)]
        res = allocate(blayers, budget)
        extra.update({"budget_params_used": res.params, "objective": res.objective,
                      "objective_upper_bound": res.upper_bound, "greedy_optimal_at_params": res.prefix_params})
        return res.ranks, extra
    ks = []
    for la, ok in zip(audits, finite, strict=True):
        if not ok:
            ks.append(la.r)  # non-finite factors: nothing to judge, kept as they are
            continue
        assert la.singular_values is not None
        k = raw_rank(policy, la.singular_values, la.r)
        ks.append(apply_modifiers(k, la.r, policy, round_to=policy.allowed_ranks))
    return ks, extra


def _uniform_budget(audits: list[LayerAudit], budget: int, policy: Policy) -> list[int]:
    """--budget --uniform: the largest single rank K (every module zero-padded to K) that fits the budget."""
    per_rank = sum(la.d_in + la.d_out for la in audits)
    top = max(la.r for la in audits)
    if policy.max_rank is not None:
        top = min(top, policy.max_rank)
    k = min(top, budget // per_rank)
    floor = max(1, policy.min_rank or 1)
    if policy.allowed_ranks:
        fitting = [a for a in policy.allowed_ranks if floor <= a <= k]
        k = max(fitting) if fitting else 0
    if k < floor:
        raise InputError(f"--budget {budget} parameters cannot hold one uniform rank >= {floor} "
                         f"({per_rank} parameters per rank unit)")
    return [k] * len(audits)


def _errors(sigma: np.ndarray | None, k: int) -> tuple[float | None, float | None, float | None]:
    if sigma is None:
        return None, None, None
    s1 = float(sigma[0]) if sigma.size else 0.0
    if s1 <= 0.0:
        return 1.0, 0.0, 0.0
    energy = min(1.0, retained(sigma, k))
    spectral = float(sigma[k]) / s1 if k < sigma.size else 0.0
    return energy, math.sqrt(max(0.0, 1.0 - energy)), spectral


def _default_rank(ranks: list[int]) -> int:
    counts = Counter(ranks)
    top = max(counts.values())
    return max(r for r, c in counts.items() if c == top)  # ties: the larger rank (as the audit's default_r)


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def plan(loaded: LoadedAdapter, options: CompressOptions) -> tuple[list[LayerPlan], dict[str, Any], list[Issue],
                                                                    dict[str, Any]]:
    """(layer plans, output config, issues, policy facts) without writing anything."""
    policy = options.policy
    validate(policy)
    if options.dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {options.dtype!r}")
    alpha = preflight(loaded)
    audits = audit_pairs(loaded.pairs)
    use_rslora = bool(loaded.config.get("use_rslora", False))
    ks, extra = _layer_ranks(audits, policy, use_rslora)
    if policy.uniform:
        top = max(ks)
        ks = [top] * len(ks)
        extra["uniform_rank"] = top

    layers: list[LayerPlan] = []
    for pair, la, k in zip(loaded.pairs, audits, ks, strict=True):
        if k < pair.r:
            action = "truncated"
        elif k == pair.r:
            action = "kept"
        else:
            action = "padded"
        sigma = la.singular_values
        if action == "truncated" and sigma is not None and sigma[0] <= 0.0:
            action_note = {"zero_update": True}
        else:
            action_note = {}
        energy, frob, spectral = _errors(sigma, min(k, pair.r))
        layers.append(LayerPlan(
            name=pair.name, peft_prefix=pair.peft_prefix, module_type=la.module_type, kind=pair.kind,
            dora=pair.dora, r_before=pair.r, r_after=k, d_in=pair.d_in, d_out=pair.d_out, action=action,
            energy_retained=energy, rel_frob_error=frob, rel_spectral_error=spectral,
            coef=pair.scale * k / alpha, pair=pair, sigma=sigma, extra=action_note))
        if action != "truncated":
            layers[-1].method = "copy" if layers[-1].verbatim else "rescale"

    names = [la.name for la in layers]
    default_r = _default_rank(ks)
    config = dict(loaded.config)
    config["r"] = default_r
    config["lora_alpha"] = _json_number(alpha)
    config["rank_pattern"] = {unique_pattern_key(la.name, names): la.r_after for la in layers if la.r_after != default_r}
    config["alpha_pattern"] = {}
    config["use_rslora"] = False

    # The audit's own layer issues (zero_update, non_finite_weights, non_lora_tensors), in its wording.
    issues = list(loaded.issues) + layer_issues(audits, loaded.non_lora)
    dora = [la.name for la in layers if la.dora and la.action == "truncated"]
    if dora:
        issues.append(Issue("dora_directional_truncated",
                            f"{len(dora)} DoRA module(s): the directional update s·B·A was truncated and the "
                            "magnitude vectors were kept as they are; the merged weight's error depends on the base "
                            "(pass --base-model for its exact value)", "info", modules=dora))
    if extra.get("uniform_rank") is not None and any(la.action == "padded" for la in layers):
        padded = [la.name for la in layers if la.action == "padded"]
        issues.append(Issue("zero_padded", f"{len(padded)} module(s) of lower rank were zero-padded to the uniform "
                                           f"rank {extra['uniform_rank']} (ΔW unchanged)", "info", modules=padded))
    return layers, config, issues, extra


# -- tensors -----------------------------------------------------------------------------------------------
def _stored_name(dtype: str, key: str, where: str | None) -> str:
    name = _STORED_DTYPE.get(dtype)
    if name is None:
        raise InputError(f"tensor '{key}' has dtype {dtype}, which compress cannot write", where)
    return name


def _factor_layout(pair: LoraPair, a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """New (A (k, d_in), B (d_out, k)) in the pair's stored layout: conv 4-D, transposed pairs transposed."""
    if pair.kind == "conv":
        return a.reshape((k, *pair.a_shape[1:])), b.reshape((pair.b_shape[0], k, *pair.b_shape[2:]))
    if tuple(pair.a_shape) != (pair.r, pair.d_in):  # the reader transposed both factors back
        return a.T, b.T
    return a, b


def _factor_shapes(pair: LoraPair, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if pair.kind == "conv":
        return (k, *pair.a_shape[1:]), (pair.b_shape[0], k, *pair.b_shape[2:])
    if tuple(pair.a_shape) != (pair.r, pair.d_in):
        return (pair.d_in, k), (k, pair.d_out)
    return (k, pair.d_in), (pair.d_out, k)


class _RawReader:
    """Stored bytes of one tensor: zero-copy from safetensors, re-encoded (lossless) from pickled state dicts."""

    def __init__(self, source: Any, where: str | None) -> None:
        self.source = source
        self.where = where
        self.raw = source.read_raw if isinstance(source, SafetensorsSource) else None

    def read(self, key: str, dtype: str) -> np.ndarray:
        if self.raw is not None:
            return self.raw(key)
        from gradience.io.safetensors_write import encode_float

        if dtype == "F64":
            raise InputError(f"tensor '{key}' is float64 in a pickled file; convert the adapter to safetensors",
                             self.where)
        return encode_float(self.source.read_f32(key), dtype)


def _sha256(loaded: LoadedAdapter) -> str:
    """sha256 of the weights file (for a sharded adapter: of its shards in index order, concatenated)."""
    path = Path(loaded.adapter_weights_path or "")
    files = [path]
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            weight_map = {}
        files = [path.parent / name for name in dict.fromkeys(weight_map.values())]
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", file) from None
    return digest.hexdigest()


def _tensor_specs(loaded: LoadedAdapter, layers: list[LayerPlan], out_dtype: str | None
                  ) -> tuple[list[TensorSpec], dict[str, int], dict[str, Any]]:
    """The output tensors in the input's key order, each produced lazily (one pair's factors at a time)."""
    from gradience.adapter.loader import open_weights
    from gradience.adapter.pairs import parse_factor_key
    from gradience.io.safetensors_write import encode_float

    where = loaded.adapter_weights_path
    source = open_weights(Path(where or ""))
    raw = _RawReader(source, where)
    metas = source.metas()
    by_key: dict[str, tuple[LayerPlan, str]] = {}
    for layer in layers:
        assert layer.pair is not None
        by_key[layer.pair.a_key] = (layer, "A")
        by_key[layer.pair.b_key] = (layer, "B")
    pending: dict[str, dict[str, np.ndarray]] = {}

    def new_factors(layer: LayerPlan, side: str, dtype: str) -> np.ndarray:
        pair = layer.pair
        assert pair is not None
        slot = pending.get(layer.name)
        if slot is None:
            a, b = pair.load_factors()
            if layer.action == "truncated":
                # The Grams are recomputed here, on factors just read, rather than kept from the audit pass
                # (cheap next to the read, and independent of how the audit reduces its factors).
                a_new, b_new, method = truncated_factors(a, b, layer.r_after, layer.coef, factor_grams(a, b))
                layer.method = method
            else:
                a_new, b_new = rescaled_factors(a, b, layer.r_after, layer.coef)
            a_st, b_st = _factor_layout(pair, a_new, b_new, layer.r_after)
            try:
                slot = pending[layer.name] = {"A": encode_float(a_st, dtype), "B": encode_float(b_st, dtype)}
            except ValueError as exc:
                raise InputError(f"module {layer.name}: {exc}; choose another --dtype", where) from None
        out = slot.pop(side)
        if not slot:
            del pending[layer.name]
        return out

    specs: list[TensorSpec] = []
    dtypes: Counter[str] = Counter()
    non_lora: dict[str, Any] = {"count": 0, "params": 0, "names": [], "dora_magnitudes": 0, "lora_biases": 0}
    for key, meta in metas.items():
        stored = _stored_name(meta.dtype, key, where)
        hit = by_key.get(key)
        if hit is None:
            parsed = parse_factor_key(key)
            if parsed is not None and parsed.role == "lora_magnitude_vector":
                non_lora["dora_magnitudes"] += 1
            elif parsed is not None and parsed.param == "bias":
                non_lora["lora_biases"] += 1
            else:
                non_lora["count"] += 1
                non_lora["params"] += meta.numel
                non_lora["names"].append(key)
            specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
            dtypes[stored] += 1
            continue
        layer, side = hit
        assert layer.pair is not None
        dtype = out_dtype or stored
        dtypes[dtype] += 1
        if layer.verbatim and dtype == stored:
            specs.append(TensorSpec(key, stored, meta.shape, partial(raw.read, key, stored)))
            continue
        if layer.verbatim:
            layer.method = "convert"
        a_shape, b_shape = _factor_shapes(layer.pair, layer.r_after)
        specs.append(TensorSpec(key, dtype, a_shape if side == "A" else b_shape,
                                partial(new_factors, layer, side, dtype)))
    return specs, dict(dtypes), non_lora


def _output_facts(layers: list[LayerPlan], config: dict[str, Any], non_lora: dict[str, Any]) -> OutputFacts:
    return OutputFacts(ranks=[la.r_after for la in layers], config_r=int(config["r"]),
                       rank_pattern=config.get("rank_pattern") or {},
                       has_modules_to_save=bool(non_lora["count"]) or bool(config.get("modules_to_save")),
                       has_lora_bias=bool(non_lora["lora_biases"]),
                       dora=bool(config.get("use_dora")) or any(la.dora for la in layers),
                       kinds=frozenset(la.kind for la in layers))


# -- writing -----------------------------------------------------------------------------------------------
def _finalize(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to OUT (replacing an existing OUT only after it is complete)."""
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def compress(loaded: LoadedAdapter, out: str | os.PathLike[str] | None, options: CompressOptions) -> CompressResult:
    """Plan and (unless ``options.dry_run`` or ``out`` is None) write the compressed adapter to ``out``."""
    from gradience import jsonio
    from gradience.io.safetensors_write import write_safetensors

    out_path = check_output_dir(out, loaded, options.force) if out is not None else None
    layers, config, issues, extra = plan(loaded, options)
    options.policy.extra.update(extra)
    result = CompressResult(loaded=loaded, options=options, layers=layers, out_config=config, portability={},
                            issues=issues, source_sha256=_sha256(loaded),
                            out_dir=None if out_path is None else os.fspath(out_path))
    specs, dtypes, non_lora = _tensor_specs(loaded, layers, DTYPE_CHOICES[options.dtype])
    result.dtype_out = dtypes
    result.non_lora = non_lora
    result.portability = portability(_output_facts(layers, config, non_lora))
    if options.base_model:
        from gradience.compress.base import base_checks

        result.udr, result.dora = base_checks(loaded, layers, options)
    if options.dry_run or out_path is None:
        return result

    parent = _resolve(out_path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = make_staging_dir(_resolve(out_path), "tmp")
    except OSError as exc:
        raise InputError(f"cannot create the output directory: {exc.strerror or exc}", out_path) from None
    try:
        metadata = {"format": "pt", "gradience_source_sha256": result.source_sha256,
                    "gradience_policy": json.dumps(options.policy.to_dict(), sort_keys=True, default=str)}
        write_safetensors(tmp / WEIGHTS_NAME, specs, metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        result.written = True
        (tmp / REPORT_NAME).write_text(jsonio.dumps(result.to_dict()) + "\n", encoding="utf-8")
        _finalize(tmp, _resolve(out_path))
    except BaseException as exc:
        result.written = False
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write the output (nothing was written): {exc.strerror or exc}",
                             out_path) from None
        raise
    return result


__all__ = [
    "SCHEMA",
    "CompressOptions",
    "CompressResult",
    "LayerPlan",
    "check_output_dir",
    "compress",
    "mutated_init",
    "plan",
    "preflight",
]
