"""The bench view: a ``gradience.bench/v1`` document as verdict, arms table, Δ-vs-parameters chart."""

from __future__ import annotations

from typing import Any

from gradience.report import arm_chart
from gradience.report.views.base import ChartIds, UdrGroup, View
from gradience.report.views.base import fact as _fact
from gradience.textfmt import finite, human_count, num, pct


def _bench_rank(arm: dict[str, Any]) -> str:
    if arm.get("r") is not None:
        return f"r={arm['r']}"
    per_seed = [s for s in arm.get("per_seed") or [] if isinstance(s, dict)]
    rs = [str(s["r"]) for s in per_seed if s.get("r") is not None]
    if rs:
        return "r=" + "/".join(rs) + " (per seed)"
    patterns = [s["rank_pattern"] for s in per_seed if isinstance(s.get("rank_pattern"), dict)]
    if patterns:
        return "per layer " + "/".join(str(r) for r in sorted({int(v) for v in patterns[0].values()}))
    return "-"


def bench_view(doc: dict[str, Any], ids: ChartIds) -> View:
    """A ``gradience.bench/v1`` document: the verdict, the arms with their Δ and intervals, Δ vs parameters,
    and one UDR distribution per arm (first seed) in the sidebar."""
    task = doc.get("task") or {}
    policy = doc.get("policy") or {}
    probe = doc.get("probe") or {}
    arms = [a for a in doc.get("arms") or [] if isinstance(a, dict)]
    seeds = [str(s) for s in doc.get("seeds") or []]
    metric = str(task.get("metric") or "metric")
    higher = bool(task.get("higher_is_better", True))
    tolerance = finite(policy.get("tolerance")) or 0.0
    noise = doc.get("noise_floor") or {}
    rec = doc.get("recommended_arm")
    verdict = str(doc.get("verdict") or "-")
    cards = [
        _fact("Verdict", verdict, "screening (one seed)" if doc.get("screening") else f"{len(seeds)} seeds",
              {"PASS": "good", "FAIL": "bad", "INCONCLUSIVE": "warn"}.get(verdict, "")),
        _fact("Smallest passing arm", str(rec) if rec else "none"),
        _fact("Probe", f"r={probe.get('r', '-')}", f"{human_count(probe.get('params'))} LoRA params"),
        _fact("Noise floor (probe sd)", num(noise.get("sd"), ".4f"), str(noise.get("note") or ""),
              "warn" if noise.get("exceeds_tolerance") else ""),
    ]
    if "point_estimate_verdict" in policy:  # issue 18: the interval is the headline, the point rule kept beside it
        cards.append(_fact("Point-estimate rule", str(policy["point_estimate_verdict"]),
                           "the reference tool's rule (Δ ≥ −tolerance); not the headline"))
    rows, seed_rows, points = [], [], []
    for arm in arms:
        agg = arm.get("aggregate") or {}
        label = arm.get("label")
        skipped = [s.get("skipped") for s in arm.get("per_seed") or [] if isinstance(s, dict) and s.get("skipped")]
        rows.append({"name": str(arm.get("name")), "kind": str(arm.get("kind") or "-"), "rank": _bench_rank(arm),
                     "params": human_count(arm.get("params")), "ratio": pct(arm.get("params_ratio")),
                     "mean": num(agg.get("mean_delta"), "+.4f") + (
                         f" [{num(agg['ci95'][0], '+.4f')}, {num(agg['ci95'][1], '+.4f')}]"
                         if isinstance(agg.get("ci95"), list) and len(agg["ci95"]) == 2 else ""),
                     "sd": num(agg.get("sd_delta"), ".4f"),
                     "worst": num(agg.get("worst_delta"), "+.4f"), "pass_rate": pct(agg.get("pass_rate")),
                     "verdict": str(agg.get("verdict") or "-"),
                     "note": str(label or (f"skipped: {skipped[0]}" if skipped else ""))})
        for s in arm.get("per_seed") or []:
            if not isinstance(s, dict):
                continue
            ci = s.get("ci95") if isinstance(s.get("ci95"), list) and len(s.get("ci95") or []) == 2 else None
            seed_rows.append({"seed": "-" if s.get("seed") is None else str(s.get("seed")), "arm": str(arm.get("name")), "metric": num(s.get("metric"), ".4f"),
                              "delta": num(s.get("delta"), "+.4f"),
                              "ci": f"[{num(ci[0], '+.4f')}, {num(ci[1], '+.4f')}]" if ci else "-",
                              "verdict": str(s.get("verdict") or "-") + (
                                  f" (~{s['n_eval_items_needed']} items to decide)"
                                  if s.get("n_eval_items_needed") is not None else "")})
        ratio, mean = finite(arm.get("params_ratio")), finite(agg.get("mean_delta"))
        if ratio is not None and mean is not None:
            verdict_arm = agg.get("verdict")
            points.append(arm_chart.ArmPoint(str(arm.get("name")), ratio, mean, finite(agg.get("sd_delta")),
                                          None if verdict_arm not in ("PASS", "FAIL") else verdict_arm == "PASS",
                                          control=bool(label)))
    chart_svg = arm_chart.params_metric_chart(ids.next(), points, tolerance, higher, metric, len(seeds))
    udr_doc = doc.get("udr") if isinstance(doc.get("udr"), dict) else None
    groups: list[UdrGroup] = []
    first = seeds[0] if seeds else None
    if udr_doc is not None and first is not None:
        per_arm = {"probe": (udr_doc.get("probe") or {}), **(udr_doc.get("arms") or {})}
        for name, by_seed in per_arm.items():
            block = by_seed.get(first) if isinstance(by_seed, dict) else None
            if not isinstance(block, dict):
                continue
            raw = block.get("per_layer")
            per_layer: dict[str, Any] = raw if isinstance(raw, dict) else {}
            vals = [v for v in (finite(x) for x in per_layer.values()) if v is not None]
            groups.append(UdrGroup(str(name), vals, {k: block.get(k) for k in (
                "udr_median", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3",
                "n_layers_with_udr")}, None if vals else "no UDR for this arm"))
    context = {
        "cards": cards, "rows": rows, "seed_rows": seed_rows, "chart_svg": chart_svg,
        "meta": [("Model", str(task.get("model") or "-")), ("Dataset", str(task.get("dataset") or "-")),
                 ("Metric", f"{metric} ({'higher' if higher else 'lower'} is better) on "
                            f"{task.get('n_eval_items', '-')} items, the same for every arm"),
                 ("Policy", (f"PASS when the 95% interval of Δ lies above −{tolerance:g}, FAIL when below, else "
                             "INCONCLUSIVE" if higher else f"PASS when the 95% interval of Δ lies below +{tolerance:g},"
                             " FAIL when above, else INCONCLUSIVE") if "point_estimate_verdict" in policy else
                  (f"PASS when Δ ≥ −{tolerance:g}" if higher else f"PASS when Δ ≤ +{tolerance:g}")),
                 *[("Warning", str(w)) for w in doc.get("warnings") or [] if isinstance(w, str)],
                 ("Seeds", ", ".join(seeds) or "-")],
        "screening": bool(doc.get("screening")), "udr_seed": first,
    }
    return View("bench", "Bench", "views/bench.html.j2", context, groups)

