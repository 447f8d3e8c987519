"""``gradience bench --peft-dir ADAPTER [--against ADAPTER2]``: the user's own adapter on the config's task.

Why: "compress, then verify" must work on the adapter the user has, not only on the probe the bench trains.
Nothing is trained: ADAPTER and the reference (ADAPTER2, or the base model alone) are evaluated on the same
eval items of the config's task, and Δ = metric(ADAPTER) − metric(reference) gets the same paired-bootstrap
interval and interval verdict as a bench arm (:mod:`gradience.bench.intervals`). The evaluation is
deterministic, so there is one "seed" and no seed spread. The output is ``gradience.bench/v1`` with
``mode: "peft_dir"``: the reference in ``probe``, the adapter as the one arm (kind ``adapter``).

The base both adapters are applied to: ``--base-model DIR``, else the base a toy run, the demo or a bench saved
beside the adapter (:func:`gradience.udr.resolve.base_beside_adapter`), else the config's ``model.name``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradience.bench.assemble import SCHEMA
from gradience.bench.config import BenchConfig
from gradience.bench.intervals import HEADLINE_RULE, POINT_RULE, seed_decision
from gradience.bench.stats import Verdicts, metric_value, paired_bootstrap_ci
from gradience.errors import GradienceError, InputError

MODE = "peft_dir"
ITEMS_FILE = "eval_items.json"
_OWN_FILES = {"bench.json", "bench.md", "report.html", ITEMS_FILE, "base"}


def _adapter(path: str, flag: str) -> tuple[str, int, int | None, float | None]:
    """(the path, LoRA parameter count, r, alpha) of an adapter directory; InputError naming ``flag`` otherwise."""
    from gradience.adapter import load_adapter

    if not os.path.isdir(os.path.expanduser(path)):
        raise InputError(f"{flag}: not a directory (a PEFT adapter directory with adapter_config.json)", path=path)
    adapter = load_adapter(os.path.expanduser(path))
    rs = {p.r for p in adapter.pairs}
    alpha = adapter.config.get("lora_alpha")
    return (path, sum(p.params for p in adapter.pairs), rs.pop() if len(rs) == 1 else None,
            float(alpha) if isinstance(alpha, (int, float)) else None)


def resolve_base(peft_dir: str, against: str | None, base_model: str | None) -> Path | None:
    """The saved base to apply the adapters to, or None for the config's model (materialised as a bench does)."""
    from gradience.udr.resolve import base_beside_adapter

    if base_model:
        path = Path(os.path.expanduser(base_model))
        if not (path / "config.json").is_file():
            raise InputError("--base-model with --peft-dir: a local model directory with config.json (the base "
                             "the adapter was trained on)", path=base_model)
        return path
    for adapter_dir in (peft_dir, against):
        found = base_beside_adapter(os.path.expanduser(adapter_dir)) if adapter_dir else None
        if found is not None:
            return found
    return None


