"""``compress`` as a library: plan every layer's rank, then write the smaller adapter (SPEC §12).

Data flow: the adapter reader (headers only) → the audit's exact spectra (:mod:`gradience.compress.plan`)
→ the policy decides k per layer → :class:`CompressResult` (the ``gradience.compress/v1`` document,
:mod:`gradience.compress.result`) → the writer streams the new factors (:mod:`gradience.compress.tensors`),
pair by pair, into a staging directory beside OUT that replaces OUT atomically at the end
(:mod:`gradience.compress.writer`, :mod:`gradience.io.outdir`). Nothing here prints.

Every name this module has exported before is still importable from here.
"""

from __future__ import annotations

import json
import os

from gradience.adapter.model import LoadedAdapter
from gradience.compress.plan import mutated_init, plan, preflight
from gradience.compress.portability import portability
from gradience.compress.result import (
    CONFIG_NAME,
    DTYPE_CHOICES,
    REPORT_NAME,
    SCHEMA,
    WEIGHTS_NAME,
    CompressOptions,
    CompressResult,
    LayerPlan,
)
from gradience.compress.tensors import output_facts, source_sha256, tensor_specs
from gradience.compress.writer import check_adapter_out, write_peft_adapter
from gradience.io.outdir import OutputDir
from gradience.issues import Issue


def _inputs(loaded: LoadedAdapter) -> list[str]:
    return [p for p in (loaded.peft_dir, loaded.adapter_weights_path, loaded.adapter_config_path) if p]


def check_output_dir(out: str | os.PathLike[str], loaded: LoadedAdapter, force: bool) -> OutputDir:
    """Refuse OUT == IN, OUT inside IN, IN inside OUT, a file, a symlink, the current directory, or a non-empty
    OUT unless ``force`` and OUT is an earlier output of ours (holds compress.json). See
    :func:`gradience.io.outdir.check_output_dir`."""
    return check_adapter_out(out, _inputs(loaded), force, REPORT_NAME)


def compress(loaded: LoadedAdapter, out: str | os.PathLike[str] | None, options: CompressOptions) -> CompressResult:
    """Plan and (unless ``options.dry_run`` or ``out`` is None) write the compressed adapter to ``out``."""
    from gradience.blas import limited_blas_threads
    from gradience.compress import formats

    fmt = formats.prepare(loaded, options)  # --format: refuse an inexact conversion before any work
    out_dir = None
    if out is not None:
        out_dir = check_adapter_out(out, _inputs(loaded), options.force, REPORT_NAME, clean=not options.dry_run)
    with limited_blas_threads():
        layers, config, issues, extra = plan(loaded, options)
    options.policy.extra.update(extra)
    written_config, format_issues = formats.output_config(loaded, layers, config, fmt)
    issues.extend(format_issues)
    if out_dir is not None and out_dir.notes:
        issues.append(Issue("output_leftovers", "; ".join(out_dir.notes), "info"))
    result = CompressResult(loaded=loaded, options=options, layers=layers, out_config=config, portability={},
                            issues=issues, source_sha256=source_sha256(loaded),
                            out_dir=None if out_dir is None else os.fspath(out_dir.path),
                            out_format=fmt, weights_name=formats.weights_name(fmt))
    specs, dtypes, non_lora = tensor_specs(loaded, layers, DTYPE_CHOICES[options.dtype])
    specs = formats.output_specs(loaded, layers, specs, fmt)
    result.dtype_out = dtypes
    result.non_lora = non_lora
    result.portability = portability(output_facts(layers, config, non_lora), options.engine_versions)
    if options.base_model:
        from gradience.compress.base import base_checks

        result.udr, result.dora = base_checks(loaded, layers, options)
    if options.dry_run or out_dir is None:
        return result

    def mark_written() -> None:
        result.written = True

    metadata = {"format": "pt", "gradience_source_sha256": result.source_sha256,
                "gradience_policy": json.dumps(options.policy.to_dict(), sort_keys=True, default=str)}
    try:
        with limited_blas_threads():
            write_peft_adapter(out_dir, specs, written_config, report=result.to_dict, report_name=REPORT_NAME,
                               metadata=metadata, on_weights_written=mark_written,
                               weights_name=formats.weights_name(fmt))
    except BaseException:
        result.written = False
        raise
    return result


__all__ = [
    "CONFIG_NAME",
    "REPORT_NAME",
    "SCHEMA",
    "WEIGHTS_NAME",
    "CompressOptions",
    "CompressResult",
    "LayerPlan",
    "check_output_dir",
    "compress",
    "mutated_init",
    "plan",
    "preflight",
]


