"""One side of a comparison: an adapter directory (audited here, factors available) or an audit JSON file
(``gradience.audit/v1``: per-layer metrics only, so no cross measure of the updates themselves).

Both become the same thing: the audit summary (with ``layers``) plus, for a directory, the LoRA pairs by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gradience.adapter.model import LoraPair
from gradience.errors import InputError
from gradience.issues import Issue

SideKind = Literal["adapter", "audit_json"]
AUDIT_SCHEMA = "gradience.audit/v1"
AUDIT_MULTI_SCHEMA = "gradience.audit.multi/v1"
# An audit JSON of a 70B adapter with every σ is a few MiB; anything far larger is not one.
MAX_AUDIT_JSON_BYTES = 512 * 1024 * 1024


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
    return p.is_file() and p.suffix.lower() == ".json" and p.name != "adapter_config.json"


def read_audit_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``gradience audit --json`` output, validated enough to compare (rows with names)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_AUDIT_JSON_BYTES:
            raise InputError(f"file is {size / 2**20:.0f} MiB, too large for an audit JSON", p)
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", p) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file (expected an audit JSON or an adapter directory)", p) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON (line {exc.lineno}: {exc.msg})", p) from None
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object (a gradience audit --json output)", p)
    schema = doc.get("schema")
    if schema == AUDIT_MULTI_SCHEMA:
        names = ", ".join(sorted(doc.get("adapters") or {})) or "-"
        raise InputError(f"holds several adapter audits ({names}); audit one with "
                         "`gradience audit --peft-dir DIR --adapter-name NAME --json` and compare that", p)
    if schema != AUDIT_SCHEMA:
        raise InputError(f"schema is {schema!r}, expected {AUDIT_SCHEMA!r} (the output of "
                         "`gradience audit --json`)", p)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                               for r in layers):
        raise InputError("'layers' must be a list of rows with a 'name' (an audit --json output)", p)
    if not layers:
        raise InputError("the audit has no layers to compare", p)
    return doc


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
    doc = read_audit_json(path)
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
    if not p.exists():
        raise InputError("not found (expected an adapter directory or an audit JSON file)", p)
    if is_audit_json(p):
        return side_from_audit_json(path, base_model=base_model, base_norms_cache=base_norms_cache,
                                    progress=progress)
    if p.is_file():
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
