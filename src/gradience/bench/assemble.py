"""Assembling ``bench.json`` (SPEC §15) from the probes and arms of every seed: deltas, paired intervals, verdicts."""

from __future__ import annotations

from typing import Any

from gradience.bench.arms import ArmPlan
from gradience.bench.config import BenchConfig
from gradience.bench.intervals import HEADLINE_RULE, POINT_RULE, across_seeds, seed_decision
from gradience.bench.results import ArmResult
from gradience.bench.stats import Verdicts, noise_floor, paired_bootstrap_ci
from gradience.bench.tasks import PreparedTask

SCHEMA = "gradience.bench/v1"
CONTROL_ARMS = ("retrain_shuffled",)


def assemble(cfg: BenchConfig, task: PreparedTask, seeds: tuple[int, ...], probes: dict[int, ArmResult],
             arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]], elapsed: float) -> dict[str, Any]:
    """The ``gradience.bench/v1`` object: per-arm paired deltas and intervals, verdicts, the recommendation."""
    verdicts = Verdicts(tolerance=cfg.tolerance, min_pass_rate=cfg.min_pass_rate,
                        higher_is_better=cfg.higher_is_better)
    probe_params = probes[seeds[0]].params
    arm_rows: list[dict[str, Any]] = []
    for name in cfg.arms:
        per_seed: list[dict[str, Any]] = []
        deltas: list[float] = []
        pairs: list[tuple[list[float], list[float]]] = []
        params: list[int] = []
        plans = [plan for plan, _ in arms[name].values()]
        for seed in seeds:
            plan, res = arms[name].get(seed, (None, None))
            if res is None:
                per_seed.append({"seed": seed, "metric": None, "delta": None, "ci95": None, "verdict": None,
                                 "skipped": plan.skipped if plan else "not run"})
                continue
            probe = probes[seed]
            delta = res.metric - probe.metric
            lo, hi = paired_bootstrap_ci(probe.per_item, res.per_item, cfg.metric,
                                         samples=cfg.bootstrap_samples)
            deltas.append(delta)
            pairs.append((probe.per_item, res.per_item))
            params.append(res.params)
            decision = seed_decision(delta, (lo, hi), len(res.per_item), cfg.tolerance, cfg.higher_is_better)
            per_seed.append({"seed": seed, "metric": res.metric, "delta": delta, "ci95": [lo, hi],
                             **({"same_as": res.same_as} if res.same_as else {}),
                             **decision, "point_estimate_verdict": verdicts.verdict(delta), "params": res.params,
                             "r": res.plan.get("r") if res.plan else None,
                             "rank_pattern": res.plan.get("rank_pattern") if res.plan else None,
                             "seconds": res.seconds, "adapter_dir": res.adapter_dir, "summary": res.summary})
        kind = plans[0].kind if plans else ("uniform" if name.startswith("uniform:") else name.split("_", 1)[0])
        rs = {p.r for p in plans if p.r is not None}
        mean_params = sum(params) / len(params) if params else None
        aggregate = verdicts.aggregate(deltas) if deltas else {
            "n_seeds": 0, "mean_delta": None, "sd_delta": None, "worst_delta": None, "pass_rate": None,
            "verdict": None}
        aggregate["point_estimate_verdict"] = aggregate["verdict"]
        if pairs:  # over the seeds this arm ran (a seed skipped for want of a suggestion has no Δ)
            aggregate.update(across_seeds(pairs, cfg.metric, cfg.tolerance, cfg.higher_is_better,
                                          samples=cfg.bootstrap_samples))
        labels = {p.label for p in plans if p.label}
        arm_rows.append({
            "name": name, "kind": kind, "r": rs.pop() if len(rs) == 1 else None,
            "rank_pattern": plans[0].rank_pattern if plans and plans[0].rank_pattern and len(seeds) == 1 else None,
            "label": labels.pop() if len(labels) == 1 else None,
            "params": round(mean_params) if mean_params is not None else None,
            "params_ratio": (mean_params / probe_params) if mean_params is not None and probe_params else None,
            "per_seed": per_seed, "aggregate": aggregate,
        })
    eligible = [row for row in arm_rows if row["name"] not in CONTROL_ARMS and row["label"] is None
                and row["params_ratio"] is not None and row["params_ratio"] < 1.0]
    best = _smallest(eligible, "verdict")
    point_best = _smallest(eligible, "point_estimate_verdict")
    headline = "PASS" if best else (
        "INCONCLUSIVE" if any(row["aggregate"]["verdict"] == "INCONCLUSIVE" for row in eligible) else "FAIL")
    probe_metrics = [probes[s].metric for s in seeds]
    noise = noise_floor(probe_metrics, cfg.tolerance)
    return {
        "schema": SCHEMA,
        "config": cfg.to_dict(),
        "seeds": list(seeds),
        "task": {"kind": task.kind, "model": task.model_name, "dataset": task.dataset_name,
                 "metric": cfg.metric, "higher_is_better": cfg.higher_is_better, "n_eval_items":
                 len(probes[seeds[0]].per_item)},
        "probe": {"r": cfg.probe_r, "alpha": cfg.alpha, "params": probe_params,
                  "per_seed": [{"seed": s, "metric": probes[s].metric, "summary": probes[s].summary,
                                "seconds": probes[s].seconds, "adapter_dir": probes[s].adapter_dir}
                               for s in seeds]},
        "arms": arm_rows,
        "noise_floor": noise,
        "policy": {"tolerance": cfg.tolerance, "min_pass_rate": cfg.min_pass_rate, "headline": "interval",
                   "rule": HEADLINE_RULE, "point_estimate_rule": POINT_RULE,
                   "point_estimate_verdict": "PASS" if point_best else "FAIL",
                   "point_estimate_recommended_arm": point_best["name"] if point_best else None},
        "verdict": headline,
        "warnings": _warnings(noise, cfg),
        "recommended_arm": best["name"] if best else None,
        "screening": len(seeds) == 1,
        "udr": {"probe": {str(s): probes[s].udr for s in seeds},
                "arms": {name: {str(s): (res.udr if res else None) for s, (_, res) in arms[name].items()}
                         for name in cfg.arms}}
        if any(p.udr for p in probes.values()) else None,
        "elapsed_seconds": elapsed,
        **({"probe_gate": probe_gate(cfg, probes, seeds)} if cfg.probe_gate_min is not None else {}),
        **({"ignored_config_keys": list(cfg.ignored_keys)} if cfg.ignored_keys else {}),
    }