def prepare_eval_dir(out: Path) -> None:
    """OUT is new, empty, or an earlier ``--peft-dir`` evaluation (overwritten); never a training bench."""
    from gradience.io.textfile import read_json_file

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError("output path exists and is not a directory", path=out)
    if out.is_dir():
        names = {child.name for child in out.iterdir()}
        if names and not names <= _OWN_FILES:
            raise InputError("output directory holds other files (a training bench?); choose an empty or new "
                             "--output-dir for --peft-dir", path=out)
        if names:
            try:
                doc = read_json_file(out / "bench.json", what="bench", max_bytes=64 << 20)
            except GradienceError:
                doc = None
            if not isinstance(doc, dict) or doc.get("mode") != MODE:
                raise InputError("output directory is not an earlier --peft-dir evaluation; choose an empty or new "
                                 "--output-dir", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory: {exc.strerror or exc}", path=out) from None


def evaluate_adapters(cfg: BenchConfig, output_dir: str | os.PathLike[str], peft_dir: str, *,
                      against: str | None = None, base_model: str | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``peft_dir`` against ``against`` (or the base) on the config's eval items; returns bench.json."""
    from gradience.bench.runner import _quiet_hf
    from gradience.bench.tasks import evaluate_per_item, load_adapter_model, load_base_model, prepare_task

    say = progress or (lambda _line: None)
    started = time.perf_counter()
    cfg = cfg.effective()
    out = Path(output_dir)
    adapter = _adapter(peft_dir, "--peft-dir")
    reference = _adapter(against, "--against") if against else None
    base = resolve_base(peft_dir, against, base_model)
    prepare_eval_dir(out)
    say(f"bench: evaluating {peft_dir} against {against or 'the base model'} on the config's eval items "
        f"(no training); base: {base or cfg.model}")
    with _quiet_hf():
        task = prepare_task(cfg, out, base=base)
        ref_model = (_applied(task, against, cfg.device, load_adapter_model) if against
                     else load_base_model(task, cfg.device))
        ref_items = evaluate_per_item(ref_model, task, cfg, cfg.device)
        del ref_model
        items = evaluate_per_item(_applied(task, peft_dir, cfg.device, load_adapter_model), task, cfg, cfg.device)
    bench = assemble_eval(cfg, task, adapter, reference, base, ref_items, items, time.perf_counter() - started)
    _write(out, bench, ref_items, items, say)
    return bench


def _applied(task: Any, adapter_dir: str, device: str, load: Callable[..., Any]) -> Any:
    """The base with the adapter applied; an adapter made for another base or task is one clear line."""
    try:
        return load(task, os.path.expanduser(adapter_dir), device)
    except GradienceError:
        raise
    except Exception as exc:  # PEFT: size mismatch, missing target modules, another task type
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise InputError(f"cannot apply this adapter to the base {task.base_dir} on the config's task "
                         f"({task.kind}): {type(exc).__name__}: {first}", path=adapter_dir) from None


def assemble_eval(cfg: BenchConfig, task: Any, adapter: tuple[str, int, int | None, float | None],
                  reference: tuple[str, int, int | None, float | None] | None, base: Path | None,
                  ref_items: np.ndarray, items: np.ndarray, elapsed: float) -> dict[str, Any]:
    """The ``gradience.bench/v1`` object of a ``--peft-dir`` evaluation (one arm, the reference as probe)."""
    verdicts = Verdicts(tolerance=cfg.tolerance, min_pass_rate=cfg.min_pass_rate, higher_is_better=cfg.higher_is_better)
    ref_metric, metric = metric_value(ref_items, cfg.metric), metric_value(items, cfg.metric)
    delta = metric - ref_metric
    lo, hi = paired_bootstrap_ci(ref_items, items, cfg.metric, samples=cfg.bootstrap_samples)
    decision = seed_decision(delta, (lo, hi), len(items), cfg.tolerance, cfg.higher_is_better)
    path, params, r, _alpha = adapter
    ref_params = reference[1] if reference else None
    point = verdicts.verdict(delta)
    per_seed = {"seed": None, "metric": metric, "delta": delta, "ci95": [lo, hi], **decision,
                "point_estimate_verdict": point, "params": params, "r": r, "rank_pattern": None,
                "adapter_dir": path}
    aggregate = {"n_seeds": 1, "mean_delta": delta, "sd_delta": None, "worst_delta": delta,
                 "pass_rate": 1.0 if point == "PASS" else 0.0, "point_estimate_verdict": point,
                 "ci95": [lo, hi], "verdict": decision["verdict"], "ci_method": "paired bootstrap over items"}
    return {
        "schema": SCHEMA, "mode": MODE,
        "evaluation": {"peft_dir": path, "against": reference[0] if reference else None,
                       "reference": "against" if reference else "base", "base": str(base) if base else cfg.model},
        "config": cfg.to_dict(), "seeds": [],
        "task": {"kind": task.kind, "model": task.model_name, "dataset": task.dataset_name, "metric": cfg.metric,
                 "higher_is_better": cfg.higher_is_better, "n_eval_items": len(items)},
        "probe": {"role": "reference", "name": reference[0] if reference else "base model",
                  "r": reference[2] if reference else None, "alpha": reference[3] if reference else None,
                  "params": ref_params, "per_seed": [{"seed": None, "metric": ref_metric,
                                                      "adapter_dir": reference[0] if reference else None}]},
        "arms": [{"name": path, "kind": "adapter", "r": r, "rank_pattern": None, "label": None, "params": params,
                  "params_ratio": params / ref_params if ref_params else None, "per_seed": [per_seed],
                  "aggregate": aggregate}],
        "noise_floor": {"n_seeds": 0, "sd": None, "range": None, "exceeds_tolerance": None,
                        "note": "nothing trained: the evaluation is deterministic, no seed spread to measure"},
        "policy": {"tolerance": cfg.tolerance, "min_pass_rate": cfg.min_pass_rate, "headline": "interval",
                   "rule": HEADLINE_RULE, "point_estimate_rule": POINT_RULE, "point_estimate_verdict": point,
                   "point_estimate_recommended_arm": None},
        "verdict": decision["verdict"], "recommended_arm": None, "screening": False, "warnings": [], "udr": None,
        "elapsed_seconds": elapsed,
        **({"ignored_config_keys": list(cfg.ignored_keys)} if cfg.ignored_keys else {}),
    }


def _write(out: Path, bench: dict[str, Any], ref_items: np.ndarray, items: np.ndarray,
           say: Callable[[str], None]) -> None:
    from gradience.bench.render import render_markdown
    from gradience.errors import MissingDependencyError
    from gradience.jsonio import atomic_write_text, dumps
    from gradience.report import write_report

    atomic_write_text(out / ITEMS_FILE, dumps({"schema": "gradience.bench.eval_items/v1",
                                               "reference": ref_items.tolist(), "adapter": items.tolist()}) + "\n")
    atomic_write_text(out / "bench.json", dumps(bench) + "\n")
    atomic_write_text(out / "bench.md", render_markdown(bench))
    try:
        write_report(out / "bench.json", out / "report.html")
    except MissingDependencyError as exc:
        say(f"bench: no report.html: {exc}")
