"""The merge view: a ``gradience.merge/v1`` document (``gradience merge``'s ``merge.json``) on one page.

Inputs with their weights and sha256, the method and policy, then per module (block × module type, the grid
of the adapter and compare maps): interference (conflict = ½·overlap·(1 − cos), the largest over input pairs;
the cosine of the input updates), retained energy and the rank written, the sign-conflict rate for
ties/dare; and a table of the modules, the most interfering first (the order of ``merge``'s text output).
"""

from __future__ import annotations

from typing import Any

from gradience.policy.thresholds import MERGE_TEXT_TOP_MODULES
from gradience.report.heatmap import ColorScale, build_heatmap, finite_values
from gradience.report.views.base import MAX_ISSUES_SHOWN, ChartIds, ModuleRows, View
from gradience.report.views.base import fact as _fact
from gradience.textfmt import finite, human_count, num, pct

#: rows of the module table (the rest are counted, not listed: the heatmaps show every module)
TOP_MERGE_ROWS = max(25, MERGE_TEXT_TOP_MODULES)

_METHOD_TEXT = {
    "cat": "cat: the exact weighted sum, factors concatenated (rank Σrᵢ)",
    "linear": "linear: the exact weighted sum of the updates",
    "svd": "svd: best rank-k approximation of the exact weighted sum, from the factors",
    "ties": "ties: trim, elect sign, disjoint mean (Yadav et al. 2023), then truncated SVD",
    "dare": "dare: drop and rescale (Yu et al. 2024), weighted sum, then truncated SVD",
}


def _inter(module: dict[str, Any], key: str) -> float | None:
    inter = module.get("interference")
    return finite(inter.get(key)) if isinstance(inter, dict) else None


def _pairs(module: dict[str, Any]) -> list[dict[str, Any]]:
    inter = module.get("interference")
    pairs = inter.get("pairs") if isinstance(inter, dict) else None
    return [p for p in pairs if isinstance(p, dict)] if isinstance(pairs, list) else []


def _overlap_max(module: dict[str, Any]) -> float | None:
    vals = [v for p in _pairs(module) if (v := finite(p.get("overlap"))) is not None]
    return max(vals) if vals else None


def _ranks_before(module: dict[str, Any]) -> str:
    ranks = module.get("ranks_before")
    if not isinstance(ranks, list):
        return "-"
    return " + ".join("·" if r is None else str(r) for r in ranks)


def _policy_text(policy: Any) -> str:
    if not isinstance(policy, dict):
        return "none (cat/linear keep rank Σrᵢ; svd/ties/dare the largest input rank)"
    from gradience.compress.render import policy_line

    try:
        return policy_line(policy)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):  # hand-edited: show its name
        return str(policy.get("name") or "-")


def _input_rows(inputs: list[Any]) -> list[dict[str, str]]:
    rows = []
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            continue
        sha = inp.get("sha256")
        rows.append({"i": str(i), "path": str(inp.get("path") or inp.get("weights_path") or "-"),
                     "weight": num(inp.get("weight"), "g"), "r": str(inp.get("r", "-")),
                     "alpha": num(inp.get("lora_alpha"), "g"),
                     "rslora": "yes" if inp.get("use_rslora") is True else "no",
                     "modules": str(inp.get("n_modules", "-")),
                     "sha": str(sha)[:12] + "…" if isinstance(sha, str) and sha else "-",
                     "sha_full": str(sha) if isinstance(sha, str) else ""})
    return rows


