"""``gradience check``: pre-flight validation of a LoRA training config (SPEC §7).

Reads a config file and/or a PEFT adapter config and an HF training_args dump (files or directories),
merges them (config, then PEFT, then training fill missing values; flags always win), runs the check rules
and renders them. The library does the work; this module parses and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gradience.cli.main import EXIT_GATE, EXIT_OK, add_common_flags
from gradience.textfmt import RULE

_SEVERITY_GATES = ("info", "warning", "error", "critical")


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check", help="validate a LoRA training config before compute is spent",
        description="Pre-flight check of a LoRA / PEFT training config. Sources fill missing values in the "
                    "order CONFIG, --peft, --training; explicit flags always win.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gradience check train_config.yaml --task gsm8k\n"
               "  gradience check --peft-dir out/adapter --training-dir out --verbose\n"
               "  gradience check --lr 2e-4 --r 16 --alpha 32 --targets q_proj v_proj --fail-on warning")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="config file (JSON/YAML): canonical, flat, PEFT adapter_config or HF training_args")
    p.add_argument("--peft", metavar="F", help="PEFT adapter_config.json")
    p.add_argument("--training", metavar="F", help="HF training_args.json (TrainingArguments.to_json_string())")
    p.add_argument("--peft-dir", metavar="D", help="directory holding adapter_config.json (searched below too)")
    p.add_argument("--training-dir", metavar="D", help="directory holding training_args.json (searched below too)")
    p.add_argument("--task", metavar="T", help="task / dataset name (e.g. sst2, gsm8k); names the dataset")
    p.add_argument("--model", metavar="M", help="base model name or path (a local directory's config.json gives "
                   "its size, recurrent layers and experts)")
    p.add_argument("--model-size", metavar="N", help="base model size in parameters (7B, 135M, 7e9): scales the "
                   "learning-rate advice (default: from the config or the model name)")
    p.add_argument("--dataset", metavar="D", help="dataset name (used to infer the task profile)")
    p.add_argument("--task-profile", metavar="P",
                   choices=("easy_classification", "hard_reasoning", "generation", "unknown"),
                   help="easy_classification | hard_reasoning | generation | unknown (default: inferred)")
    p.add_argument("--optimizer", metavar="O", help="optimizer name")
    p.add_argument("--lr", type=float, metavar="X", help="learning rate")
    p.add_argument("--weight-decay", type=float, metavar="X", help="weight decay")
    p.add_argument("--r", type=float, metavar="N", help="LoRA rank")
    p.add_argument("--alpha", type=float, metavar="X", help="LoRA alpha")
    p.add_argument("--targets", nargs="+", metavar="MODULE",
                   help="target modules (names, space- or comma-separated)")
    p.add_argument("--notes", metavar="S", help="free-form notes kept in the config snapshot")
    p.add_argument("--verbose", action="store_true", help="show rationale, source, confidence and evidence")
    p.add_argument("--json", action="store_true", help="print the machine-readable report")
    p.add_argument("--fail-on", action="append", metavar="RULES",
                   help="exit 1 when met: a severity (error, warning, info: that level or above) or an "
                        "action id (e.g. lower_lr); comma-separated or repeated")
    add_common_flags(p)
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags as a flat config dict (only the ones given)."""
    out: dict[str, Any] = {}
    dataset = args.dataset or args.task
    if dataset:
        out["dataset_name"] = dataset
    if args.task and args.dataset and args.task != args.dataset:
        out["task"] = args.task  # kept in extras: a second hint for profile inference
    pairs = (("model_name", args.model), ("model_size", args.model_size), ("task_profile", args.task_profile),
             ("optimizer", args.optimizer),
             ("lr", args.lr), ("weight_decay", args.weight_decay), ("r", args.r), ("alpha", args.alpha),
             ("notes", args.notes))
    out.update({k: v for k, v in pairs if v is not None})
    if args.targets is not None:
        out["target_modules"] = list(args.targets)
    return out


_VALUE_FLAGS = ("task", "model", "model_size", "dataset", "task_profile", "optimizer", "lr", "weight_decay", "r",
                "alpha", "notes")


def _flags_text(args: argparse.Namespace) -> str:
    """The config flags given, as typed (for the Sources block)."""
    parts = []
    for name in _VALUE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"--{name.replace('_', '-')} {shown}")
    if args.targets is not None:
        parts.append("--targets " + " ".join(args.targets))
    return " ".join(parts)


