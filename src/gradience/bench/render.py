"""bench.md (also the text the CLI prints): the verdicts first, then the arms, then what it does not prove."""

from __future__ import annotations

from typing import Any

from gradience.textfmt import safe_text


def _num(x: Any, fmt: str = "{:.4f}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return fmt.format(x)


def _signed(x: Any) -> str:
    return _num(x, "{:+.4f}")


def _rank(arm: dict[str, Any]) -> str:
    if arm.get("r") is not None:
        return f"r={arm['r']}"
    per_seed_r = [s["r"] for s in arm.get("per_seed", []) if s.get("r") is not None]
    if per_seed_r:
        return "r=" + "/".join(str(r) for r in per_seed_r) + " (per seed)"
    seeds = [s for s in arm.get("per_seed", []) if s.get("rank_pattern")]
    if seeds:
        ranks = sorted(set(seeds[0]["rank_pattern"].values()))
        return "per-layer " + "/".join(str(r) for r in ranks)
    return "-"


def _note(arm: dict[str, Any], skipped: list[Any]) -> str:
    twins = sorted({str(s["same_as"]) for s in arm.get("per_seed", []) if s.get("same_as")})
    parts = [arm.get("label") or (f"skipped: {skipped[0]}" if skipped else "")]
    if twins:
        parts.append(f"same ranks as {', '.join(twins)}: one run, reported for both")
    return "; ".join(p for p in parts if p)


def _ci(ci: Any) -> str:
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else "-"


def _needed(arm: dict[str, Any]) -> str:
    """"n items to decide" for an INCONCLUSIVE one-seed arm (the per-seed rows carry it for several seeds)."""
    seeds = [s for s in arm.get("per_seed", []) if s.get("verdict") == "INCONCLUSIVE"]
    if len(arm.get("per_seed", [])) != 1 or not seeds:
        return ""
    n = seeds[0].get("n_eval_items_needed")
    return f"~{n} eval items to decide" if n is not None else "Δ at the tolerance: more items do not decide"


def verdict_lines(bench: dict[str, Any]) -> list[str]:
    """The headline verdict, which rule it is, the point-estimate rule's verdict, and any warning."""
    rec = bench.get("recommended_arm")
    policy = bench.get("policy") or {}
    verdict = bench["verdict"]
    tail = {"PASS": f" (smallest arm whose interval passes: {rec})",
            "INCONCLUSIVE": " (no arm's 95% interval clears the tolerance, and none lies wholly beyond it)",
            }.get(verdict, " (no compression arm passed the policy)")
    lines = [f"Verdict: {verdict}{tail}"]
    if "point_estimate_verdict" in policy:
        point_rec = policy.get("point_estimate_recommended_arm")
        lines.append("  headline: the 95% interval of Δ against −tolerance (non-inferiority); the reference tool's "
                     f"point-estimate rule says {policy['point_estimate_verdict']}"
                     + (f" ({point_rec})" if point_rec else ""))
    lines += [f"  warning: {safe_text(str(w))}" for w in bench.get("warnings") or []]
    return lines


def _table(rows: list[list[str]]) -> list[str]:
    """A plain text table, columns padded to their widest cell (what a terminal shows well)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def eval_lines(bench: dict[str, Any]) -> list[str]:
    """A ``--peft-dir`` evaluation (mode ``peft_dir``): the adapter against its reference, one interval."""
    task, ev = bench["task"], bench["evaluation"]
    (arm,) = bench["arms"]
    (s,) = arm["per_seed"]
    ref = safe_text(str(ev["against"])) if ev.get("against") else "the base model (no adapter)"
    verdict = bench["verdict"]
    n = s.get("n_eval_items_needed")
    tail = ("" if verdict != "INCONCLUSIVE" else f"; ~{n} eval items would decide it at this variance"
            if n is not None else "; Δ sits on the tolerance: more items do not decide it")
    better = "higher" if task["higher_is_better"] else "lower"
    ratio = arm.get("params_ratio")
    return [f"Gradience Bench (--peft-dir): {safe_text(str(arm['name']))} against {ref}",
            f"Verdict: {verdict} (Δ {task['metric']} {_signed(s['delta'])}, 95% paired interval {_ci(s['ci95'])}, "
            f"tolerance {bench['policy']['tolerance']:g}{tail})", *verdict_lines(bench)[1:],
            f"Task: {safe_text(str(task['model']))} on {safe_text(str(task['dataset']))}, {task['metric']} ({better} "
            f"is better) on {task['n_eval_items']} eval items: adapter {_num(s['metric'])}, reference "
            f"{_num(bench['probe']['per_seed'][0]['metric'])}; base {safe_text(str(ev['base']))}.",
            f"LoRA params: adapter {_num(arm['params'], '{}')}"
            + (f", reference {bench['probe']['params']} ({ratio:.1%})" if ratio is not None else "") + "."]


def render_text(bench: dict[str, Any]) -> str:
    """The terminal summary: the verdict, then one aligned row per arm (bench.md keeps the Markdown)."""
    if bench.get("mode") == "peft_dir":
        return "\n".join(eval_lines(bench)) + "\n"
    task, probe = bench["task"], bench["probe"]
    lines = [f"Gradience Bench: {safe_text(str(task['model']))} on {safe_text(str(task['dataset']))}"]
    if bench["screening"]:
        lines.append("Screening run (one seed): verdicts are indicative; run several seeds (--seeds 1,2,3).")
    lines += verdict_lines(bench)
    better = "higher" if task["higher_is_better"] else "lower"
    metrics = ", ".join(f"seed {p['seed']}: {_num(p['metric'])}" for p in probe["per_seed"])
    lines += [f"Metric: {task['metric']} ({better} is better), {task['n_eval_items']} eval items. "
              f"Probe r={probe['r']}: {metrics}.", ""]
    rows = [["arm", "kind", "rank", "params", "ratio", "mean Δ", "95% CI", "worst Δ", "verdict", "note"]]
    for arm in bench["arms"]:
        agg = arm["aggregate"]
        skipped = [s.get("skipped") for s in arm["per_seed"] if s.get("skipped")]
        note = "; ".join(p for p in (_note(arm, skipped), _needed(arm)) if p)
        rows.append([safe_text(str(arm["name"])), arm["kind"], _rank(arm), _num(arm["params"], "{}"),
                     _num(arm["params_ratio"], "{:.1%}"), _signed(agg["mean_delta"]), _ci(agg.get("ci95")),
                     _signed(agg["worst_delta"]), agg["verdict"] or "-", safe_text(note)])
    lines += _table(rows)
    gate = bench.get("probe_gate")
    if gate:
        lines += ["", f"Probe gate ({gate['metric']} ≥ {gate['min_value']:g}): "
                  + ("passed" if gate["passed"] else "NOT passed: the probe is undertrained; Δ values mean little")]
    return "\n".join(lines) + "\n"


def render_markdown(bench: dict[str, Any]) -> str:
    if bench.get("mode") == "peft_dir":
        head, *rest = eval_lines(bench)
        return "\n".join([f"# {head}", "", *(f"- {line.strip()}" for line in rest), "",
                          "What this shows: whether this adapter keeps the reference's metric on these eval items "
                          "within the tolerance. What it does not show: behaviour on other data or tasks.", ""])
    task, probe, policy = bench["task"], bench["probe"], bench["policy"]
    seeds = bench["seeds"]
    metric = task["metric"]
    lines = [f"# Gradience Bench: {safe_text(str(task['model']))} on {safe_text(str(task['dataset']))}", ""]
    if bench["screening"]:
        lines += ["**Screening run (one seed)**: verdicts are indicative, not validated. Run several seeds "
                  "(`--seeds 1,2,3`) before trusting a compression.", ""]
    verdict = bench["verdict"]
    rec = bench.get("recommended_arm")
    rec_row = next((a for a in bench["arms"] if a["name"] == rec), None)
    if rec_row is not None:
        lines.append(f"**Verdict: {verdict}** — smallest arm whose 95% interval passes: `{rec}` ({_rank(rec_row)}, "
                     f"{_num(rec_row['params_ratio'], '{:.1%}')} of the probe's LoRA parameters, "
                     f"mean Δ {_signed(rec_row['aggregate']['mean_delta'])}).")
    elif verdict == "INCONCLUSIVE":
        lines.append(f"**Verdict: {verdict}** — no arm's 95% interval clears the tolerance, and none lies wholly "
                     "beyond it: more eval items (or seeds) are needed to decide.")
    else:
        lines.append(f"**Verdict: {verdict}** — no compression arm passed the policy.")
    lines += [f"- {line.strip()}" for line in verdict_lines(bench)[1:]]
    better = "higher" if task["higher_is_better"] else "lower"
    rule = (f"headline: PASS when the 95% interval of Δ lies above −{policy['tolerance']:g}, FAIL when it lies "
            f"below, INCONCLUSIVE otherwise; the point-estimate rule (pass rate ≥ {policy['min_pass_rate']:.2f} and "
            "worst Δ within tolerance) is kept as `policy.point_estimate_verdict`"
            if "point_estimate_verdict" in policy else
            f"policy: pass rate ≥ {policy['min_pass_rate']:.2f} and worst Δ within tolerance")
    lines += ["", f"Metric: {metric} ({better} is better) on {task['n_eval_items']} eval items, the same items for "
              f"every arm. Tolerance {policy['tolerance']:g}; {rule}.", ""]
    probe_metrics = ", ".join(f"seed {p['seed']}: {_num(p['metric'])}" for p in probe["per_seed"])
    lines.append(f"Probe: r={probe['r']}, alpha={probe['alpha']:g}, {probe['params']} LoRA params; {probe_metrics}.")
    nf = bench["noise_floor"]
    if nf.get("sd") is not None:
        lines.append(f"Noise floor (probe across {nf['n_seeds']} seeds): sd {_num(nf['sd'])}, range {_num(nf['range'])}"
                     " — a Δ smaller than this is not a signal.")
    else:
        lines.append(f"Noise floor: {nf.get('note')}.")
    lines += ["", "| arm | kind | rank | params | ratio | mean Δ | 95% CI | sd Δ | worst Δ | pass rate | verdict | "
              "point-estimate verdict | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in bench["arms"]:
        agg = arm["aggregate"]
        skipped = [s.get("skipped") for s in arm["per_seed"] if s.get("skipped")]
        note = "; ".join(p for p in (_note(arm, skipped), _needed(arm)) if p)
        lines.append(f"| {arm['name']} | {arm['kind']} | {_rank(arm)} | {_num(arm['params'], '{}')} | "
                     f"{_num(arm['params_ratio'], '{:.1%}')} | {_signed(agg['mean_delta'])} | {_ci(agg.get('ci95'))} | "
                     f"{_num(agg['sd_delta'])} | {_signed(agg['worst_delta'])} | {_num(agg['pass_rate'], '{:.0%}')} | "
                     f"{agg['verdict'] or '-'} | {agg.get('point_estimate_verdict') or '-'} | {note} |")
    gate = bench.get("probe_gate")
    if gate:
        lines += ["", f"Probe gate ({gate['metric']} ≥ {gate['min_value']:g}): "
                  + ("passed." if gate["passed"] else "**not passed**: the probe is undertrained; Δ values mean little.")]
    lines += ["", "Per seed (Δ = arm − probe, 95% paired-bootstrap interval over items):", "",
              "| seed | arm | metric | Δ | 95% CI | verdict | eval items to decide | point-estimate verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in bench["arms"]:
        for s in arm["per_seed"]:
            lines.append(f"| {s['seed']} | {arm['name']} | {_num(s.get('metric'))} | {_signed(s.get('delta'))} | "
                         f"{_ci(s.get('ci95'))} | {s.get('verdict') or '-'} | "
                         f"{_num(s.get('n_eval_items_needed'), '{}')} | {s.get('point_estimate_verdict') or '-'} |")
    if bench.get("udr"):
        lines += ["", "UDR median per arm (first seed): " + ", ".join(
            f"{name}: {_num(((per or {}).get(str(seeds[0])) or {}).get('udr_median'))}"
            for name, per in (bench["udr"].get("arms") or {}).items())]
    lines += ["", "What this shows: whether a smaller LoRA (truncated from the probe, or retrained at the suggested "
              "ranks) keeps the probe's metric on these eval items, within the tolerance, across these seeds. "
              "What it does not show: behaviour on other data, longer training, or other tasks; a PASS on one "
              "seed is a screening result.", ""]
    return "\n".join(lines)
