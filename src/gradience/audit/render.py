"""Human-readable audit text (the seed's layout), rendered from the JSON summary so text and JSON agree."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from gradience.audit.jsonout import dumps_json  # noqa: F401  (re-exported: the audit JSON writer)
from gradience.bench.command import VERIFY_CONFIG, verify_command
from gradience.policy.thresholds import TOP_UDR_TEXT, UDR_SDI_EPS
from gradience.textfmt import RULE, finite, human_count, num, pct, rank_value, safe_text


def wasteful_line(i: int, row: Mapping[str, Any]) -> str:
    """``  01. attn r=8   util=12.7%  sr=1.02  k@90%=1  model.layers.5.self_attn.q_proj``."""
    return (f"  {i:02d}. {row['module_type']:<4} r={row['r']:<3} util={pct(row['utilization'])}  "
            f"sr={num(row['stable_rank'])}  k@90%={num(row['energy_rank_90'], 'd')}  {safe_text(row['name'])}")


def _suggestion_line(label: str, g: Mapping[str, Any], total: int) -> str:
    if g.get("r") is None:
        return f"  {label}: -  (no non-zero layer to measure)"
    saved = g.get("params_saved") or 0
    ratio = g.get("reduction_ratio")
    if saved <= 0:
        return f"  {label}: r={g['r']}  (params {human_count(g['params_at_suggested'])}, no saving)"
    return (f"  {label}: r={g['r']}  (params {human_count(g['params_at_suggested'])} of {human_count(total)}, "
            f"saves {human_count(saved)} / {pct(ratio)})")


def plural(n: int, word: str) -> str:
    """``1 module``, ``2 modules``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _sdi(s: Mapping[str, Any]) -> str:
    """SDI median, or '-' when the median update is zero: log10 of the ε guard (-12) is not a measurement."""
    udr = finite(s.get("udr_median"))
    return "-" if udr is None or udr <= UDR_SDI_EPS else num(s.get("sdi_median"))


def suggestion_config_lines(rs: Mapping[str, Any]) -> list[str]:
    """The per-layer suggestion as the LoraConfig values that apply it (copy-paste ready JSON)."""
    rp, ap = rs.get("rank_pattern") or {}, rs.get("alpha_pattern") or {}
    lines = [f"    LoraConfig: r={rs['default_r']}, lora_alpha={rs['lora_alpha']}"
             + (", use_rslora=True" if rs.get("use_rslora") else "")
             + ", rank_pattern and alpha_pattern below (keeps every module's scale)",
             f"    rank_pattern = {json.dumps(rp, ensure_ascii=False)}",
             f"    alpha_pattern = {json.dumps(ap, ensure_ascii=False)}",
             "    (--emit-config F.json or F.yaml writes this as a LoraConfig fragment)"]
    return lines


def _expert_rows_note(s: Mapping[str, Any]) -> str:
    """``  (12288 MoE expert rows of 96 stacked parameters)`` beside the layer count of an expert adapter."""
    ex = s.get("experts")
    if not ex:
        return ""
    return f"  ({ex['n_expert_rows']} MoE expert rows of {plural(len(ex['parameters']), 'stacked parameter')})"


