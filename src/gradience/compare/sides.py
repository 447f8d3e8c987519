"""One side of a comparison: an adapter directory (audited here, factors available) or an audit JSON file
(``gradience.audit/v1``, or the reference tool's audit JSON converted to it by :func:`load_audit_json`:
per-layer metrics only, so no cross measure of the updates themselves).

Both become the same thing: the audit summary (with ``layers``) plus, for a directory, the LoRA pairs by name.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gradience.adapter.model import LoraPair
from gradience.adapter.pairs import module_name
from gradience.errors import InputError
from gradience.io.textfile import exists, is_file, read_bytes_limited
from gradience.issues import Issue
from gradience.jsonio import MAX_JSON_INT, loads_bounded
from gradience.modules import classify_module
from gradience.textfmt import safe_text

SideKind = Literal["adapter", "audit_json"]
AUDIT_SCHEMA = "gradience.audit/v1"
AUDIT_MULTI_SCHEMA = "gradience.audit.multi/v1"
REFERENCE_FORMAT = "johntnanney/gradience audit --json"
# An audit JSON of a 70B adapter with every σ is a few MiB (560 rows x ~300 values); a 61-layer 256-expert MoE
# adapter ~3M values. Decoded JSON takes ~10x its text, so both are bounded before decoding: a 300 MB file of
# 24M tiny rows is refused in a second instead of exhausting memory.
MAX_AUDIT_JSON_BYTES = 256 * 1024 * 1024
MAX_AUDIT_JSON_ITEMS = 8_000_000
_NAMES_SHOWN = 5


@dataclass
class Side:
    """What the comparison needs from one input."""

    path: str
    kind: SideKind
    summary: dict[str, Any]                    # the gradience.audit/v1 summary, ``layers`` included
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # by row name; empty for audit JSON
    udr_stats: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.summary.get("layers") or []
        return rows

    @property
    def adapter_block(self) -> dict[str, Any]:
        block = self.summary.get("adapter")
        return block if isinstance(block, dict) else {}

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.adapter_block.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None


def is_audit_json(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return is_file(p) and p.suffix.lower() == ".json" and p.name != "adapter_config.json"


def load_audit_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An audit JSON as a ``gradience.audit/v1`` document with ``layers`` (validated enough to compare and
    report): ours, or the reference tool's (johntnanney/gradience ``audit --json --layers``: no ``schema``
    key, rows under ``layer_data.layer_rows`` or ``layers``, full PEFT key names, ``delta_fro_norm``), which
    is converted (see :func:`from_reference_audit`). Public: ``report`` reads audit JSON through this too.

    Bounded before decoding: at most ``MAX_AUDIT_JSON_BYTES`` and ``MAX_AUDIT_JSON_ITEMS`` JSON values, nesting
    and integers bounded by :func:`gradience.jsonio.loads_bounded`; every problem is one InputError."""
    p = Path(path)
    raw = read_bytes_limited(p, what="audit JSON", max_bytes=MAX_AUDIT_JSON_BYTES)
    doc = loads_bounded(raw, p, "audit JSON", max_abs_int=MAX_JSON_INT, max_items=MAX_AUDIT_JSON_ITEMS)
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object (a gradience audit --json output)", p)
    schema = doc.get("schema")
    if schema == AUDIT_MULTI_SCHEMA:
        adapters = doc.get("adapters")
        listed = sorted(str(k)[:60] for k in adapters) if isinstance(adapters, (dict, list)) else []
        names = safe_text(", ".join(listed[:_NAMES_SHOWN]) + (" …" if len(listed) > _NAMES_SHOWN else "")) or "-"
        raise InputError(f"holds several adapter audits ({names}); audit one with "
                         "`gradience audit --peft-dir DIR --adapter-name NAME --json` and compare that", p)
    if schema is None and _reference_rows(doc) is not None:
        doc = from_reference_audit(doc)
    elif schema != AUDIT_SCHEMA:
        shown = safe_text(repr(schema)[:80])
        raise InputError(f"schema is {shown}, expected {AUDIT_SCHEMA!r} (the output of "
                         "`gradience audit --json`)", p)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                               for r in layers):
        raise InputError("'layers' must be a list of rows with a 'name' (an audit --json output)", p)
    if not layers:
        hint = " (the reference tool writes rows only with --layers)" if doc.get("converted_from") else ""
        raise InputError(f"the audit has no layers to compare{hint}", p)
    seen: dict[str, int] = {}
    for i, row in enumerate(layers):  # two rows for one module: which one to compare is unknowable
        first = seen.setdefault(row["name"], i)
        if first != i:
            raise InputError(f"rows {first} and {i} are both module {safe_text(row['name'], max_len=120)!r}; "
                             "an audit has one row per module", p)
    return doc


