"""From the probe's audit to the arms of one seed (SPEC §15).

Truncate arms compress the probe's adapter (no retraining); retrain arms train a fresh LoRA at the suggested
ranks with each module's scale kept (alpha follows the rank: α/r, or α/√r with rsLoRA). ``retrain_shuffled``
permutes the per-layer ranks across modules with a seeded RNG: the same parameter budget placed without the
audit's knowledge, the control that tells whether *where* the rank goes matters. An arm that leaves every
module at the probe's rank is labelled a no-op control: its Δ measures noise, not compression.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gradience.bench.config import BenchConfig
from gradience.bench.train import LoraSpec, scaled_alpha

NOOP_LABEL = "no-op control"
SHUFFLED_LABEL = "control (ranks shuffled across modules)"


@dataclass
class ArmPlan:
    """What one arm of one seed does."""

    name: str
    kind: str                                  # truncate | retrain | uniform
    r: int | None = None                       # one rank for every module, when the arm has one
    rank_pattern: dict[str, int] | None = None  # per-module ranks (module name -> rank), when it has not
    lora: LoraSpec | None = None               # retrain / uniform arms
    label: str | None = None                   # "no-op control", "control …"
    skipped: str | None = None                 # why the arm cannot run for this seed (e.g. no suggestion)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "r": self.r, "rank_pattern": self.rank_pattern,
                "label": self.label, "skipped": self.skipped}


def slug(arm: str) -> str:
    """A directory name for an arm (``uniform:8`` -> ``uniform_8``)."""
    return arm.replace(":", "_")


def arm_key(plan: ArmPlan) -> tuple[Any, ...]:
    """What an arm computes, so that two arms of a seed whose ranks coincide run once (issue 17 item 3).

    Truncations are equal when every module keeps the same rank (one rank, or a per-layer pattern whose
    ranks are all that rank); trainings are equal when the LoRA they train is (same ranks, alphas, targets).
    """
    if plan.kind == "truncate":
        ranks = set(plan.rank_pattern.values()) if plan.rank_pattern else set()
        if plan.r is not None or len(ranks) == 1:
            return ("truncate", "r", plan.r if plan.r is not None else ranks.pop())
        return ("truncate", "pattern", tuple(sorted((plan.rank_pattern or {}).items())))
    spec = plan.lora.to_dict() if plan.lora is not None else {}
    return ("train", tuple(sorted((k, repr(v)) for k, v in spec.items())))


def _module_ranks(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {row["name"]: int(row["suggested_r"]) for row in rows}


def _retrain_spec(cfg: BenchConfig, targets: list[str] | None, ranks: dict[str, int], probe_r: int) -> LoraSpec:
    """A LoraSpec giving each module its rank and the probe's scale; the most common rank is the default."""
    from collections import Counter

    counts = Counter(ranks.values())
    default_r = max(counts, key=lambda r: (counts[r], r)) if counts else probe_r
    alpha = scaled_alpha(cfg.alpha, probe_r, default_r, cfg.use_rslora)
    rank_pattern = {_anchored(name): r for name, r in ranks.items() if r != default_r}
    alpha_pattern = {_anchored(name): scaled_alpha(cfg.alpha, probe_r, r, cfg.use_rslora)
                     for name, r in ranks.items() if r != default_r}
    return LoraSpec(r=default_r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                    target_modules=targets, dropout=cfg.dropout, use_rslora=cfg.use_rslora)


def _anchored(name: str) -> str:
    """A PEFT pattern key that matches exactly this module (PEFT matches ``(.*\\.)?(key)$`` from the start)."""
    import re

    return "^" + re.escape(name)


def plan_arms(cfg: BenchConfig, audit: dict[str, Any], seed: int, targets: list[str] | None) -> list[ArmPlan]:
    """The configured arms for one seed, from the probe's audit summary (with ``rank_suggestions``)."""
    probe_r = cfg.probe_r
    med, p90 = audit.get("suggested_r_global_median"), audit.get("suggested_r_global_90")
    suggestions = audit.get("rank_suggestions") or {}
    per_layer = _module_ranks(suggestions.get("layers") or [])
    plans: list[ArmPlan] = []
    for arm in cfg.arms:
        if arm in ("truncate_median", "truncate_p90", "retrain_median", "retrain_p90"):
            k = med if arm.endswith("median") else p90
            kind = arm.split("_", 1)[0]
            if k is None:
                plans.append(ArmPlan(arm, kind, skipped="the audit made no global suggestion (zero update?)"))
                continue
            plan = ArmPlan(arm, kind, r=int(k))
            if kind == "retrain":
                plan.lora = LoraSpec(r=int(k), alpha=scaled_alpha(cfg.alpha, probe_r, int(k), cfg.use_rslora),
                                     target_modules=targets, dropout=cfg.dropout, use_rslora=cfg.use_rslora)
            plan.label = NOOP_LABEL if int(k) >= probe_r else None
            plans.append(plan)
        elif arm in ("truncate_per_layer", "retrain_per_layer", "retrain_shuffled"):
            kind = arm.split("_", 1)[0]
            if not per_layer:
                plans.append(ArmPlan(arm, kind, skipped="the audit made no per-layer suggestion"))
                continue
            ranks = dict(per_layer)
            if arm == "retrain_shuffled":
                names = sorted(ranks)
                values = [ranks[n] for n in names]
                random.Random(seed).shuffle(values)
                ranks = dict(zip(names, values, strict=True))
            plan = ArmPlan(arm, kind, rank_pattern=ranks)
            if kind == "retrain":
                plan.lora = _retrain_spec(cfg, targets, ranks, probe_r)
            if all(r >= probe_r for r in ranks.values()):
                plan.label = NOOP_LABEL
            elif arm == "retrain_shuffled":
                plan.label = SHUFFLED_LABEL
            plans.append(plan)
        elif arm.startswith("uniform:"):
            k = int(arm.partition(":")[2])
            plans.append(ArmPlan(arm, "uniform", r=k, label=NOOP_LABEL if k == probe_r else None,
                                 lora=LoraSpec(r=k, alpha=scaled_alpha(cfg.alpha, probe_r, k, cfg.use_rslora),
                                               target_modules=targets, dropout=cfg.dropout,
                                               use_rslora=cfg.use_rslora)))
    return plans
