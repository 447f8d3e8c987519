"""Facts ``gradience check`` gathers from outside the config (issue 18): the base model's size / recurrent
layers / experts (:mod:`gradience.policy.model_facts`) and whether ``gradience compress`` wrote the adapter.

Compress provenance is recognised two ways, either enough: a ``compress.json`` (schema ``gradience.compress/v1``)
beside ``adapter_config.json``, or the ``gradience_policy`` key compress writes into the safetensors
``__metadata__``. Only the safetensors header is read (the validating reader; no tensor data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.policy.check_rules import CheckContext
from gradience.policy.model_facts import model_facts, read_model_config
from gradience.telemetry.types import ConfigSnapshot

COMPRESS_SCHEMA = "gradience.compress/v1"   # compress/core.py SCHEMA (not imported: that module pulls numpy)
COMPRESS_REPORT = "compress.json"
COMPRESS_METADATA_KEY = "gradience_policy"
_WEIGHT_FILES = ("adapter_model.safetensors",)


def compress_provenance(peft_config_path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """``{"by": ..., "path": ...}`` when the adapter beside ``adapter_config.json`` was written by compress."""
    if peft_config_path is None:
        return None
    folder = Path(peft_config_path).parent
    report = folder / COMPRESS_REPORT
    if report.is_file():
        from gradience.config.loader import read_mapping

        try:
            data = read_mapping(report)
        except InputError:
            data = {}
        if data.get("schema") == COMPRESS_SCHEMA:
            return {"by": COMPRESS_REPORT, "path": str(report)}
    for name in _WEIGHT_FILES:
        weights = folder / name
        if not weights.is_file():
            continue
        from gradience.io.safetensors import SafetensorsFile

        try:
            st = SafetensorsFile(weights)
        except InputError:
            return None  # a broken weights file is audit's business, not check's
        try:
            if COMPRESS_METADATA_KEY in st.metadata:
                return {"by": "safetensors __metadata__", "path": str(weights)}
        finally:
            st.close()
    return None


def check_context(snapshot: ConfigSnapshot, model_size: str | None = None,
                  peft_path: str | os.PathLike[str] | None = None) -> CheckContext:
    """Model facts (``--model-size`` > config ``model_size`` > the model dir's config.json, or the base saved
    beside the adapter > the name) and the compress provenance of the adapter whose ``adapter_config.json`` is
    ``peft_path``."""
    size = model_size if model_size is not None else snapshot.extras.get("model_size")
    path, config = read_model_config(snapshot.model_name)
    if config is None and peft_path is not None:
        # A base saved beside the adapter (the toy run's and demo's <run>/base next to <run>/peft, the bench's
        # OUT/base): the same resolver audit uses for UDR.
        from gradience.udr.resolve import base_beside_adapter

        beside = base_beside_adapter(Path(peft_path).parent)
        if beside is not None:
            path, config = read_model_config(str(beside))
    facts = model_facts(snapshot.model_name, size=size,
                        size_source="--model-size" if model_size is not None else "model_size",
                        config=config, config_path=path)
    return CheckContext(model=facts, compressed=compress_provenance(peft_path))
