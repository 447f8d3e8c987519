"""Text rendering of a ``gradience.verify/v1`` document (the CLI escapes names from files before printing)."""

from __future__ import annotations

from typing import Any

from gradience.textfmt import RULE, num

_MAX_ROWS = 40


def _scale(x: Any) -> str:
    return num(x, ".4f")


def _merged(doc: dict[str, Any]) -> list[str]:
    s = doc["summary"]
    lines = [f"merged: {doc['merged']}", f"base:   {doc['base_model']}",
             f"modules: {s['modules']}  exact: {s['exact']}  not exact: {s['not_exact']}  "
             f"untouched weights checked: {s['unchanged_checked']} (changed: {s['unchanged_changed']})", "",
             f"{'module':<48} {'verdict':<21} {'c':>8} {'resid':>9} {'floor':>9}"]
    for row in doc["modules"][:_MAX_ROWS]:
        verdict = row.get("verdict") or "unchecked"
        lines.append(f"{row['name'][-48:]:<48} {verdict:<21} {_scale(row.get('applied_scale')):>8} "
                     f"{num(row.get('residual'), '.2e'):>9} {num(row.get('rounding_floor'), '.2e'):>9}")
        if verdict != "exact":
            lines.append(f"    {row.get('detail') or row.get('problem')}")
    for dtype, text in doc.get("rounding", {}).items():
        lines.append(f"{dtype}: {text}")
    qlora = doc.get("qlora")
    if qlora:
        into = qlora.get("merged_into")
        lines.append(f"QLoRA: {qlora['why']}" + (f"; merged into: {', '.join(f'{k} {v}' for k, v in into.items())}"
                                                 if into else ""))
    lines.append("c = <W_merged - W_base, s*B*A> / ||s*B*A||^2; resid and floor relative to ||s*B*A||_F")
    return lines


def _mapping(doc: dict[str, Any]) -> list[str]:
    s = doc["summary"]
    v = doc["engine_verdict"]
    lines = [f"engine: {doc['engine']} ({v['version']})  base: {doc['base_model']}",
             f"modules: {s['modules']}  resolved: {s['resolved']}  errors: {s['errors']}  warnings: {s['warnings']}",
             f"features: {'ok' if v['ok'] else 'NOT SUPPORTED'}: {v['reason']}", ""]
    for row in doc["modules"][:_MAX_ROWS]:
        target = row.get("engine_name") or row.get("base_tensor") or "-"
        lines.append(f"{row['status']:<8} {row['name'][-48:]:<48} -> {target}")
        if row["status"] != "ok":
            lines.append(f"    {row['detail']} [{row['rule']}: {row['source']}]")
    limits = doc.get("limits", {})
    if "serve_with_max_lora_rank" in limits:
        lines.append(f"max rank {limits['max_rank']}: serve with --max-lora-rank "
                     f"{limits['serve_with_max_lora_rank'] or 'none (above 512)'}")
    return lines


def _gguf(doc: dict[str, Any]) -> list[str]:
    s = doc["summary"]
    lines = [f"gguf: {doc['gguf']}  architecture: {doc['architecture']}  adapter.lora.alpha: {doc['lora_alpha']}",
             f"modules: {s['modules']}  exact: {s['exact']}  not exact: {s['not_exact']}  "
             f"extra pairs in the file: {s['extra_in_gguf']}", "",
             f"{'module':<48} {'verdict':<12} {'c':>8} {'rel err':>9}"]
    for row in doc["modules"][:_MAX_ROWS]:
        lines.append(f"{row['name'][-48:]:<48} {row['verdict']:<12} {_scale(row.get('applied_scale')):>8} "
                     f"{num(row.get('rel_error'), '.2e'):>9}")
        if row["verdict"] != "exact":
            lines.append(f"    {row['detail']}")
    return lines


def render_text(doc: dict[str, Any]) -> str:
    body = {"merged": _merged, "mapping": _mapping, "gguf": _gguf}[doc["mode"]](doc)
    more = len(doc["modules"]) - _MAX_ROWS
    if more > 0:
        body.append(f"... {more} more module(s) in --json")
    issues = [f"[{i['severity']}] {i['code']}: {i['message']}" for i in doc["issues"]]
    head = f"gradience verify ({doc['mode']}): {'OK' if doc['ok'] else 'PROBLEMS FOUND'}"
    return "\n".join([RULE, head, RULE, *body, *(["", "issues:", *issues] if issues else [])]) + "\n"
