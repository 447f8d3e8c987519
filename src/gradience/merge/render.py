"""Text rendering of a ``gradience.merge/v1`` document (the CLI prints it; the library never does).

It leads with the modules where the inputs interfere most (``conflict`` = ½·overlap·(1 − cos), the pairs of
updates that act on the same directions with opposite signs), because those are where a merge loses one
task's update to another.
"""

from __future__ import annotations

from typing import Any

from gradience.compress.render import policy_line
from gradience.policy.thresholds import MERGE_TEXT_TOP_MODULES
from gradience.textfmt import RULE, human_count, num, pct, safe_text

_METHOD_TEXT = {
    "cat": "cat (exact weighted sum, factors concatenated: rank sum(r_i))",
    "linear": "linear (exact weighted sum of the updates)",
    "svd": "svd (best rank-k approximation of the exact weighted sum, from the factors)",
    "ties": "ties (trim, elect sign, disjoint mean; Yadav et al. 2023), then truncated SVD",
    "dare": "dare (drop and rescale; Yu et al. 2024), weighted sum, then truncated SVD",
}


def render_text(doc: dict[str, Any]) -> str:
    out, summ = doc["output"], doc["summary"]
    lines = [RULE, "Gradience merge", RULE]
    for i, inp in enumerate(doc["inputs"]):
        lines.append(f"Input {i}:   {safe_text(inp.get('path') or inp.get('weights_path') or '-')} "
                     f"(weight {num(inp['weight'], 'g')}, sha256 {inp['sha256'][:12]}...)")
    dry = " (dry run: nothing written)" if out.get("dry_run") else ""
    lines.append(f"Output:    {safe_text(out.get('path') or '-')}{dry}")
    opts = doc.get("method_options") or {}
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    lines.append(f"Method:    {_METHOD_TEXT.get(doc['method'], doc['method'])}" + (f" [{extra}]" if extra else ""))
    pol = doc.get("policy")
    lines.append("Policy:    " + (policy_line(pol) if pol else "none (cat/linear: rank sum(r_i); "
                                                            "svd/ties/dare: the largest input rank)"))
    cfg = doc["config"]
    lines.append(f"Config:    r={cfg['r']} lora_alpha={cfg['lora_alpha']} rank_pattern: "
                 f"{len(cfg.get('rank_pattern') or {})} module(s), use_rslora=false")

    rows = [r for r in doc["modules"] if r["interference"]["conflict_max"] is not None]
    rows.sort(key=lambda r: (-r["interference"]["conflict_max"], r["name"]))
    rows = rows[:MERGE_TEXT_TOP_MODULES]
    if rows:
        lines += ["", f"Most interfering modules (top {len(rows)}; conflict = overlap x (1 - cos) / 2):",
                  f"  {'conflict':>8}  {'cos min':>7}  {'overlap':>7}  {'sign conf':>9}  module"]
        for r in rows:
            inter = r["interference"]
            overlaps = [p["overlap"] for p in inter["pairs"] if p.get("overlap") is not None]
            lines.append(f"  {num(inter['conflict_max'], '.3f'):>8}  {num(inter['cos_min'], '+.3f'):>7}  "
                         f"{num(max(overlaps) if overlaps else None, '.3f'):>7}  "
                         f"{pct(r.get('sign_conflict_rate')) if r.get('sign_conflict_rate') is not None else '-':>9}"
                         f"  {safe_text(r['name'])}")
    lines += ["", "Summary:",
              f"  Modules:          {summ['n_modules']} ({summ['n_partial']} in only some inputs)",
              f"  LoRA params:      exact sum {human_count(summ['params_sum'])} -> written "
              f"{human_count(summ['params_after'])}",
              f"  Ranks after:      {', '.join(map(str, summ['ranks_after']))}",
              f"  Energy retained:  min {pct(summ['energy_retained_min'])}, mean {pct(summ['energy_retained_mean'])}",
              f"  Rel. Frobenius error vs exact weighted sum (max): {num(summ['rel_frob_error_max'], '.4f')}"]
    if summ.get("sign_conflict_rate_mean") is not None:
        lines.append(f"  Sign conflicts:   {pct(summ['sign_conflict_rate_mean'])} of entries where several inputs "
                     "are non-zero (mean over modules)")
    partial = doc.get("partial_modules") or []
    if partial:
        lines.append(f"  Partial modules:  {', '.join(safe_text(n) for n in partial[:5])}"
                     + (f" and {len(partial) - 5} more" if len(partial) > 5 else "") + " (zero elsewhere)")
    lines += ["", "Portability:"]
    for engine, label in (("peft", "PEFT"), ("vllm", "vLLM"), ("llama_cpp", "llama.cpp")):
        v = (doc.get("portability") or {}).get(engine)
        if v:
            lines.append(f"  {label:<10} {'ok' if v['ok'] else 'NOT OK':<7} {safe_text(v['reason'])}")
    issues = doc.get("issues") or []
    if issues:
        lines += ["", "Issues:"]
        for issue in issues:
            lines.append(f"  [{issue['severity']}] {issue['code']}: {safe_text(issue['message'])}")
    if out.get("written"):
        lines += ["", "Next: gradience audit --peft-dir " + safe_text(out.get("path") or "OUT")
                  + "  (the merged ranks), then evaluate OUT on every input's task."]
    lines.append("")
    return "\n".join(lines)