def _smallest(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The passing arm (by the aggregate ``key`` verdict) with the fewest parameters relative to the probe."""
    passing = [row for row in rows if row["aggregate"].get(key) == "PASS"]
    return min(passing, key=lambda row: (row["params_ratio"], row["name"])) if passing else None


def _warnings(noise: dict[str, Any], cfg: BenchConfig) -> list[str]:
    """Lines printed beside the verdict: a probe whose seed spread exceeds the tolerance makes seeds decide."""
    if noise.get("exceeds_tolerance"):
        return [f"noise floor above the tolerance: the probe's {cfg.metric} sd across {noise['n_seeds']} seeds is "
                f"{noise['sd']:.4f} > tolerance {cfg.tolerance:g}; a seed's verdict depends on the seed (train "
                "longer, use more eval items or raise the tolerance)"]
    return []


def probe_gate(cfg: BenchConfig, probes: dict[int, ArmResult], seeds: tuple[int, ...]) -> dict[str, Any]:
    """task.probe_gate: a probe below ``min_value`` is undertrained and its arms' Δ mean little."""
    gate = cfg.probe_gate_min
    assert gate is not None
    ok = (lambda m: m >= gate) if cfg.higher_is_better else (lambda m: m <= gate)
    per_seed = [{"seed": s, "metric": probes[s].metric, "passed": bool(ok(probes[s].metric))} for s in seeds]
    return {"metric": cfg.metric, "min_value": gate, "passed": all(p["passed"] for p in per_seed),
            "per_seed": per_seed}
