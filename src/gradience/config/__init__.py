"""Loading a LoRA / training config in any accepted form into one ``ConfigSnapshot`` (SPEC §7).

Forms: canonical (``optimizer`` / ``lora`` / ``training`` sections), flat dicts with alias keys, PEFT
``adapter_config.json``, HF ``training_args.json`` (``TrainingArguments.to_json_string()`` / ``to_dict()``).
Sources merge by filling missing values in order config, PEFT, training; explicit overrides always win.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gradience.config.loader import CONFIG_FILENAMES, find_config_in_dir, load_config_file, read_mapping
from gradience.config.normalize import (
    CONFIG_FORMS,
    ConfigForm,
    detect_form,
    merge_snapshots,
    normalize_source,
)
from gradience.telemetry.types import ConfigSnapshot

__all__ = [
    "CONFIG_FILENAMES",
    "CONFIG_FORMS",
    "ConfigForm",
    "detect_form",
    "find_config_in_dir",
    "load_config_file",
    "merge_snapshots",
    "normalize_source",
    "read_mapping",
    "snapshot_from_sources",
]


def snapshot_from_sources(*, config: Mapping[str, Any] | None = None, peft: Mapping[str, Any] | None = None,
                          training: Mapping[str, Any] | None = None,
                          overrides: Mapping[str, Any] | None = None,
                          origins: Mapping[str, str | os.PathLike[str]] | None = None) -> ConfigSnapshot:
    """Merge config sources into one snapshot.

    Each source may be in any accepted form (detected per source). Missing values are filled in the order
    ``config``, ``peft``, ``training``; values in ``overrides`` (explicit CLI flags, a flat dict) always win.
    ``origins`` optionally maps a source name ("config", "peft", "training", "overrides") to the file it was
    read from, so that a value that cannot be coerced is reported against that file and key.
    """
    origins = origins or {}
    parts: list[ConfigSnapshot] = []
    for label, data in (("config", config), ("peft", peft), ("training", training)):
        if data is None:
            continue
        origin = origins.get(label)
        parts.append(normalize_source(data, origin=None if origin is None else os.fspath(origin),
                                      label=label)[1])
    override_snapshot = None
    if overrides:
        origin = origins.get("overrides")
        override_snapshot = normalize_source(overrides, form="flat", label="overrides",
                                             origin=None if origin is None else os.fspath(origin))[1]
    return merge_snapshots(parts, override_snapshot)
