"""``gradience report PATH``: one self-contained HTML page for a run, an adapter, an audit or a comparison.

Thin layer over :mod:`gradience.report`; needs the ``report`` extra (matplotlib, Jinja2), imported only when
the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "report", help="write one self-contained HTML report of a run, an adapter, an audit, a comparison, a bench, "
                       "a checkpoint series or a merge",
        description="Write one self-contained HTML page (no network, opens from disk): the monitor story and "
                    "curves of a run, per-layer heatmaps, spectra, rank suggestions and the UDR distribution "
                    "of an adapter, or a comparison of two adapters. PATH: a run directory (run.jsonl and/or "
                    "trainer_state.json, adapter below it), a run.jsonl, an adapter directory, an audit JSON, "
                    "a compare JSON, a bench output directory / bench.json, or a merge output directory / "
                    "merge.json.",
        epilog="examples:\n"
               "  gradience report gradience_demo                  # the demo run: story, curves, adapter, UDR\n"
               "  gradience report out/adapter --base-model ./base -o adapter.html\n"
               "  gradience compare A B --json > cmp.json && gradience report cmp.json\n"
               "  gradience report runs/bench                      # a bench: arms, verdicts, UDR per arm\n"
               "  gradience report merged                          # a merge: interference, energy, ranks",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH",
                   help="run directory, run.jsonl, adapter directory, audit/compare/bench JSON, bench directory")
    p.add_argument("-o", "--out", metavar="OUT.html", default=None,
                   help="output file (default: report.html in a directory PATH, X.html beside a file X.json; an existing "
                        "file is replaced only when it is the report of the same PATH, else --force)")
    p.add_argument("--base-model", metavar="ID_OR_DIR", default=None,
                   help="base model (local dir or hub id in the local HF cache) for UDR of the adapter")
    p.add_argument("--title", metavar="T", default=None,
                   help="page title (default: what the page shows: the run id, the adapter's or bench's name)")
    p.add_argument("--run-id", default=None, help="which run of a multi-run telemetry file (default: the last)")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT even when it is not a report of PATH (a report of another input, or "
                        "a file gradience did not write)")
    p.add_argument("--no-udr", action="store_true",
                   help="do not try the adapter's own base_model_name_or_path for UDR")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradience.report import write_report

    target = write_report(args.path, args.out, base_model=args.base_model, title=args.title,
                          udr=not args.no_udr, run_id=args.run_id, force=args.force)
    print(f"gradience report: wrote {target}", file=sys.stdout)
    return 0
