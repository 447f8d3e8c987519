"""Human-readable compare output, rendered from the ``gradience.compare/v1`` document so text and JSON agree.

Layout: a header, the summary (with the seed's "=== UDR Comparison ===" lines: both UDR medians and fractions
of layers above 0.3, labelled by the sides' directory names), then the top N modules by the sort key — with
the UDR sort this is the seed's "Biggest UDR differences", ordered by |ΔUDR|.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradience.textfmt import RULE, finite, num, pct, safe_text

_SORT_TITLES = {
    "udr": "Biggest UDR differences (by |ΔUDR|)",
    "cos": "Least aligned updates (lowest cos first)",
    "overlap": "Least overlapping subspaces (lowest mean overlap first)",
    "name": "Modules (by name)",
}
_LIST_LIMIT = 10


def _signed(x: Any, fmt: str = "+.3f") -> str:
    return "-" if finite(x) is None else format(x, fmt)


def _cap(label: str) -> str:
    return label[:1].upper() + label[1:]


def _side_line(tag: str, side: Mapping[str, Any], width: int) -> str:
    kind = "adapter" if side["kind"] == "adapter" else "audit JSON"
    alpha = side.get("alpha")
    alpha_text = "-" if alpha is None else f"{alpha:g}"
    rs = ", rsLoRA" if side.get("use_rslora") else ""
    return (f"{tag}: {side['label']:<{width}}  ({kind}, r={side.get('r') if side.get('r') is not None else '-'}, "
            f"alpha={alpha_text}{rs}, {side['n_layers']} modules)  {safe_text(side['path'])}")


def _names_line(title: str, names: Sequence[str]) -> list[str]:
    if not names:
        return []
    shown = ", ".join(names[:_LIST_LIMIT]) + (f" (+{len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT
                                              else "")
    return [f"{title} ({len(names)}): {shown}"]


def _r_pair(m: Mapping[str, Any]) -> str:
    ra, rb = m["a"].get("r"), m["b"].get("r")
    return f"{ra if ra is not None else '-'}/{rb if rb is not None else '-'}"


def _table(modules: Sequence[Mapping[str, Any]], with_udr: bool, with_cross: bool) -> list[str]:
    """Columns that carry information only: UDR ones with a base model, cos/overlap ones with factors."""
    head = ["  "]
    if with_udr:
        head.append(f"{'ΔUDR':>7}  {'UDR A':>6}  {'UDR B':>6}  ")
    if with_cross:
        head.append(f"{'cos':>6}  {'overlap L/R':>11}  ")
    head.append(f"{'r A/B':>5}  {'util A/B':>13}  module")
    lines = ["".join(head)]
    for m in modules:
        cells = ["  "]
        if with_udr:
            cells.append(f"{_signed(m['delta']['udr']):>7}  {num(m['a']['udr'], '.3f'):>6}  "
                         f"{num(m['b']['udr'], '.3f'):>6}  ")
        if with_cross:
            overlap = f"{num(m.get('overlap_left'), '.3f')}/{num(m.get('overlap_right'), '.3f')}"
            cells.append(f"{num(m.get('cos'), '+.3f'):>6}  {overlap:>11}  ")
        util = f"{pct(m['a']['utilization'])}/{pct(m['b']['utilization'])}"
        cells.append(f"{_r_pair(m):>5}  {util:>13}  {safe_text(m['name'])}")
        lines.append("".join(cells))
    return lines


def render_text(doc: Mapping[str, Any]) -> str:
    a, b, s = doc["a"], doc["b"], doc["summary"]
    la, lb = _cap(a["label"]), _cap(b["label"])
    width = max(len(la), len(lb))
    lines = [RULE, "GRADIENCE LoRA COMPARE", RULE,
             _side_line("A", a, width), _side_line("B", b, width)]
    bases = {x for x in (a.get("udr_base_model"), b.get("udr_base_model")) if x}
    if bases:
        lines.append(f"Base model (UDR): {', '.join(sorted(bases))}")
    unavailable: Mapping[str, str] = s.get("unavailable") or {}

    k_text = "k = min(k@90% of A, of B) per module" if s.get("k") == "min_energy_rank_90" else f"k = {s.get('k')}"
    lines += ["", "Summary:",
              f"  Matched modules: {s['n_matched']}   only in A: {len(s['only_in_a'])}   "
              f"only in B: {len(s['only_in_b'])}"]
    if "cos" in unavailable:
        lines.append("  Update cosine / subspace overlaps: not computed (see below)")
    else:
        lines += [f"  Update cosine (mean / median):        {num(s['cos_mean'], '+.3f')} / "
                  f"{num(s['cos_median'], '+.3f')}",
                  f"  Subspace overlap left / right (mean): {num(s['overlap_left_mean'], '.3f')} / "
                  f"{num(s['overlap_right_mean'], '.3f')}   ({k_text})"]
    lines.append(f"  Utilization (mean): {la} {pct(s['a']['utilization_mean'])}   "
                 f"{lb} {pct(s['b']['utilization_mean'])}")

    lines += ["", "=== UDR Comparison ==="]
    if "udr" in unavailable and s["a"]["udr_median"] is None and s["b"]["udr_median"] is None:
        lines.append(f"UDR not computed: {unavailable['udr']}")
    else:
        w = width + len(" UDR median:")
        lines += [f"{(la + ' UDR median:'):<{w}} {num(s['a']['udr_median'], '.3f')}",
                  f"{(lb + ' UDR median:'):<{w}} {num(s['b']['udr_median'], '.3f')}",
                  "",
                  f"{(la + ' layers > 0.3 UDR:'):<{w + 7}} {pct(s['a']['fraction_udr_gt_0_3'])}",
                  f"{(lb + ' layers > 0.3 UDR:'):<{w + 7}} {pct(s['b']['fraction_udr_gt_0_3'])}"]

    modules: Sequence[Mapping[str, Any]] = doc.get("modules") or []
    top = doc.get("options", {}).get("top", 10)
    shown = modules[: max(0, int(top))]
    sort = doc.get("options", {}).get("sort", "name")
    if shown:
        with_udr = any(m["a"]["udr"] is not None or m["b"]["udr"] is not None for m in modules)
        with_cross = "cos" not in unavailable
        lines += ["", f"{_SORT_TITLES.get(sort, 'Modules')}, top {len(shown)} of {len(modules)}:"]
        lines += _table(shown, with_udr, with_cross)

    extra = _names_line("Only in A", s["only_in_a"]) + _names_line("Only in B", s["only_in_b"])
    if extra:
        lines += ["", *extra]
    if unavailable:
        lines += ["", "Not computed:"]
        if "cos" in unavailable:
            lines.append(f"  cos, overlap_left, overlap_right: {unavailable['cos']}")
        if "udr" in unavailable:
            lines.append(f"  udr: {unavailable['udr']}")

    lines += ["", "Issues:"]
    issues = [i for i in doc.get("issues") or [] if i.get("code") != "measures_unavailable"]
    if issues:
        lines += [f"  [{i.get('severity', 'info')}] {i.get('code')}: {i.get('message')}" for i in issues]
    else:
        lines.append("  none")
    return "\n".join(lines) + "\n"