read_audit_json = load_audit_json  # the earlier name


def _reference_rows(doc: dict[str, Any]) -> list[Any] | None:
    """The row list of a reference-tool audit JSON (``layer_data.layer_rows``, or ``layers`` in its bench
    ``audit.json``), or None when ``doc`` is not one."""
    data = doc.get("layer_data")
    if isinstance(data, dict) and isinstance(data.get("layer_rows"), list):
        rows: list[Any] = data["layer_rows"]
        return rows
    if isinstance(doc.get("layers"), list) or "total_lora_params" in doc:
        rows = doc.get("layers") or []
        return rows if isinstance(rows, list) else None
    return None


# Reference row keys that differ from ours only in spelling (ours are also written by our audit as aliases).
_REFERENCE_ROW_KEYS = {"delta_fro_norm": "delta_frob_norm", "base_fro_norm": "base_frob_norm",
                       "top_singular_values": "singular_values"}


def from_reference_audit(doc: dict[str, Any]) -> dict[str, Any]:
    """The reference tool's audit JSON in our ``gradience.audit/v1`` shape: rows renamed to base-model module
    names (``base_model.model.`` stripped, the PEFT key kept as ``peft_prefix``), spelling aliases mapped,
    and an ``adapter`` block with r / lora_alpha where every row agrees. Its metric values are used as they
    are: its definitions of utilization, stable rank, energy ranks and UDR are ours (SPEC §3)."""
    rows_in = _reference_rows(doc) or []
    rows: list[dict[str, Any]] = []
    for row in rows_in:
        if not isinstance(row, dict):
            rows.append(row)  # rejected by the caller's row check, naming the problem
            continue
        out = dict(row)
        name = row.get("name")
        if isinstance(name, str):
            out["name"] = module_name(name)
            out.setdefault("peft_prefix", name)
            out["module_type"] = classify_module(out["name"])  # our classifier's vocabulary, not its attn/mlp/other
        for theirs, ours in _REFERENCE_ROW_KEYS.items():
            if ours not in out and theirs in row:
                out[ours] = row[theirs]
        out.setdefault("kind", "linear")
        rows.append(out)
    converted = {k: v for k, v in doc.items() if k not in ("layer_data", "layers")}
    summary = doc.get("summary")
    if isinstance(summary, dict):  # its bench audit.json nests the summary
        for key, value in summary.items():
            converted.setdefault(key, value)
    adapter: dict[str, Any] = {}
    for key, ours in (("r", "r"), ("alpha", "lora_alpha")):
        values = {row.get(key) for row in rows if isinstance(row, dict) and isinstance(row.get(key), (int, float))}
        adapter[ours] = values.pop() if len(values) == 1 else None
    adapter["base_model_name_or_path"] = None
    converted.update({"schema": AUDIT_SCHEMA, "converted_from": REFERENCE_FORMAT, "adapter": adapter,
                      "layers": rows})
    return converted


def _dims(row: dict[str, Any]) -> tuple[int, int] | None:
    """(d_out, d_in) of ΔW from a row's stored factor shapes (A (r, d_in…) / B (d_out, r), or both transposed)."""
    a, b, r = row.get("a_shape"), row.get("b_shape"), row.get("r")
    if not (isinstance(a, list) and isinstance(b, list) and len(a) >= 2 and len(b) >= 2 and isinstance(r, int)):
        return None
    if not all(isinstance(x, int) for x in a + b):
        return None
    if a[0] == r and b[1] == r:
        return b[0], math.prod(a[1:])
    if a[-1] == r and b[0] == r:  # stored transposed
        return b[1], a[0]
    return None


