"""Which logger wrote a file, by its content (the name only breaks ties): monitor accepts what people have.

Kinds: ``telemetry`` (Gradience JSONL), ``trainer_state`` (HF ``trainer_state.json``), ``tensorboard`` (a
TFRecord event file: a u64 length followed by its masked CRC32C), ``wandb`` (a ``:W&B`` transaction log),
``wandb_export`` (a W&B history export, CSV or a JSON array of rows) and ``llamafactory``
(``trainer_log.jsonl``: JSON lines with ``current_steps`` and ``total_steps``).
"""

from __future__ import annotations

import csv
import json
import re
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


# What monitor reads, for the error on a file it does not (a weights file given by mistake).
READS = ("a Gradience run.jsonl, a Hugging Face trainer_state.json, TensorBoard event files, a W&B run directory "
         "or history export, or LLaMA-Factory's trainer_log.jsonl")


def sniff_file(path: Path) -> str:
    head = _head(path)
    if head.startswith(b":W&B"):
        return "wandb"
    weights = _weights_format(path, head)
    if weights is not None:
        audit = " (an adapter's weights: gradience audit --peft-dir DIR)" if "safetensors" in weights else ""
        raise InputError(f"this is {weights}, not a training log; monitor reads {READS}{audit}", path)
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


def _weights_format(path: Path, head: bytes) -> str | None:
    """A model/adapter weights file, by content: GGUF's magic ``GGUF``; safetensors' u64 little-endian header
    length (within the file) followed by its JSON header's ``{`` (an event file's CRC-checked framing is ruled
    out first: its byte 8 may be ``{`` by chance)."""
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    if len(head) < 10 or head[8:9] != b"{" or _is_event_file(head):
        return None
    n = int.from_bytes(head[:8], "little")
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return "a safetensors weights file" if 2 <= n <= size - 8 else None


def _is_event_file(head: bytes) -> bool:
    try:
        from gradience.telemetry.tfrecord import looks_like_event_file

        return looks_like_event_file(head)
    except ImportError:
        return False


_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def output_dir_name(log_file: Path) -> str | None:
    """The name of the run's output directory, resolved, for logs that carry no run id (a ``trainer_state.json``,
    LLaMA-Factory's ``trainer_log.jsonl``): the file's directory, or above it for a Trainer ``checkpoint-N/``.
    So ``monitor .`` and ``monitor out/`` name the run alike; None when there is no name (``/``)."""
    try:
        d = log_file.resolve().parent
    except (OSError, RuntimeError):
        return None
    if _CHECKPOINT_DIR.match(d.name):
        d = d.parent
    return d.name or None