def merge_view(doc: dict[str, Any], ids: ChartIds) -> View:
    """A ``gradience.merge/v1`` document: inputs, summary cards, per-module heatmaps, most interfering modules."""
    summary = doc.get("summary") or {}
    table = ModuleRows.of(doc)
    modules, grid, col = table.rows, table.grid, table.column
    method = str(doc.get("method") or "-")
    elementwise = method in ("ties", "dare")

    conflict = col(lambda m: _inter(m, "conflict_max"))
    cos = col(lambda m: _inter(m, "cos_min"))
    energy = col(lambda m: finite(m.get("energy_retained")))
    rank_after = col(lambda m: finite(m.get("r_after")))
    three = lambda v: f"{v:.3f}"  # noqa: E731
    n_inputs = len([i for i in doc.get("inputs") or [] if isinstance(i, dict)])
    pair_note = "" if n_inputs <= 2 else ", the largest over input pairs"
    heatmaps = [
        build_heatmap("conflict", "interference (conflict)", grid, conflict, None, three, uid=ids.next(),
                      note="½·overlap·(1 − cos) of the input updates" + pair_note + "; 0: none, 1: opposite "
                           "updates in one subspace"),
        build_heatmap("cos", "cos of the input updates", grid, cos,
                      ColorScale.for_data(finite_values(cos), diverging=True), lambda v: f"{v:+.3f}",
                      uid=ids.next(), note="the smallest over input pairs; 1: same direction, 0: unrelated, "
                                           "−1: opposite (cancel)"),
        build_heatmap("energy", "retained energy", grid, energy, None, pct, uid=ids.next(),
                      note="Σσ² kept by the written rank / Σσ² of what was truncated" +
                           (" (the element-wise merge)" if elementwise else " (the exact weighted sum)")),
        build_heatmap("r_after", "rank written", grid, rank_after, None, lambda v: str(int(v)), uid=ids.next(),
                      note="rank of each merged module (its ranks before are in the table)"),
    ]
    if elementwise:
        signs = col(lambda m: finite(m.get("sign_conflict_rate")))
        heatmaps.append(build_heatmap("sign_conflict", "sign-conflict rate", grid, signs, None, pct,
                                      uid=ids.next(), note="entries where several inputs are non-zero after "
                                                           "trim/drop and their signs disagree"))
    for h in heatmaps:
        if h.empty:
            h.note = ("one input holds every module: no pair to compare" if h.key in ("conflict", "cos")
                      else "not computed for any module")

    def order_key(m: dict[str, Any]) -> tuple[int, float, str]:
        c = _inter(m, "conflict_max")
        return (c is None, -(c or 0.0), str(m["name"]))

    top = sorted(modules, key=order_key)[:TOP_MERGE_ROWS]
    rows = [{"name": str(m["name"]), "kind": str(m.get("kind") or "-"),
             "before": _ranks_before(m), "r_sum": str(m.get("r_sum", "-")), "after": str(m.get("r_after", "-")),
             "energy": pct(m.get("energy_retained")), "err": num(m.get("rel_frob_error"), ".4f"),
             "conflict": num(_inter(m, "conflict_max"), ".3f"), "cos": num(_inter(m, "cos_min"), "+.3f"),
             "overlap": num(_overlap_max(m), ".3f"), "signs": pct(m.get("sign_conflict_rate")),
             "partial": m.get("partial") is True} for m in top]
    out = doc.get("output") or {}
    opts = doc.get("method_options") or {}
    opts_text = ", ".join(f"{k}={v}" for k, v in opts.items()) if isinstance(opts, dict) else ""
    cfg = doc.get("config") or {}
    meta = [("Method", _METHOD_TEXT.get(method, method) + (f" [{opts_text}]" if opts_text else "")),
            ("Policy", _policy_text(doc.get("policy"))),
            ("Output", f"{out.get('path') or '-'}" + (" (dry run: nothing written)" if out.get("dry_run") else "")
             + f" · r={cfg.get('r', '-')} · lora_alpha={cfg.get('lora_alpha', '-')} · rank_pattern "
               f"{len(cfg.get('rank_pattern') or {}) if isinstance(cfg.get('rank_pattern'), dict) else 0} "
               f"module(s) · base {cfg.get('base_model_name_or_path') or '-'}")]
    ranks_after = summary.get("ranks_after")
    conflict_max = finite(summary.get("conflict_max"))
    cards = [
        _fact("Modules", str(summary.get("n_modules", len(modules))),
              f"{summary.get('n_partial', 0)} in only some inputs" if summary.get("n_partial") else ""),
        _fact("LoRA params", f"{human_count(summary.get('params_sum'))} → {human_count(summary.get('params_after'))}",
              "exact sum → written"),
        _fact("Ranks written", ", ".join(map(str, ranks_after)) if isinstance(ranks_after, list) and ranks_after
              else "-"),
        _fact("Energy retained", f"min {pct(summary.get('energy_retained_min'))}",
              f"mean {pct(summary.get('energy_retained_mean'))}"),
        _fact("Rel. error vs exact sum", f"max {num(summary.get('rel_frob_error_max'), '.4f')}",
              "‖written − Σ wᵢsᵢBᵢAᵢ‖_F / ‖Σ wᵢsᵢBᵢAᵢ‖_F"),
        _fact("Interference (conflict)", f"max {num(conflict_max, '.3f')}",
              f"mean {num(summary.get('conflict_mean'), '.3f')}"),
    ]
    if summary.get("sign_conflict_rate_mean") is not None:
        cards.append(_fact("Sign conflicts", pct(summary.get("sign_conflict_rate_mean")), "mean over modules"))
    portability = []
    for engine, label in (("peft", "PEFT"), ("vllm", "vLLM"), ("llama_cpp", "llama.cpp")):
        v = (doc.get("portability") or {}).get(engine)
        if isinstance(v, dict):
            portability.append({"engine": label, "ok": v.get("ok") is True, "reason": str(v.get("reason") or "")})
    partial = doc.get("partial_modules")
    context = {
        "meta": meta, "inputs": _input_rows(doc.get("inputs") or []), "cards": cards, "heatmaps": heatmaps,
        "rows": rows, "n_rows": len(modules), "portability": portability,
        "partial": [str(n) for n in partial] if isinstance(partial, list) else [],
        "issues": (doc.get("issues") or [])[:MAX_ISSUES_SHOWN], "elementwise": elementwise,
    }
    return View("merge", f"Merge ({method})", "views/merge.html.j2", context)
