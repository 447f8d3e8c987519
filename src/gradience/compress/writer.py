"""Write a PEFT adapter directory whole: safetensors + adapter_config.json + our JSON report, atomically.

Public for every command that writes an adapter (``compress`` now, ``merge`` next)::

    out = check_adapter_out(out_dir, inputs=[in_dir], force=force, report_name="merge.json")
    write_peft_adapter(out, specs, config, report=lambda: doc, report_name="merge.json", metadata={...})

The tensors are streamed (:class:`~gradience.io.safetensors_write.TensorSpec`, one tensor in memory at a time)
into a staging directory beside OUT that replaces OUT only when complete (:mod:`gradience.io.outdir`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gradience.io.outdir import OutputDir, check_output_dir, stage
from gradience.io.safetensors_write import TensorSpec

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# Reports whose presence marks a directory as an earlier output of ours (what --force may replace).
REPORT_NAMES = ("compress.json", "merge.json")


def check_adapter_out(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], force: bool,
                      report_name: str = "compress.json", clean: bool = True) -> OutputDir:
    """:func:`gradience.io.outdir.check_output_dir` for an adapter OUT (replaceable if it holds one of our
    reports); ``clean=False`` (dry runs) leaves leftovers of killed runs alone."""
    markers = tuple(dict.fromkeys((report_name, *REPORT_NAMES)))
    return check_output_dir(out, inputs, force, markers, clean=clean)


def config_bytes(config: Mapping[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_peft_adapter(out: OutputDir, specs: Sequence[TensorSpec], config: Mapping[str, Any],
                       report: Callable[[], Mapping[str, Any]], report_name: str,
                       metadata: Mapping[str, str] | None = None,
                       on_weights_written: Callable[[], None] | None = None,
                       weights_name: str = WEIGHTS_NAME) -> None:
    """Write OUT/adapter_model.safetensors (or ``weights_name``: mlx-lm's ``adapters.safetensors``),
    OUT/adapter_config.json and OUT/``report_name`` and swap them in.

    ``report`` is called after the weights are written (so it can describe what was written);
    ``on_weights_written`` runs just before it. Raises ``InputError`` (nothing written, OUT untouched) on
    OSError; anything else propagates after the staging directory is removed.
    """
    from gradience import jsonio
    from gradience.audit.jsonout import dumps_json
    from gradience.io.safetensors_write import write_safetensors

    with stage(out) as st:
        write_safetensors(st.path / weights_name, specs, dict(metadata or {}))
        st.write_file(CONFIG_NAME, config_bytes(config))
        if on_weights_written is not None:
            on_weights_written()
        doc = dict(report())
        # "layers" rows (compress): the audit's writer, rows by one C-encoder call (same parsed document; 2,048
        # MoE expert rows ~3x faster); other reports (merge's "modules") gain nothing from it and go the plain way
        text = dumps_json(doc) if isinstance(doc.get("layers"), list) else jsonio.dumps(doc)
        st.write_file(report_name, (text + "\n").encode("utf-8"))
        st.finalize()
