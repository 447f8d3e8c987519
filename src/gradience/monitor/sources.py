"""What ``gradience monitor RUN`` can read, and how each source becomes a stream of run events.

RUN is a telemetry JSONL, a Hugging Face ``trainer_state.json`` (its ``log_history``), or a directory holding
one of them: ``run.jsonl``, else a single ``*.jsonl``, else ``trainer_state.json``, else the
``trainer_state.json`` of the latest ``checkpoint-N/``. Runs trained without the Gradience callback can be
monitored too. A file is recognised by its content (``telemetry.sniff``): also TensorBoard event files, a W&B
``run-*.wandb``, a W&B history export and LLaMA-Factory's ``trainer_log.jsonl``; a directory may also be a
W&B run directory, a ``wandb/`` directory of runs, or a tree of TensorBoard event files (``runs/<date>_<host>/``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gradience.errors import GradienceError, InputError
from gradience.io.textfile import is_file, os_problem, probe, read_json_file
from gradience.issues import Issue
from gradience.jsonio import MAX_JSON_INT
from gradience.telemetry.logmap import is_trl_metric
from gradience.telemetry.types import ConfigSnapshot

SourceKind = Literal["telemetry", "trainer_state", "tensorboard", "wandb", "wandb_export", "llamafactory"]
MAX_TRAINER_STATE_BYTES = 256 * 1024 * 1024  # far above real files; guards json.loads of a huge input
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# HF log entries that summarize the whole training (written once at the end), not a train step.
_HF_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


@dataclass(frozen=True)
class RunSource:
    kind: SourceKind
    path: Path
    note: str | None = None  # another log in the same directory that was not chosen, and the path to read it


def resolve_run_path(path: str | os.PathLike[str]) -> RunSource:
    """Find what to read for ``path`` (file or directory); InputError says what was looked for."""
    p = Path(path)
    st = probe(p)
    if st is None:
        raise InputError("no such file or directory", p)
    if stat.S_ISDIR(st.st_mode):
        return _resolve_dir(p)
    if not stat.S_ISREG(st.st_mode):
        kind: SourceKind = "trainer_state" if p.suffix.lower() == ".json" else "telemetry"
        return RunSource(kind, p)  # a FIFO or device: never opened here to sniff (it may block)
    from gradience.telemetry.sniff import sniff_file

    return RunSource(sniff_file(p), p)  # type: ignore[arg-type]


def _resolve_dir(d: Path) -> RunSource:
    try:
        if is_file(d / "run.jsonl"):
            return RunSource("telemetry", d / "run.jsonl")
        from gradience.telemetry.wandb import is_run_dir

        if is_run_dir(d):
            return RunSource("wandb", d)
        jsonls = sorted(x for x in d.glob("*.jsonl") if is_file(x))
        if len(jsonls) == 1:
            from gradience.telemetry.sniff import sniff_file

            return RunSource(sniff_file(jsonls[0]), jsonls[0])  # type: ignore[arg-type]
        if len(jsonls) > 1:
            names = ", ".join(x.name for x in jsonls[:10])
            raise InputError(f"several telemetry files and no run.jsonl ({names}); pass one of them", d)
        if is_file(d / "trainer_state.json"):
            return RunSource("trainer_state", d / "trainer_state.json", _other_log_note(d, d / "trainer_state.json"))
        checkpoints = []
        for sub in d.iterdir():
            m = _CHECKPOINT.match(sub.name)
            if m and is_file(sub / "trainer_state.json"):
                checkpoints.append((int(m.group(1)), sub / "trainer_state.json"))
    except OSError as exc:
        raise InputError(f"cannot list directory: {os_problem(exc)}", d) from None
    if checkpoints:
        chosen = max(checkpoints)[1]
        return RunSource("trainer_state", chosen, _other_log_note(d, chosen))
    from gradience.telemetry.wandb import run_dirs

    if run_dirs(d):
        return RunSource("wandb", d)  # the reader picks the run (--run-id, else the newest)
    if _has_event_files(d):
        return RunSource("tensorboard", d)
    import shlex

    adapter = ("; it holds an adapter (adapter_config.json), which monitor does not read: gradience audit "
               f"--peft-dir {shlex.quote(str(d))}" if is_file(d / "adapter_config.json") else "")
    raise InputError("no run.jsonl, *.jsonl, trainer_state.json, checkpoint-*/trainer_state.json, W&B run or "
                     f"TensorBoard event file in this directory{adapter}", d)


def _other_log_note(d: Path, chosen: Path) -> str | None:
    """An output directory with checkpoints often also holds the Trainer's TensorBoard log (``runs/``), which
    goes on past the last checkpoint and carries the TrainingArguments: say which file was read and the path
    that reads the other (passing ``d`` again would choose the same)."""
    other: Path | None = None
    for pattern in ("runs/*/*tfevents*", "*/*tfevents*", "*tfevents*"):
        try:
            hit = next(iter(d.glob(pattern)), None)
        except OSError:
            continue
        if hit is not None:
            other = d / "runs" if pattern.startswith("runs/") else hit.parent if hit.parent != d else hit
            break
    if other is None:
        return None
    import shlex

    which = " (the latest checkpoint's)" if chosen.parent != d else ""
    return (f"read {chosen.relative_to(d)}{which}; this directory also holds a TensorBoard log, to read instead: "
            f"gradience monitor {shlex.quote(str(other))}")


def _has_event_files(d: Path) -> bool:
    """An event file in ``d``, ``d/runs/*`` or ``d/*`` (the Trainer's ``runs/<date>_<host>/`` layout)."""
    for pattern in ("*tfevents*", "*/*tfevents*", "runs/*/*tfevents*"):
        try:
            if next(iter(d.glob(pattern)), None) is not None:
                return True
        except OSError:
            continue
    return False


# -- trainer_state.json -----------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """A parsed ``trainer_state.json``: its events (in log order) and what it says about the config."""

    events: list[tuple[str, int | None, dict[str, Any]]]
    config: ConfigSnapshot
    issues: list[Issue]
    summary: dict[str, Any]


def _load_json(path: Path, what: str) -> Any:
    try:
        return read_json_file(path, what=what, max_bytes=MAX_TRAINER_STATE_BYTES)
    except InputError as exc:
        if "JSON" in exc.problem or "UTF-8" in exc.problem:
            raise InputError(f"not a {what}: invalid JSON ({exc.problem})", path) from None
        raise


def _real(value: Any) -> bool:
    """A real number (NaN and infinities included) that fits a float: a 400-digit int does not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _split_eval_entry(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """HF eval log entry -> {split: metrics}. ``eval_loss`` is split "eval"; with a dict of eval datasets HF
    logs ``eval_<name>_loss``, which becomes split ``<name>``."""
    rest = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")}
    named = sorted({k[: -len("_loss")] for k in rest if k.endswith("_loss") and k != "loss"}, key=len,
                   reverse=True)
    out: dict[str, dict[str, Any]] = {}
    for key, value in rest.items():
        split = next((n for n in named if key.startswith(n + "_")), None)
        if split is None:
            out.setdefault("eval", {})[key] = value
        else:
            out.setdefault(split, {})[key[len(split) + 1:]] = value
    return out


def read_trainer_state(path: str | os.PathLike[str]) -> TrainerState:
    p = Path(path)
    data = _load_json(p, "trainer_state.json")
    if not isinstance(data, dict) or not isinstance(data.get("log_history"), list):
        raise InputError("not a trainer_state.json: no 'log_history' list (a telemetry log must end in .jsonl)",
                         p)
    events: list[tuple[str, int | None, dict[str, Any]]] = []
    issues: list[Issue] = []
    summary: dict[str, Any] = {}
    for i, entry in enumerate(data["log_history"]):
        if not isinstance(entry, dict):
            issues.append(Issue("bad_log_entry", f"log_history[{i}] is not an object", extra={"index": i}))
            continue
        raw_step = entry.get("step")
        step = raw_step if type(raw_step) is int and abs(raw_step) <= MAX_JSON_INT else None
        if raw_step is not None and step is None:
            issues.append(Issue("bad_log_entry", f"log_history[{i}]: step is not an integer of at most 64 bits; "
                                "treated as missing", extra={"index": i}))
        if any(k.startswith("eval_") for k in entry):
            bad = [k for k, v in entry.items()
                   if k.startswith("eval_") and not isinstance(v, (str, bool, type(None))) and not _real(v)]
            if bad:
                issues.append(Issue("bad_log_entry", f"log_history[{i}]: {', '.join(bad[:5])} not a number; ignored",
                                    extra={"index": i}))
                entry = {k: v for k, v in entry.items() if k not in bad}
            for split, metrics in _split_eval_entry(entry).items():
                events.append(("eval", step, {"split": split, "metrics": metrics}))
        elif any(k in entry for k in _HF_SUMMARY_KEYS):
            summary = {k: v for k, v in entry.items() if k != "step"}
        elif any(k in entry for k in ("loss", "learning_rate", "grad_norm")):
            fields = {"loss": entry.get("loss"), "lr": entry.get("learning_rate"),
                      "grad_norm": entry.get("grad_norm"), "epoch": entry.get("epoch")}
            bad = [k for k, v in fields.items() if v is not None and not _real(v)]
            if bad:
                issues.append(Issue("bad_log_entry", f"log_history[{i}]: {', '.join(bad)} not a number; ignored",
                                    extra={"index": i}))
            kept = {k: v for k, v in fields.items() if v is not None and k not in bad}
            # TRL's trainer metrics ride in the train_step under their names (monitor/trl.py summarises them)
            kept.update((k, v) for k, v in entry.items() if k not in kept and _real(v) and is_trl_metric(k))
            events.append(("train_step", step, kept))
    return TrainerState(events, _trainer_state_config(p, data), issues, summary)


def _trainer_state_config(path: Path, data: dict[str, Any]) -> ConfigSnapshot:
    """Config from the trainer state plus an ``adapter_config.json`` next to it (checkpoints have one)."""
    snapshot = ConfigSnapshot()
    adapter_cfg = path.parent / "adapter_config.json"
    if is_file(adapter_cfg):
        try:
            from gradience.config import snapshot_from_sources

            peft = _load_json(adapter_cfg, "adapter_config.json")
            if isinstance(peft, dict):
                snapshot = snapshot_from_sources(peft=peft)
        except (ImportError, NotImplementedError, GradienceError):
            snapshot = ConfigSnapshot()
    t = snapshot.training
    if t.batch_size is None and isinstance(data.get("train_batch_size"), int):
        t.batch_size = data["train_batch_size"]
    if t.max_steps is None and isinstance(data.get("max_steps"), int) and 0 < data["max_steps"] < 2**63:
        t.max_steps = data["max_steps"]
    if t.epochs is None and _real(data.get("num_train_epochs")):
        t.epochs = float(data["num_train_epochs"])
    return snapshot


def telemetry_events(path: Path, reader: Any, run_id: str | None) -> Iterator[Any]:
    """Records of the chosen run: ``run_id`` when given, else the newest run (by first appearance).

    Yields ``(is_new_run, record)``; ``is_new_run`` tells the caller to start a fresh analysis (an older
    run's state is never needed again, which keeps memory constant)."""
    current: Any = object()
    n_runs = 0
    for rec in reader:
        if run_id is not None:
            if rec.run_id != run_id:
                continue
            if current != run_id:
                current = run_id
                yield True, rec
                continue
            yield False, rec
            continue
        if len(reader.run_ids) > n_runs:
            n_runs = len(reader.run_ids)
            current = rec.run_id
            yield True, rec
        elif rec.run_id == current:
            yield False, rec