def _lowest_utilization(rows: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The n rows of lowest utilization, ties by name: a partial selection, not a sort of every row (12k rows
    of an MoE adapter for five lines)."""
    import heapq

    return heapq.nsmallest(max(0, n), rows, key=lambda r: (r["utilization"], r["name"]))


def render_text(summary: Mapping[str, Any], *, top_wasteful: int, show_layers: bool = False,
                title: str = "GRADIENCE LoRA AUDIT") -> str:
    s = summary
    lines = [RULE, title, RULE]
    if s.get("adapter_name"):
        lines.append(f"Adapter:  {safe_text(s['adapter_name'])}")
    lines += [f"PEFT dir: {s.get('peft_dir') or '-'}",
              f"Config:   {s.get('adapter_config_path') or '-'}",
              f"Weights:  {s.get('adapter_weights_path') or '-'}",
              "",
              "Summary:",
              f"  LoRA params: {human_count(s['total_lora_params'])}",
              f"  Layers:      {s['n_layers']}{_expert_rows_note(s)}",
              f"  Stable rank (mean):    {num(s['stable_rank_mean'])}",
              f"  Utilization (mean):    {pct(s['utilization_mean'])}",
              f"  Energy rank k@90% (p50/p90): {rank_value(s['energy_rank_90_p50'])}/{rank_value(s['energy_rank_90_p90'])}"]
    if s["non_lora_tensors"]["count"]:
        nl = s["non_lora_tensors"]
        lines.append(f"  Non-LoRA tensors: {nl['count']} ({human_count(nl['params'])} params, not audited)")
    if (s.get("adapter") or {}).get("use_dora"):
        lines.append("  DoRA: magnitudes are of the directional part s·B·A only (no base weight; see issues)"
                     if any(i.get("code") == "dora_directional_only" for i in s.get("issues") or [])
                     else "  DoRA: UDR from the effective update m ⊙ (W + s·B·A)/‖W + s·B·A‖ − W")

    blocks = (s.get("composition") or {}).get("by_block") or {}
    if blocks.get("top5") and blocks.get("n_blocks", 0) > 1:
        top = "  ".join(f"{'-' if b['block'] is None else b['block']}: {pct(b['share'])}" for b in blocks["top5"])
        lines.append(f"  Update energy by block (top {len(blocks['top5'])} of {blocks['n_blocks']}): {top}  "
                     f"(HHI {num(blocks['hhi'], '.3f')})")

    if s["by_type"]:
        lines += ["", "By module type:"]
        for mtype, t in s["by_type"].items():
            lines.append(f"  {mtype:<5} layers={t['n_layers']:<4} params={human_count(t['params']):<7} "
                         f"sr={num(t['stable_rank_mean'])}  util={pct(t['utilization_mean'])}  "
                         f"k@90% p50/p90={rank_value(t['energy_rank_90_p50'])}/{rank_value(t['energy_rank_90_p90'])}")

    rows: Sequence[Mapping[str, Any]] = s.get("layers") or []
    if s.get("udr_requested") and s.get("n_layers_with_udr"):
        lines += ["", f"UDR (update vs base spectral norm, base: {s.get('udr_base_model') or '-'}):",
                  f"  Median: {num(s['udr_median'], '.3f')}  p90: {num(s['udr_p90'], '.3f')}  "
                  f"Max: {num(s['udr_max'], '.3f')}",
                  f"  Layers with UDR > 0.1: {pct(s['fraction_udr_gt_0_1'])}   "
                  f"> 0.3: {pct(s['fraction_udr_gt_0_3'])}   (of {s['n_layers_with_udr']})",
                  f"  SDI (log10 UDR) median: {_sdi(s)}"]
        lines += [f"  ! {safe_text(i.get('message', ''))}" for i in s.get("issues") or []
                  if i.get("code") == "base_looks_random_init"]  # said next to the numbers (issue 18)
        ranked = sorted((r for r in rows if r.get("udr") is not None), key=lambda r: -r["udr"])[:TOP_UDR_TEXT]
        if ranked:
            lines.append(f"  Top {plural(len(ranked), 'module')} by UDR:")
            lines += [f"    {r['udr']:.3f}  {safe_text(r['name'])}" for r in ranked]
    if s.get("n_layers_intruder_checked"):  # audit --intruders (issue 23)
        lines += ["", f"Intruder dimensions (top-{s['intruder_k']} of W + ΔW, best |cos| vs base < "
                      f"{s['intruder_eps']:g}):",
                  f"  Layers with intruders: {s['n_layers_with_intruders']} of {s['n_layers_intruder_checked']} "
                  f"({pct(s['intruder_layer_share'])}); intruders: {s['intruder_count_total']}; "
                  f"energy Σσ²: {num(s['intruder_energy_total'], '.4g')}"]

    if s.get("experts"):  # MoE expert LoRA (issue 21): coverage per layer, never-adapted experts apart
        from gradience.audit.experts import coverage_lines, never_adapted_line

        ex = s["experts"]
        lines += ["", f"Experts: {ex['n_adapted']} of {ex['n_expert_rows']} expert updates adapted "
                      f"({pct(ex['coverage'])})"]
        never = never_adapted_line(ex)
        if never is not None:
            lines.append(f"  {never}")
        lines += [f"  {safe_text(line)}" for line in coverage_lines(ex)]
    if s.get("qlora") and s["qlora"].get("n_layers"):  # audit --qlora (issue 21)
        q = s["qlora"]
        lines += ["", f"QLoRA merge residual ‖W16 − deq(Q(W16))‖ / ‖s·B·A‖ ({q['quant_type']}): median "
                      f"{num(q['ratio_median'], '.3g')}  max {num(q['ratio_max'], '.3g')}  -> merge into: "
                      f"{q['merge_into']}"]

    g = s["global_rank_suggestions"]
    lines += ["", "Suggested rank:",
              _suggestion_line("median (p50 of k@90%)", g["median"], g["params_current"]),
              _suggestion_line("p90    (p90 of k@90%)", g["p90"], g["params_current"])]
    rs = s.get("rank_suggestions")
    if rs and rs.get("default_r") is not None:
        lines.append(f"  per layer (margin {rs['margin']:g}): default r={rs['default_r']}, "
                     f"{plural(len(rs['rank_pattern']), 'module')} in rank_pattern, params "
                     f"{human_count(rs['params_at_suggested'])} (saves {pct(rs['reduction_ratio'])})")
        lines += suggestion_config_lines(rs)
    p90 = g["p90"]
    if p90.get("r") is not None and (p90.get("params_saved") or 0) > 0 and s.get("peft_dir"):
        raw = str(s["peft_dir"]).rstrip("/")
        src = shlex.quote(raw)
        lines.append(f"  Apply without retraining: gradience compress --peft-dir {src} --out {src}_r{p90['r']} "
                     f"--rank {p90['r']}")
        lines.append(f"  Then verify it on your task ({VERIFY_CONFIG}: a bench config naming the task and eval data): "
                     f"{verify_command(raw + '_r' + str(p90['r']), raw)}")

    lines += ["", "Issues:"]
    issues = s.get("issues") or []
    if not issues:
        lines.append("  (none)")
    for issue in issues:
        mods = issue.get("modules") or []
        named = bool(mods) and str(mods[0]) in str(issue.get("message", ""))  # the message lists them already
        tail = f" [{', '.join(mods[:3])}{', ...' if len(mods) > 3 else ''}]" if mods and not named else ""
        lines.append(f"  [{issue['severity']}] {issue['code']}: {issue['message']}{tail}")

    # Rank waste: a never-adapted expert (adapted is False) has no update to waste rank on; it is a coverage
    # fact, listed under Experts, and would otherwise fill this list with zeros.
    rated = [r for r in rows if r.get("utilization") is not None and r.get("adapted") is not False]
    shown = _lowest_utilization(rated, top_wasteful)
    if shown:
        skipped = sum(1 for r in rows if r.get("adapted") is False)
        note = f"; {skipped} never-adapted experts are under Experts" if skipped else ""
        lines += ["", f"Most wasteful layers (lowest utilization, top {len(shown)}{note}):"]
        lines += [wasteful_line(i, row) for i, row in enumerate(shown, 1)]

    if show_layers and rows:
        lines += ["", "Layers:"]
        for row in rows:
            udr = "" if row.get("udr") is None else f"  udr={row['udr']:.3f}"
            lines.append(f"  {row['module_type']:<5} r={row['r']:<3} util={pct(row['utilization'])}  "
                         f"sr={num(row['stable_rank'])}  erank={num(row['effective_rank'])}  "
                         f"k@90/95/99%={num(row['energy_rank_90'], 'd')}/{num(row['energy_rank_95'], 'd')}/"
                         f"{num(row['energy_rank_99'], 'd')}  sigma1(dW)={num(row['delta_sigma_max'], '.3g')}"
                         f"{udr}  {safe_text(row['name'])}")
    return "\n".join(lines) + "\n"