def side_from_audit_json(path: str, *, base_model: str | None, base_norms_cache: str | None,
                         progress: bool) -> tuple[Side, list[Issue]]:
    """An audit JSON side; with ``base_model`` its UDR is recomputed from the rows' update norms (the base
    norms come from the shared cache when the other side already read them)."""
    doc = load_audit_json(path)
    issues: list[Issue] = []
    side = Side(path=str(path), kind="audit_json", summary=doc)
    if base_model:
        from gradience.udr import PER_LAYER_KEYS, SUMMARY_KEYS, UdrInput, measure_udr

        inputs, skipped = [], []
        for row in doc["layers"]:
            dims = _dims(row)
            if dims is None:
                skipped.append(row["name"])
                continue
            dsm, dfn = row.get("delta_sigma_max"), row.get("delta_frob_norm")
            inputs.append(UdrInput(name=row["name"], delta_sigma_max=dsm if isinstance(dsm, (int, float)) else None,
                                   delta_frob_norm=dfn if isinstance(dfn, (int, float)) else None,
                                   d_out=dims[0], d_in=dims[1], kind=str(row.get("kind") or "linear")))
        report = measure_udr(inputs, base_model, cache_path=base_norms_cache, progress=progress)
        issues.extend(report.issues)
        if skipped:
            issues.append(Issue("udr_rows_without_shapes", f"{len(skipped)} rows of {path} have no usable "
                                "a_shape/b_shape; their UDR is null", "warning", modules=skipped))
        for row in doc["layers"]:
            values = report.per_layer.get(row["name"]) or {}
            for key in PER_LAYER_KEYS:
                row[key] = values.get(key)
        for key in SUMMARY_KEYS:
            doc[key] = report.summary.get(key)
        doc["udr_requested"] = True
        doc["udr_base_model"] = report.base_model
        side.udr_stats = dict(report.stats)
    return side, issues


def side_from_adapter(path: str, *, base_model: str | None, base_norms_cache: str | None,
                      progress: bool) -> tuple[Side, list[Issue]]:
    """An adapter directory: loaded with the adapter reader and audited (UDR via the audit's own path)."""
    from gradience.adapter import load_adapter
    from gradience.audit import AuditOptions, run_audit

    loaded = load_adapter(path)
    options = AuditOptions(udr=True, base_model=base_model, base_norms_cache=base_norms_cache, progress=progress)
    result = run_audit(loaded, options)
    summary = result.to_summary(include_layers=True)
    pairs = {pair.name: pair for pair in loaded.pairs}
    side = Side(path=str(path), kind="adapter", summary=summary, pairs=pairs, udr_stats=dict(result.udr_stats))
    return side, []  # the audit's issues are in summary["issues"]


def load_side(path: str, *, base_model: str | None, base_norms_cache: str | None,
              progress: bool = False) -> tuple[Side, list[Issue]]:
    """Dispatch on what ``path`` is: an audit JSON file or an adapter directory (anything else: InputError)."""
    p = Path(path)
    if not exists(p):
        raise InputError("not found (expected an adapter directory or an audit JSON file)", p)
    if is_audit_json(p):
        return side_from_audit_json(path, base_model=base_model, base_norms_cache=base_norms_cache,
                                    progress=progress)
    if is_file(p):
        raise InputError("expected an adapter directory or an audit JSON file (.json from "
                         "`gradience audit --json`)", p)
    return side_from_adapter(path, base_model=base_model, base_norms_cache=base_norms_cache, progress=progress)


# Directory names that say nothing about which run an adapter came from: the parent names it instead.
_GENERIC_DIRS = re.compile(r"^(adapter|adapters|adapter_model|lora|final|best|output|outputs|model|"
                           r"checkpoint(-\d+)?|default)$", re.IGNORECASE)


def side_labels(path_a: str, path_b: str) -> tuple[str, str]:
    """Short names for the two sides: path components shared at the end are dropped, then the last one left,
    skipping generic directory names (``runs/conservative/adapter`` vs ``runs/aggressive/adapter`` ->
    conservative / aggressive; ``x_audit.json`` -> x_audit); "A"/"B" when the paths are the same."""
    pa = list(Path(os.path.abspath(path_a)).parts)
    pb = list(Path(os.path.abspath(path_b)).parts)
    if pa == pb:
        return "A", "B"
    while len(pa) > 1 and len(pb) > 1 and pa[-1] == pb[-1]:
        pa.pop()
        pb.pop()
    la, lb = _label(pa), _label(pb)
    return (la, lb) if la != lb else (_label(pa[-1:]), _label(pb[-1:]))


def _label(parts: list[str]) -> str:
    i = len(parts) - 1
    while i > 0 and _GENERIC_DIRS.match(parts[i]) and not parts[i].lower().endswith(".json"):
        i -= 1
    part = parts[i] if i > 0 else parts[-1]
    return part[:-5] if part.lower().endswith(".json") else part
