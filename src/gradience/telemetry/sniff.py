"""Which logger wrote a file, by its content (the name only breaks ties): monitor accepts what people have.

Kinds: ``telemetry`` (Gradience JSONL), ``trainer_state`` (HF ``trainer_state.json``), ``tensorboard`` (a
TFRecord event file: a u64 length followed by its masked CRC32C), ``wandb`` (a ``:W&B`` transaction log),
``wandb_export`` (a W&B history export, CSV or a JSON array of rows) and ``llamafactory``
(``trainer_log.jsonl``: JSON lines with ``current_steps`` and ``total_steps``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from gradience.errors import InputError

SNIFF_BYTES = 64 * 1024


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError as exc:
        from gradience.io.textfile import os_problem

        raise InputError(f"cannot read: {os_problem(exc)}", path) from None


def sniff_file(path: Path) -> str:
    head = _head(path)
    if head.startswith(b":W&B"):
        return "wandb"
    if head.lstrip()[:1] not in (b"{", b"[") and (_is_event_file(head) or "tfevents" in path.name):
        return "tensorboard"  # by name too: an empty/truncated event file, or no tensorboard to check with
    text = head.lstrip()
    first_line = text.split(b"\n", 1)[0]
    if text.startswith(b"{"):
        try:
            obj = json.loads(first_line)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            from gradience.telemetry.llamafactory import looks_like_llamafactory

            if looks_like_llamafactory(obj):
                return "llamafactory"
            if "event" in obj or "schema" in obj:
                return "telemetry"
            if "_step" in obj or "train/global_step" in obj:
                return "wandb_export"  # run.history() written as JSON lines
            if "log_history" in obj or path.suffix.lower() == ".json":
                return "trainer_state"
            return "telemetry"
        if b'"log_history"' in head or path.suffix.lower() == ".json":
            return "trainer_state"
        return "telemetry"
    if text.startswith(b"["):
        return "wandb_export"
    if b"," in first_line and path.suffix.lower() in (".csv", ""):
        from gradience.telemetry.llamafactory import looks_like_wandb_export_header

        header = next(csv.reader([first_line.decode("utf-8", "replace")]), [])
        if looks_like_wandb_export_header(header):
            return "wandb_export"
    return "trainer_state" if path.suffix.lower() == ".json" else "telemetry"


def _is_event_file(head: bytes) -> bool:
    try:
        from gradience.telemetry.tfrecord import looks_like_event_file

        return looks_like_event_file(head)
    except ImportError:
        return False