def _read_sources(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode every given source; returns the data per slot and a description of what was read."""
    from gradience.config import find_config_in_dir, load_config_file
    from gradience.errors import InputError

    slots: dict[str, Any] = {}
    described: list[dict[str, Any]] = []
    if args.peft and args.peft_dir:
        raise InputError("give either --peft or --peft-dir, not both")
    if args.training and args.training_dir:
        raise InputError("give either --training or --training-dir, not both")
    peft_path = args.peft or (find_config_in_dir(args.peft_dir, "peft") if args.peft_dir else None)
    training_path = None
    state_path = None
    if args.training:
        training_path = args.training
    elif args.training_dir:
        try:
            training_path = find_config_in_dir(args.training_dir, "training")
        except InputError:
            # A Trainer output dir without training_args.json (only the pickled .bin): its trainer_state.json
            # still tells the plan; without that either, the loader's error says what was looked for.
            state_path = _find_trainer_state(Path(args.training_dir))
            if state_path is None:
                raise
    for slot, path in (("config", args.config), ("peft", peft_path), ("training", training_path)):
        if path is None:
            continue
        form, data = load_config_file(path)
        slots[slot] = (str(path), data)
        described.append({"role": slot, "path": str(path), "form": form})
    if state_path is not None:
        from gradience.config import read_mapping
        from gradience.config.normalize import trainer_state_training

        state = read_mapping(state_path)
        slots["training"] = (str(state_path), trainer_state_training(state))
        described.append({"role": "training", "path": str(state_path), "form": "trainer_state"})
    return slots, described


def _find_trainer_state(directory: Path) -> Path | None:
    """``trainer_state.json`` in ``directory``, else in its latest ``checkpoint-N/``."""
    if (directory / "trainer_state.json").is_file():
        return directory / "trainer_state.json"
    best: tuple[int, Path] | None = None
    try:
        children = list(directory.iterdir())
    except OSError:
        return None
    for child in children:
        name = child.name
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() \
                and (child / "trainer_state.json").is_file():
            step = int(name[len("checkpoint-"):])
            if best is None or step > best[0]:
                best = (step, child / "trainer_state.json")
    return None if best is None else best[1]


def _export_note(sources: list[dict[str, Any]], snapshot: Any) -> list[Any]:
    """When the training config came from trainer_state.json: say what it gave and how to get the real one."""
    from gradience.telemetry.types import Recommendation

    src = next((s for s in sources if s["form"] == "trainer_state"), None)
    if src is None:
        return []
    t = snapshot.training
    got = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (
        ("batch_size", t.batch_size), ("max_steps", t.max_steps), ("epochs", t.epochs)) if v is not None)
    return [Recommendation(
        "info", "export_training_args",
        f"no training_args.json: read the plan from {src['path']} ({got or 'nothing usable'}); lr, weight decay "
        "and precision are not in it. Write the arguments as JSON from the training script: "
        "open(f\"{trainer.args.output_dir}/training_args.json\", \"w\").write(trainer.args.to_json_string())",
        rationale="training_args.bin is a pickle, and unpickling a file can run arbitrary code, so gradience "
                  "never opens it; TrainingArguments.to_json_string() gives the same values as plain JSON.",
        confidence=0.9, scope="training",
        evidence={"trainer_state": src["path"], "batch_size": t.batch_size, "max_steps": t.max_steps,
                  "epochs": t.epochs})]


def run(args: argparse.Namespace) -> int:
    from gradience.config import snapshot_from_sources
    from gradience.gates import parse_gates
    from gradience.policy.check_rules import ACTIONS, check_config

    gates = parse_gates(args.fail_on)
    _validate_gates(gates, ACTIONS)
    slots, sources = _read_sources(args)
    overrides = _overrides(args)
    if not slots and not overrides:
        from gradience.errors import InputError

        raise InputError("nothing to check: give a CONFIG file, --peft/--peft-dir, --training/--training-dir "
                         "or config flags (--lr, --r, --alpha, --targets, ...)")
    if overrides:
        sources.append({"role": "flags", "path": None, "form": "flags", "text": _flags_text(args)})
    snapshot = snapshot_from_sources(
        config=slots.get("config", (None, None))[1], peft=slots.get("peft", (None, None))[1],
        training=slots.get("training", (None, None))[1], overrides=overrides or None,
        origins={slot: path for slot, (path, _data) in slots.items()})
    from gradience.policy.check_context import check_context

    context = check_context(snapshot, args.model_size, peft_path=_peft_path(sources))
    report = check_config(snapshot, extra=_export_note(sources, snapshot), context=context)
    from gradience.policy.check_gates import require_inputs

    require_inputs(gates, snapshot)  # an action gate on a value the config lacks never passes silently
    met = _gates_met(gates, report.recommendations)

    if args.json:
        from gradience.jsonio import dumps

        payload = report.to_dict()
        payload["sources"] = sources
        if gates:
            payload["fail_on"] = [{"rule": rule, "met_by": by} for rule, by in met]
        print(dumps(payload, pretty=True))
    else:
        from gradience.textfmt import safe_text

        print(safe_text(render_text(report, sources, verbose=args.verbose), keep_newlines=True))
    failed = [(rule, by) for rule, by in met if by]
    if failed:
        stream = sys.stderr if args.json else sys.stdout
        for rule, by in failed:
            print(f"--fail-on '{rule}' met by: {', '.join(by)}", file=stream)
        return EXIT_GATE
    return EXIT_OK


def _validate_gates(gates: list[Any], actions: tuple[str, ...]) -> None:
    from gradience.errors import InputError

    for gate in gates:
        if not gate.is_flag:
            raise InputError(f"--fail-on: check supports severities ({', '.join(_SEVERITY_GATES)}) and action "
                             f"ids, not comparisons like '{gate.text}'")
        if gate.metric not in _SEVERITY_GATES and gate.metric not in actions:
            raise InputError(f"--fail-on: unknown rule '{gate.text}' (expected a severity: "
                             f"{', '.join(_SEVERITY_GATES)}, or an action id: {', '.join(actions)})")


def _gates_met(gates: list[Any], recs: list[Any]) -> list[tuple[str, list[str]]]:
    """For each gate, the recommendations (``action (severity)``) that meet it."""
    from gradience.telemetry.types import SEVERITY_RANK

    out: list[tuple[str, list[str]]] = []
    for gate in gates:
        if gate.metric in SEVERITY_RANK:
            floor = SEVERITY_RANK[gate.metric]
            hits = [r for r in recs if SEVERITY_RANK.get(r.severity, 0) >= floor]
        else:
            hits = [r for r in recs if r.action == gate.metric]
        out.append((gate.text, [f"{r.action} ({r.severity})" for r in hits]))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_text(report: Any, sources: list[dict[str, Any]], *, verbose: bool = False) -> str:
    """Human-readable report: sources, merged config summary, recommendations in JSON order."""
    cfg = report.config
    opt, lora, tr = cfg.optimizer, cfg.lora, cfg.training
    lines = [RULE, "GRADIENCE CHECK", RULE]
    if sources:
        lines.append("Sources:")
        for src in sources:
            shown = src["text"] if src["form"] == "flags" else f"{src['path']} ({src['form']})"
            lines.append(f"  {src['role'] + ':':<10}{shown}")
        lines.append("")
    profile = report.task_profile + (" (inferred)" if report.task_profile_inferred else "")
    alpha_over_r = f"{lora.alpha / lora.r:.2f}" if lora.alpha is not None and isinstance(lora.r, int) \
        and lora.r > 0 else "-"
    lines += [
        f"Model:     {_fmt(cfg.model_name)}{_model_facts_text(getattr(report, 'model', None))}",
        f"Dataset:   {_fmt(cfg.dataset_name)}",
        f"Profile:   {profile}",
        f"Optimizer: {_fmt(opt.name)}  lr={_fmt(opt.lr)}  weight_decay={_fmt(opt.weight_decay)}",
        f"LoRA:      r={_fmt(lora.r)}  alpha={_fmt(lora.alpha)}  alpha/r={alpha_over_r}  "
        f"dropout={_fmt(lora.dropout)}  rsLoRA={_fmt(lora.use_rslora)}",
    ]
    if lora.target_modules is None:
        targets = "- (not set)"
    elif not lora.target_modules:
        targets = "(empty)"
    else:
        targets = ", ".join(f"{t} ({report.target_types.get(t, '?')})" for t in lora.target_modules)
    lines.append(f"Targets:   {targets}")
    # HF semantics: a positive max_steps wins over num_train_epochs.
    resolved = any(src["form"] == "trainer_state" for src in sources)  # the Trainer's plan: both facts
    ignored = " (ignored: max_steps is set)" if tr.epochs is not None and tr.max_steps is not None \
        and not resolved else ""
    lines.append(f"Training:  batch={_fmt(tr.batch_size)} x accum={_fmt(tr.gradient_accumulation)}  "
                 f"max_steps={_fmt(tr.max_steps)}  epochs={_fmt(tr.epochs)}{ignored}  dtype={_fmt(tr.dtype)}  "
                 f"seed={_fmt(tr.seed)}")
    lines += ["", f"Recommendations ({len(report.recommendations)}):"]
    for rec in report.recommendations:
        lines.append(f"  [{rec.severity.upper()}] {rec.action}: {rec.message}")
        if verbose:
            lines.append(f"      why: {rec.rationale}")
            if rec.source:
                lines.append(f"      source: {rec.source}")
            lines.append(f"      confidence: {rec.confidence:.2f}  scope: {rec.scope}")
            evidence = ", ".join(f"{k}={_fmt_evidence(v)}" for k, v in rec.evidence.items())
            lines.append(f"      evidence: {evidence}")
    return "\n".join(lines)


def _peft_path(sources: list[dict[str, Any]]) -> str | None:
    return next((s["path"] for s in sources if s["role"] == "peft" and s.get("path")), None)


def _model_facts_text(facts: dict[str, Any] | None) -> str:
    """`` (7B parameters from model name; recurrent: model_type jamba; 16 experts)``, or nothing."""
    if not facts:
        return ""
    from gradience.policy.evidence_rules import params_text

    parts = []
    if facts.get("params") is not None:
        parts.append(f"{params_text(facts['params'])} from {facts.get('params_source')}")
    if facts.get("recurrent"):
        parts.append(f"recurrent: {facts.get('recurrent_reason')}")
    if facts.get("num_experts"):
        parts.append(f"{facts['num_experts']} experts")
    return f" ({'; '.join(parts)})" if parts else ""


def _fmt_evidence(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return _fmt(value)
