"""``gradience series OUT/checkpoint-*``: a checkpoint series (issue 22). Thin: parses flags, calls
:func:`gradience.series.run_series`, prints the table or the JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import EXIT_OK, add_common_flags

EPILOG = """\
Each CHECKPOINT is a checkpoint directory (the Trainer's checkpoint-N/ with adapter_config.json and
trainer_state.json) or a training output directory holding checkpoint-*/. Per checkpoint: the audit summary
(rank use) and UDR (against --base-model, or the adapter's own base when it resolves locally), joined with the
eval metrics of trainer_state.json at that step. The suggested checkpoint is the one with the best logged eval
metric, with how rank use and UDR moved up to it: a fact about the logs, not a prediction.

examples:
  gradience series out/checkpoint-* --base-model ./base
  gradience series out --metric eval_accuracy --json > series.json && gradience report series.json
"""


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "series", help="audit + UDR per checkpoint, joined with the eval metrics; the best-eval checkpoint",
        description="A checkpoint series: audit summary and UDR per checkpoint, joined with trainer_state.json's "
                    "eval metrics.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint-N directories, or their parent")
    p.add_argument("--base-model", default=None, help="base model directory (or hub id in the local cache) for UDR")
    p.add_argument("--no-udr", action="store_true", help="skip UDR (no base model read)")
    p.add_argument("--metric", default=None, help="eval metric that picks the checkpoint (default eval_loss)")
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="whether lower or higher --metric is better (default: min for *loss/perplexity, else max)")
    p.add_argument("--json", action="store_true", help="print the gradience.series/v1 JSON")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradience.jsonio import dumps
    from gradience.series import SeriesOptions, run_series
    from gradience.series.render import render_text
    from gradience.textfmt import safe_text

    doc = run_series(args.checkpoints, SeriesOptions(base_model=args.base_model, udr=not args.no_udr,
                                                     metric=args.metric, mode=args.mode))
    if args.json:
        sys.stdout.write(dumps(doc, pretty=True) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(doc), keep_newlines=True))
    return EXIT_OK
