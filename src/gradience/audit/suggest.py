"""Rank suggestions (SPEC §3.3): global (p50/p90 of k@90%) and per layer, as an applicable PEFT config.

The per-layer suggestion is emitted as ``r=default_r`` + ``rank_pattern`` + ``lora_alpha`` + ``alpha_pattern``
such that real PEFT, matching pattern keys with ``re.match(rf"(.*\\.)?({key})$", module_name)``, gives every
module exactly its suggested rank and keeps its scale s = alpha/r (alpha/sqrt(r) with rsLoRA) unchanged.
Keys are full module names; a key that would also match another audited module is anchored (``^``+escaped).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradience import stats
from gradience.errors import InputError
from gradience.modules import MODULE_TYPES

if TYPE_CHECKING:
    from gradience.audit.core import LayerAudit


def parse_allowed_ranks(spec: str | Iterable[int]) -> tuple[int, ...]:
    """``"1,2,4,8"`` (or ints) -> sorted unique positive ranks; anything else is a usage error."""
    items: Iterable[Any] = spec.replace(" ", ",").split(",") if isinstance(spec, str) else spec
    ranks: set[int] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise InputError(f"--allowed-ranks: '{text}' is not an integer") from None
        if value < 1:
            raise InputError(f"--allowed-ranks: ranks must be >= 1, got {value}")
        ranks.add(value)
    if not ranks:
        raise InputError("--allowed-ranks: no ranks given")
    return tuple(sorted(ranks))


def round_up_rank(value: float, allowed: Sequence[int], cap: int) -> int:
    """Smallest allowed rank >= value (the largest allowed if none is), never above ``cap``, never < 1."""
    choice = next((a for a in allowed if a >= value - 1e-9), allowed[-1])
    return max(1, min(choice, cap))


def _params(layers: Iterable[LayerAudit], ranks: Iterable[int]) -> int:
    return sum(rank * (layer.d_in + layer.d_out) for layer, rank in zip(layers, ranks, strict=True))


def _reduction(before: int, after: int) -> float | None:
    """Fraction of LoRA parameters removed (0.75 = 75% fewer); None when there is nothing to reduce."""
    return None if before <= 0 else 1.0 - after / before


def global_suggestion(
    layers: Sequence[LayerAudit], allowed: Sequence[int], adapter_r: int, q: float,
) -> dict[str, Any]:
    """Uniform rank from the q-th percentile of per-layer k@90%, with what it would cost in parameters."""
    k90 = [layer.energy_rank_90 for layer in layers if layer.energy_rank_90 is not None]
    total = sum(layer.params for layer in layers)
    value = stats.percentile(k90, q)
    if value is None or not any(k90):  # nothing measured, or every layer is a zero update
        return {"r": None, "k90_percentile": value, "params_at_suggested": None, "params_saved": None,
                "reduction_ratio": None}
    r = round_up_rank(value, allowed, adapter_r)
    after = _params(layers, (min(r, layer.r) for layer in layers))
    return {"r": r, "k90_percentile": value, "params_at_suggested": after, "params_saved": total - after,
            "reduction_ratio": _reduction(total, after)}


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    alpha = scale * (math.sqrt(rank) if use_rslora else rank)
    return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-12, abs_tol=1e-12) else alpha


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def unique_pattern_key(name: str, all_names: Sequence[str]) -> str:
    """The key PEFT will match to ``name`` only.

    PEFT reads a key as a regex and matches ``(.*\\.)?(key)$`` anchored at the start, so a plain full name
    also matches any module whose name ends with ``.`` + that name (a nested copy). The plain name is used
    when it matches no other audited module; otherwise ``^`` + the escaped name, which fails as soon as the
    optional prefix group consumes anything and so matches exactly one module.
    """
    pattern = re.compile(rf"(.*\.)?({name})$")
    leaf = name.rsplit(".", 1)[-1]  # has no '.', so a match must end with it literally (cheap prefilter)
    if all(other == name or not other.endswith(leaf) or not pattern.match(other) for other in all_names):
        return name
    return "^" + re.escape(name)


def per_layer_suggestions(
    layers: Sequence[LayerAudit], allowed: Sequence[int], margin: float, use_rslora: bool,
) -> dict[str, Any]:
    """Per-layer ranks (allowed rank >= margin·k90, <= current r) and the PEFT config that applies them."""
    rows: list[dict[str, Any]] = []
    suggested: list[int] = []
    for layer in layers:
        if layer.energy_rank_90 is None:  # non-finite weights: nothing to judge, keep the current rank
            r_new = layer.r
        else:
            r_new = round_up_rank(margin * layer.energy_rank_90, allowed, layer.r)
        suggested.append(r_new)
        rows.append({
            "name": layer.name,
            "module_type": layer.module_type,
            "current_r": layer.r,
            "energy_rank_90": layer.energy_rank_90,
            "stable_rank": layer.stable_rank,
            "utilization": layer.utilization,
            "suggested_r": r_new,
            "params_current": layer.params,
            "params_at_suggested": r_new * (layer.d_in + layer.d_out),
            "reduction_ratio": _reduction(layer.params, r_new * (layer.d_in + layer.d_out)),
        })
    if not layers:
        return {"margin": margin, "allowed_ranks": list(allowed), "default_r": None, "lora_alpha": None,
                "use_rslora": use_rslora, "rank_pattern": {}, "alpha_pattern": {}, "by_type": {},
                "params_current": 0, "params_at_suggested": 0, "reduction_ratio": None, "layers": []}

    counts = Counter(suggested)
    top = max(counts.values())
    default_r = max(r for r, c in counts.items() if c == top)  # ties: the larger rank (conservative)
    alphas = [_alpha_for(layer.scale, r_new, use_rslora) for layer, r_new in zip(layers, suggested, strict=True)]
    default_alphas = Counter(a for a, r_new in zip(alphas, suggested, strict=True) if r_new == default_r)
    lora_alpha = max(default_alphas.items(), key=lambda kv: (kv[1], kv[0]))[0]

    names = [layer.name for layer in layers]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float | int] = {}
    for name, r_new, alpha in zip(names, suggested, alphas, strict=True):
        if r_new != default_r:
            rank_pattern[unique_pattern_key(name, names)] = r_new
        if not math.isclose(alpha, lora_alpha, rel_tol=1e-12, abs_tol=0.0):
            alpha_pattern[unique_pattern_key(name, names)] = _json_number(alpha)

    by_type: dict[str, Any] = {}
    for mtype in MODULE_TYPES:
        sel = [(layer, r_new) for layer, r_new in zip(layers, suggested, strict=True) if layer.module_type == mtype]
        if not sel:
            continue
        p90 = stats.percentile([layer.energy_rank_90 for layer, _ in sel], 90.0)
        cap = max(layer.r for layer, _ in sel)
        by_type[mtype] = {
            "n_layers": len(sel),
            "energy_rank_90_p90": p90,
            "suggested_r_p90": None if p90 is None else round_up_rank(margin * p90, allowed, cap),
            "suggested_r_p90_per_layer": stats.percentile([r_new for _, r_new in sel], 90.0),
        }

    before = sum(layer.params for layer in layers)
    after = _params(layers, suggested)
    return {
        "margin": margin,
        "allowed_ranks": list(allowed),
        "default_r": default_r,
        "lora_alpha": _json_number(lora_alpha),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "by_type": by_type,
        "params_current": before,
        "params_at_suggested": after,
        "reduction_ratio": _reduction(before, after),
        "layers": rows,
    }


def lora_config_fragment(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` fragment that retrains with the per-layer suggestion (``--emit-config``).

    ``LoraConfig(**fragment)`` (merged into the user's own settings) gives every audited module its suggested
    rank and keeps its scale s: ``r`` and ``lora_alpha`` are the most common choice, ``rank_pattern`` /
    ``alpha_pattern`` the exceptions (keys PEFT matches to exactly one module), ``target_modules`` the adapter's.
    Needs ``rank_suggestions`` in the summary (``--suggest-per-layer``).
    """
    rs = summary.get("rank_suggestions")
    if not rs or rs.get("default_r") is None:
        raise InputError("--emit-config: no per-layer suggestion to write (the adapter has no LoRA pairs)")
    adapter = summary.get("adapter") or {}
    targets = adapter.get("target_modules")
    if not targets:  # the leaf names PEFT would need to target the audited modules again
        targets = sorted({str(row["name"]).rsplit(".", 1)[-1] for row in summary.get("layers") or []})
    return {
        "r": rs["default_r"],
        "lora_alpha": rs["lora_alpha"],
        "use_rslora": bool(rs.get("use_rslora")),
        "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
        "rank_pattern": dict(rs.get("rank_pattern") or {}),
        "alpha_pattern": dict(rs.get("alpha_pattern") or {}),
    }
