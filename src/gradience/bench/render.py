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


def _table(rows: list[list[str]]) -> list[str]:
    """A plain text table, columns padded to their widest cell (what a terminal shows well)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def render_text(bench: dict[str, Any]) -> str:
    """The terminal summary: the verdict, then one aligned row per arm (bench.md keeps the Markdown)."""
    task, probe = bench["task"], bench["probe"]
    rec = bench.get("recommended_arm")
    lines = [f"Gradience Bench: {safe_text(str(task['model']))} on {safe_text(str(task['dataset']))}"]
    if bench["screening"]:
        lines.append("Screening run (one seed): verdicts are indicative; run several seeds (--seeds 1,2,3).")
    lines.append(f"Verdict: {bench['verdict']}" + (f" (smallest passing arm: {rec})" if rec else
                                                   " (no compression arm passed the policy)"))
    better = "higher" if task["higher_is_better"] else "lower"
    metrics = ", ".join(f"seed {p['seed']}: {_num(p['metric'])}" for p in probe["per_seed"])
    lines += [f"Metric: {task['metric']} ({better} is better), {task['n_eval_items']} eval items. "
              f"Probe r={probe['r']}: {metrics}.", ""]
    rows = [["arm", "kind", "rank", "params", "ratio", "mean Δ", "worst Δ", "pass", "verdict", "note"]]
    for arm in bench["arms"]:
        agg = arm["aggregate"]
        skipped = [s.get("skipped") for s in arm["per_seed"] if s.get("skipped")]
        rows.append([safe_text(str(arm["name"])), arm["kind"], _rank(arm), _num(arm["params"], "{}"),
                     _num(arm["params_ratio"], "{:.1%}"), _signed(agg["mean_delta"]), _signed(agg["worst_delta"]),
                     _num(agg["pass_rate"], "{:.0%}"), agg["verdict"] or "-", safe_text(_note(arm, skipped))])
    lines += _table(rows)
    gate = bench.get("probe_gate")
    if gate:
        lines += ["", f"Probe gate ({gate['metric']} ≥ {gate['min_value']:g}): "
                  + ("passed" if gate["passed"] else "NOT passed: the probe is undertrained; Δ values mean little")]
    return "\n".join(lines) + "\n"


def render_markdown(bench: dict[str, Any]) -> str:
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
        lines.append(f"**Verdict: {verdict}** — smallest passing arm: `{rec}` ({_rank(rec_row)}, "
                     f"{_num(rec_row['params_ratio'], '{:.1%}')} of the probe's LoRA parameters, "
                     f"mean Δ {_signed(rec_row['aggregate']['mean_delta'])}).")
    else:
        lines.append(f"**Verdict: {verdict}** — no compression arm passed the policy.")
    better = "higher" if task["higher_is_better"] else "lower"
    lines += ["", f"Metric: {metric} ({better} is better) on {task['n_eval_items']} eval items, the same items for "
              f"every arm. Tolerance {policy['tolerance']:g}; policy: pass rate ≥ {policy['min_pass_rate']:.2f} and "
              "worst Δ within tolerance.", ""]
    probe_metrics = ", ".join(f"seed {p['seed']}: {_num(p['metric'])}" for p in probe["per_seed"])
    lines.append(f"Probe: r={probe['r']}, alpha={probe['alpha']:g}, {probe['params']} LoRA params; {probe_metrics}.")
    nf = bench["noise_floor"]
    if nf.get("sd") is not None:
        lines.append(f"Noise floor (probe across {nf['n_seeds']} seeds): sd {_num(nf['sd'])}, range {_num(nf['range'])}"
                     " — a Δ smaller than this is not a signal.")
    else:
        lines.append(f"Noise floor: {nf.get('note')}.")
    lines += ["", "| arm | kind | rank | params | ratio | mean Δ | sd Δ | worst Δ | pass rate | verdict | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in bench["arms"]:
        agg = arm["aggregate"]
        skipped = [s.get("skipped") for s in arm["per_seed"] if s.get("skipped")]
        note = _note(arm, skipped)
        lines.append(f"| {arm['name']} | {arm['kind']} | {_rank(arm)} | {_num(arm['params'], '{}')} | "
                     f"{_num(arm['params_ratio'], '{:.1%}')} | {_signed(agg['mean_delta'])} | {_num(agg['sd_delta'])} | "
                     f"{_signed(agg['worst_delta'])} | {_num(agg['pass_rate'], '{:.0%}')} | {agg['verdict'] or '-'} | "
                     f"{note} |")
    gate = bench.get("probe_gate")
    if gate:
        lines += ["", f"Probe gate ({gate['metric']} ≥ {gate['min_value']:g}): "
                  + ("passed." if gate["passed"] else "**not passed**: the probe is undertrained; Δ values mean little.")]
    lines += ["", "Per seed (Δ = arm − probe, 95% paired-bootstrap interval over items):", "",
              "| seed | arm | metric | Δ | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for arm in bench["arms"]:
        for s in arm["per_seed"]:
            ci = s.get("ci95")
            ci_text = f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "-"
            lines.append(f"| {s['seed']} | {arm['name']} | {_num(s.get('metric'))} | {_signed(s.get('delta'))} | "
                         f"{ci_text} | {s.get('verdict') or '-'} |")
    if bench.get("udr"):
        lines += ["", "UDR median per arm (first seed): " + ", ".join(
            f"{name}: {_num(((per or {}).get(str(seeds[0])) or {}).get('udr_median'))}"
            for name, per in (bench["udr"].get("arms") or {}).items())]
    lines += ["", "What this shows: whether a smaller LoRA (truncated from the probe, or retrained at the suggested "
              "ranks) keeps the probe's metric on these eval items, within the tolerance, across these seeds. "
              "What it does not show: behaviour on other data, longer training, or other tasks; a PASS on one "
              "seed is a screening result.", ""]
    return "\n".join(lines)
