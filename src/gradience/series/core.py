"""``run_series``: audit each checkpoint, join the Trainer's eval metrics, name the best-eval checkpoint."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.io.textfile import is_file, probe

SCHEMA = "gradience.series/v1"
MAX_CHECKPOINTS = 500
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Summary keys carried per checkpoint (the audit's own names, SPEC §3.2).
AUDIT_KEYS = ("n_layers", "total_lora_params", "utilization_mean", "stable_rank_mean", "effective_rank_mean",
              "energy_rank_90_p50", "energy_rank_90_p90", "delta_frob_norm_scaled_mean", "suggested_r_global_median",
              "suggested_r_global_90", "udr_median", "udr_p90", "udr_max", "n_layers_with_udr")
# How rank use and UDR moved: the keys the suggestion reports from first checkpoint to the suggested one.
MOVED_KEYS = ("utilization_mean", "stable_rank_mean", "energy_rank_90_p50", "udr_median", "udr_p90")


@dataclass
class SeriesOptions:
    base_model: str | None = None      # for UDR; None: the adapter's own base hint / the base beside the run
    udr: bool = True
    metric: str | None = None          # e.g. eval_loss (default), eval_accuracy
    mode: str | None = None            # "min" | "max"; default: min for loss/perplexity, else max
    base_norms_cache: str | None = None


def expand_paths(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint directories: each path given, or the ``checkpoint-*`` children of a training output dir."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        st = probe(p)
        if st is None:
            raise InputError("no such file or directory", p)
        if not p.is_dir():
            raise InputError("not a checkpoint directory", p)
        if _CHECKPOINT.match(p.name) or is_file(p / "adapter_config.json"):
            out.append(p)
            continue
        try:
            children = [c for c in p.iterdir() if _CHECKPOINT.match(c.name) and c.is_dir()]
        except OSError as exc:
            from gradience.io.textfile import os_problem

            raise InputError(f"cannot list directory: {os_problem(exc)}", p) from None
        if not children:
            raise InputError("no checkpoint-* directories and no adapter_config.json here", p)
        out.extend(children)
        if len(out) > MAX_CHECKPOINTS:
            break
    if len(out) > MAX_CHECKPOINTS:
        raise InputError(f"more than {MAX_CHECKPOINTS} checkpoints; pass fewer")
    unique = {os.path.realpath(p): p for p in out}
    return sorted(unique.values(), key=lambda p: (_step_of(p) is None, _step_of(p) or 0, str(p)))


def _step_of(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def _flat_eval(split: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Back to the Trainer's names: split ``eval`` -> ``eval_<m>``, a named eval set -> ``eval_<split>_<m>``."""
    prefix = "eval_" if split == "eval" else f"eval_{split}_"
    return {prefix + k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_history(checkpoints: list[Path]) -> tuple[dict[int, dict[str, float]], list[str]]:
    """step -> eval metrics, from the newest ``trainer_state.json`` among the checkpoints (it holds the whole
    history up to it), merged with the older ones for steps it lacks."""
    from gradience.monitor.sources import read_trainer_state

    by_step: dict[int, dict[str, float]] = {}
    notes: list[str] = []
    for ckpt in reversed(checkpoints):
        state_path = ckpt / "trainer_state.json"
        if not is_file(state_path):
            notes.append(f"{ckpt.name}: no trainer_state.json")
            continue
        try:
            state = read_trainer_state(state_path)
        except InputError as exc:
            notes.append(f"{ckpt.name}: {exc.problem}")
            continue
        for event, step, data in state.events:
            if event != "eval" or step is None:
                continue
            row = _flat_eval(str(data.get("split")), data.get("metrics") or {})
            for key, value in row.items():
                by_step.setdefault(step, {}).setdefault(key, value)
    return by_step, notes


def _audit_row(ckpt: Path, options: SeriesOptions) -> dict[str, Any]:
    from gradience.adapter import load_adapter
    from gradience.audit import AuditOptions, run_audit

    loaded = load_adapter(os.fspath(ckpt))
    result = run_audit(loaded, AuditOptions(udr=options.udr, base_model=options.base_model,
                                            base_norms_cache=options.base_norms_cache, base_required=False))
    summary = result.to_summary(include_layers=False)
    row = {key: summary.get(key) for key in AUDIT_KEYS}
    row["rank"] = (summary.get("adapter") or {}).get("r")
    row["issues"] = [i for i in summary.get("issues") or [] if i.get("severity") in ("warning", "error")][:20]
    row["udr_base_model"] = summary.get("udr_base_model")
    return row


def _direction(metric: str, mode: str | None) -> str:
    if mode is not None:
        if mode not in ("min", "max"):
            raise InputError(f"--mode must be min or max, got {mode!r}")
        return mode
    name = metric.lower()
    return "min" if name.endswith(("loss", "perplexity", "ppl", "error", "wer", "cer")) else "max"


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def run_series(paths: list[str | os.PathLike[str]], options: SeriesOptions | None = None) -> dict[str, Any]:
    """The ``gradience.series/v1`` document for the checkpoints at ``paths``."""
    options = options or SeriesOptions()
    checkpoints = expand_paths(paths)
    evals, notes = eval_history(checkpoints)
    eval_steps = sorted(evals)
    rows: list[dict[str, Any]] = []
    failures: list[InputError] = []
    for ckpt in checkpoints:
        step = _step_of(ckpt)
        joined = [s for s in eval_steps if step is not None and s <= step]
        eval_step = joined[-1] if joined else None
        row: dict[str, Any] = {"checkpoint": ckpt.name, "path": os.fspath(ckpt), "step": step,
                               "eval_step": eval_step,
                               "eval": dict(evals.get(eval_step, {})) if eval_step is not None else {}}
        try:
            row["audit"] = _audit_row(ckpt, options)
        except InputError as exc:
            # One unreadable checkpoint (a run killed while saving its last one, a full-model checkpoint among
            # adapter ones) does not hide the others: its row says why; all unreadable is still the error.
            failures.append(exc)
            row["audit"], row["error"] = {}, str(exc)
            notes.append(f"{ckpt.name}: not audited: {exc}")
        rows.append(row)
    if failures and len(failures) == len(checkpoints):
        raise failures[0]
    metric = options.metric or _default_metric(rows)
    direction = _direction(metric, options.mode) if metric else "min"
    suggestion = _suggest(rows, metric, direction)
    return {"schema": SCHEMA, "metric": metric, "mode": direction, "checkpoints": rows, "suggestion": suggestion,
            "notes": notes}


def _default_metric(rows: list[dict[str, Any]]) -> str | None:
    names = {k for r in rows for k in r["eval"]}
    if "eval_loss" in names:
        return "eval_loss"
    losses = sorted(n for n in names if n.endswith("_loss"))
    return losses[0] if losses else (sorted(names)[0] if names else None)


def _suggest(rows: list[dict[str, Any]], metric: str | None, mode: str) -> dict[str, Any]:
    """The checkpoint with the best logged ``metric`` (the first of equals), and how the audit moved from
    the first checkpoint to it. A fact about the logs, not a prediction of held-out quality."""
    scored: list[tuple[dict[str, Any], float]] = []
    for r in rows if metric else []:
        v = _finite(r["eval"].get(metric))
        if v is not None:
            scored.append((r, v))
    if not scored:
        if metric is None:
            return {"checkpoint": None, "reason": "no checkpoint has an eval metric in trainer_state.json"}
        logged = sorted({k for r in rows for k in r["eval"]})  # a typo in --metric: say what there is
        return {"checkpoint": None, "reason": f"no checkpoint has a finite {metric} (logged: "
                                              f"{', '.join(logged[:12]) if logged else 'no eval metric'})"}
    def best_of(candidates: list[tuple[dict[str, Any], float]]) -> tuple[dict[str, Any], float]:
        top, value = candidates[0]
        for r, v in candidates[1:]:
            if (v < value) if mode == "min" else (v > value):
                top, value = r, v
        return top, value

    # a checkpoint whose adapter cannot be read is not one to pick, however good its logged eval
    overall_row, overall = best_of(scored)
    readable = [(r, v) for r, v in scored if "error" not in r]
    if not readable:
        return {"checkpoint": None, "reason": f"every checkpoint with a finite {metric} is unreadable "
                                              f"(best: {overall_row['checkpoint']}, {overall:.4g})"}
    best_row, best = best_of(readable)
    first = rows[0]
    moved = {key: {"from": first["audit"].get(key), "to": best_row["audit"].get(key)} for key in MOVED_KEYS}
    parts = []
    for key in ("utilization_mean", "udr_median"):
        a, b = _finite(moved[key]["from"]), _finite(moved[key]["to"])
        if a is not None and b is not None:
            parts.append(f"{key} {a:.3g} -> {b:.3g}")
    text = (f"{best_row['checkpoint']} has the best {metric} ({best:.4g}, {'lowest' if mode == 'min' else 'highest'}"
            f" of {len(scored)} checkpoints with it)")
    if parts and best_row is not first:
        text += f"; from {first['checkpoint']} to it: " + ", ".join(parts)
    elif parts:
        text += "; it is the first checkpoint: " + ", ".join(parts)
    unreadable = None if overall_row is best_row else overall_row["checkpoint"]
    if unreadable:
        text += (f" ({unreadable} logged a better {metric}, {overall:.4g}, but its adapter could not be read: "
                 "see its row)")
    return {"checkpoint": best_row["checkpoint"], "step": best_row["step"], "metric": metric, "value": best,
            "moved_from": first["checkpoint"], "moved": moved, "text": text,
            "note": "best logged eval metric; the audit and UDR are shown, not used to predict quality",
            "better_but_unreadable": unreadable}
