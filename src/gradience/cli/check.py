"""`gradience check` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli.main import add_common_flags


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("check", help="check (not yet implemented)")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("check")
