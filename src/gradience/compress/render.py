"""Text rendering of a ``gradience.compress/v1`` document (the CLI prints it; the library never does)."""

from __future__ import annotations

from typing import Any

from gradience.policy.thresholds import COMPRESS_TEXT_TOP_LAYERS
from gradience.textfmt import RULE, human_count, num, pct, safe_text

_POLICY_TEXT = {
    "rank": "rank {v} everywhere",
    "energy": "energy >= {v} (smallest k with sum sigma_i^2 >= T * total; PEFT convert_to_lora)",
    "sv_fro": "sv_fro >= {v} (||dW_k||_F >= T * ||dW||_F; kohya)",
    "sv_cumulative": "sv_cumulative >= {v} (sum sigma_i >= T * total; kohya)",
    "sv_ratio": "sv_ratio {v} (keep sigma_i >= sigma_1 / X; kohya)",
    "per_layer": "per-layer audit suggestion (allowed rank >= margin x k@90%)",
    "budget": "budget {v} LoRA parameters (greedy by retained energy per parameter)",
}


def policy_line(policy: dict[str, Any]) -> str:
    text = _POLICY_TEXT.get(policy["name"], policy["name"]).format(v=policy.get("value"))
    mods = []
    if policy["name"] == "per_layer":
        mods.append(f"margin {policy.get('margin')}")
    for key in ("min_rank", "max_rank"):
        if policy.get(key) is not None:
            mods.append(f"{key.replace('_', '-')} {policy[key]}")
    if policy.get("allowed_ranks"):
        mods.append("allowed " + ",".join(map(str, policy["allowed_ranks"])))
    if policy.get("uniform"):
        mods.append(f"uniform r={policy.get('uniform_rank', '?')}")
    return text + (f" [{'; '.join(mods)}]" if mods else "")


def render_text(doc: dict[str, Any]) -> str:
    src, out, summ = doc["source"], doc["output"], doc["summary"]
    lines = [RULE, "Gradience compress", RULE,
             f"PEFT dir:  {safe_text(src.get('path') or '-')}",
             f"Weights:   {safe_text(src.get('weights_path') or '-')} (sha256 {src['sha256'][:12]}...)"]
    if out.get("dry_run"):
        lines.append(f"Output:    {safe_text(out.get('path') or '-')} (dry run: nothing written)")
    else:
        lines.append(f"Output:    {safe_text(out.get('path') or '-')}")
    if out.get("format", "peft") != "peft":  # --format mlx (compress/formats.py)
        lines.append(f"Format:    {safe_text(str(out['format']))} ({safe_text(str(out.get('weights')))})")
    lines.append(f"Policy:    {doc['policy']['conversion'] if doc['policy'].get('conversion') else policy_line(doc['policy'])}")
    pol = doc["policy"]
    if pol["name"] == "budget" and pol.get("budget_params") is not None:
        used = pol.get("budget_params_used")
        lines.append(f"Budget:    {human_count(pol['budget_params'])} allowed, "
                     f"{human_count(used if used is not None else summ['params_after'])} used")
    cfg = doc["config"]
    lines.append(f"Config:    r={cfg['r']} lora_alpha={cfg['lora_alpha']} rank_pattern: "
                 f"{len(cfg.get('rank_pattern') or {})} module(s), use_rslora=false, no alpha_pattern")
    lines += ["", "Summary:",
              f"  LoRA params:      {human_count(summ['params_before'])} -> {human_count(summ['params_after'])} "
              f"({pct(summ['reduction_ratio'])} fewer)",
              f"  Layers:           {summ['n_layers']} ({summ['n_truncated']} truncated, {summ['n_kept']} kept"
              + (f", {summ['n_padded']} padded" if summ["n_padded"] else "") + ")",
              f"  Ranks after:      {', '.join(map(str, summ['ranks_after']))}",
              f"  Energy retained:  min {pct(summ['energy_retained_min'])}, mean {pct(summ['energy_retained_mean'])}",
              f"  Rel. Frobenius error (max): {num(summ['rel_frob_error_max'], '.4f')}"]
    rows = sorted(doc["layers"], key=lambda r: (r["params_after"] - r["params_before"], r["name"]))
    rows = [r for r in rows if r["r_after"] < r["r_before"]][:COMPRESS_TEXT_TOP_LAYERS]
    if rows:
        lines += ["", f"Largest reductions (top {len(rows)}):",
                  f"  {'r':>9}  {'energy':>7}  {'frob err':>8}  {'params saved':>12}  module"]
        for r in rows:
            lines.append(f"  {r['r_before']:>4}->{r['r_after']:<4} {pct(r['energy_retained']):>7}  "
                         f"{num(r['rel_frob_error'], '.4f'):>8}  {human_count(r['params_before'] - r['params_after']):>12}"
                         f"  {safe_text(r['name'])}")
    lines += ["", "Portability:"]
    for engine, label in (("peft", "PEFT"), ("vllm", "vLLM"), ("llama_cpp", "llama.cpp")):
        v = doc["portability"][engine]
        if engine == "vllm" and v.get("version"):
            label = f"vLLM {v['version']}"  # the release range the verdict assumes (--engine-version)
        lines.append(f"  {label:<16} {'ok' if v['ok'] else 'NOT OK':<7} {safe_text(v['reason'])}")
    dora = doc.get("dora")
    if any(r.get("dora") for r in doc["layers"]):
        if dora and dora.get("rel_error_of_update_max") is not None:
            lines.append(f"  DoRA: directional part truncated, magnitudes kept; merged-weight error (max, relative "
                         f"to the update) {num(dora['rel_error_of_update_max'], '.4f')}")
        else:
            lines.append("  DoRA: directional part truncated, magnitudes kept (pass --base-model for the merged "
                         "weight's exact error)")
    udr = doc.get("udr")
    if udr:
        b, a = udr["before"], udr["after"]
        lines.append(f"  UDR (median): {num(b.get('udr_median'), '.4f')} -> {num(a.get('udr_median'), '.4f')}; "
                     f"layers with UDR: {a.get('n_layers_with_udr')}")
    issues = [i for i in doc["issues"] if i.get("severity") != "info" or i.get("code") in
              ("dora_directional_truncated", "zero_padded", "output_leftovers", "mlx_output", "format_converted")]
    if issues:
        lines += ["", "Issues:"]
        for issue in issues:
            lines.append(f"  [{issue['severity']}] {issue['code']}: {safe_text(issue['message'])}")
    if not out.get("dry_run") and out.get("written"):
        from gradience.bench.command import VERIFY_CONFIG, verify_command

        written = out.get("path") or "OUT"
        lines += ["", "Next: gradience audit --peft-dir " + safe_text(written) + "  (check the new ranks)",
                  f"  then verify it on your task ({VERIFY_CONFIG}: a bench config naming the task and eval data):",
                  "  " + safe_text(verify_command(written, src.get("path")))]
    lines.append("")
    return "\n".join(lines)


_policy_line = policy_line  # the earlier private name (merge's renderer imported it)
