"""``gradience monitor RUN``: summarize a run from its telemetry log or trainer_state.json (SPEC §6)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import EXIT_GATE, EXIT_OK, add_common_flags


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "monitor", help="summarize a training run from its log: Gradience telemetry, trainer_state.json, "
                        "TensorBoard, W&B or LLaMA-Factory",
        description="Summarize a run: train/test gap, instabilities, LoRA audit, advice. RUN is a telemetry "
                    "JSONL, an HF trainer_state.json, or a directory holding run.jsonl / trainer_state.json / "
                    "checkpoint-*/trainer_state.json; also, recognised by content, TensorBoard event files (or "
                    "their runs/ tree; several runs -> --run-id), a W&B run directory (wandb/offline-run-*, "
                    "read locally), a W&B history export (CSV/JSON) and LLaMA-Factory's trainer_log.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gradience monitor out/run.jsonl --verbose\n"
               "  gradience monitor out/checkpoint-500/trainer_state.json --json\n"
               "  gradience monitor out/runs --run-id Dec06_12-00-00_host   # TensorBoard\n"
               "  gradience monitor wandb/offline-run-20261206_120000-abc123\n"
               "  gradience monitor out/run.jsonl --fail-on 'gap>1.5,nan_loss'")
    p.add_argument("run", metavar="RUN", help="run.jsonl, trainer_state.json, a TensorBoard / W&B / LLaMA-Factory "
                                              "log, or a directory holding one")
    p.add_argument("--json", action="store_true", help="print the gradience.monitor/v1 JSON")
    p.add_argument("--verbose", action="store_true",
                   help="list telemetry issues and rationales; with --json, keep every logged config key "
                        "(default: TrainingArguments keys at their well-known defaults are left out)")
    p.add_argument("--run-id", default=None, help="which run of a multi-run file (default: the last one)")
    p.add_argument("--gap-threshold", type=float, default=None,
                   help="test/train perplexity ratio that counts as memorization (default 1.5)")
    p.add_argument("--strict-schema", action="store_true",
                   help="treat any malformed or unknown telemetry line as an error (exit 2)")
    p.add_argument("--task-profile", metavar="P", default=None,
                   choices=("easy_classification", "hard_reasoning", "generation", "unknown"),
                   help="override the run's task profile (drives the config advice): easy_classification | "
                        "hard_reasoning | generation | unknown")
    p.add_argument("--dataset", metavar="D", default=None,
                   help="override the run's dataset name (the profile is inferred from it, as in check)")
    p.add_argument("--follow", action="store_true",
                   help="re-read the growing log and redraw the summary every --interval seconds until the run's "
                        "run_end (Ctrl-C stops, exit 0); with --json, prints the final report once. Also a "
                        "TensorBoard run or LLaMA-Factory trainer_log.jsonl: until the Trainer's end-of-training "
                        "summary")
    p.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between --follow refreshes (default 5)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="with --follow: stop after S seconds without a new record and report the log as it "
                        "stands (default: wait for the run's end)")
    p.add_argument("--fail-on", action="append", default=None, metavar="RULES",
                   help="exit 1 when a rule is met: e.g. 'gap>1.5', 'warning', 'error', 'nan_loss'")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradience.errors import InputError
    from gradience.gates import parse_gates
    from gradience.jsonio import dumps
    from gradience.monitor import monitor_run
    from gradience.monitor.gates import evaluate_gates, validate_gates
    from gradience.monitor.render import render_text
    from gradience.policy.thresholds import GAP_THRESHOLD
    from gradience.textfmt import safe_text

    gates = parse_gates(args.fail_on)
    validate_gates(gates)  # usage errors before reading a possibly large log
    gap_threshold = GAP_THRESHOLD if args.gap_threshold is None else args.gap_threshold
    if not gap_threshold > 0 or gap_threshold == float("inf"):
        raise InputError(f"--gap-threshold must be a positive number, got {args.gap_threshold}")
    if args.follow:
        followed = _follow(args, gap_threshold)
        if followed is None:
            return EXIT_OK  # Ctrl-C, or no record of the run yet
        report = followed
    else:
        report = monitor_run(args.run, run_id=args.run_id, gap_threshold=gap_threshold,
                             strict=args.strict_schema, task_profile=args.task_profile, dataset=args.dataset)
    met = evaluate_gates(gates, report)
    if args.json:
        data = report.to_dict(full_config=args.verbose)
        if gates:
            data["gates"] = {"rules": [g.text for g in gates], "met": met}
        sys.stdout.write(dumps(data, pretty=True) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(report, verbose=args.verbose), keep_newlines=True))
    for message in met:
        print(f"gradience monitor: fail-on rule met: {safe_text(message)}", file=sys.stderr)
    return EXIT_GATE if met else EXIT_OK


def _follow(args: argparse.Namespace, gap_threshold: float) -> Any:
    """``--follow``: redraw the text summary at each refresh that brought new records; the final report is
    printed by the caller. Ctrl-C returns None."""
    from gradience.monitor.follow import follow
    from gradience.monitor.render import render_text
    from gradience.textfmt import safe_text

    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""

    def redraw(report: Any) -> None:
        if not args.json and report.training.get("status") is None:
            sys.stdout.write(clear + safe_text(render_text(report, verbose=args.verbose), keep_newlines=True))
            sys.stdout.flush()

    try:
        return follow(args.run, on_report=redraw, interval=args.interval, run_id=args.run_id,
                      strict=args.strict_schema, gap_threshold=gap_threshold, task_profile=args.task_profile,
                      dataset=args.dataset, max_idle=args.idle_timeout)
    except KeyboardInterrupt:
        return None
