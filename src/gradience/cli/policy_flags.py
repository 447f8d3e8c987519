"""The compress rank-policy flags, shared by ``gradience compress`` and ``gradience merge``.

One place adds ``--rank/--energy/--sv-fro/--sv-cumulative/--sv-ratio/--per-layer/--budget`` with their
modifiers and reads them back into a :class:`gradience.compress.Policy`, so the two commands cannot drift apart.
Imports nothing heavy.
"""

from __future__ import annotations

import argparse
from typing import Any

#: argparse destinations of the valued policy flags, in the order the first one given wins.
VALUED_POLICIES = ("rank", "energy", "sv_fro", "sv_cumulative", "sv_ratio", "budget")


def number(text: str) -> float:
    """argparse type: a float, with a one-line error naming the text otherwise."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def add_policy_flags(p: argparse.ArgumentParser, *, unit: str, help_for: dict[str, str]) -> None:
    """Add the mutually exclusive policy flags and their modifiers (--margin, --min/max-rank, ...).

    ``unit`` names what gets a rank ("layer", "module"); ``help_for`` overrides the help of single flags
    (keyed by destination) where a command words it its own way.
    """
    texts = {
        "rank": f"keep K directions in every {unit}",
        "energy": "smallest k retaining fraction T of sum sigma^2",
        "sv_fro": "smallest k with ||dW_k||_F >= T ||dW||_F",
        "sv_cumulative": "smallest k with sum of the top-k sigma >= T sum sigma",
        "sv_ratio": "keep sigma_i >= sigma_1 / X",
        "per_layer": "the audit's per-layer rule",
        "budget": "total LoRA parameters: an integer or a percentage (e.g. 30%%)",
        "margin": "--per-layer: rank >= M x k@90%%",
        "min_rank": "never below K",
        "max_rank": "never above K",
        "allowed_ranks": "round each k up to one of these ranks",
        "uniform": "one rank everywhere (for engines without rank_pattern)",
    }
    texts.update(help_for)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, metavar="K", help=texts["rank"])
    group.add_argument("--energy", type=number, metavar="T", help=texts["energy"])
    group.add_argument("--sv-fro", type=number, metavar="T", help=texts["sv_fro"])
    group.add_argument("--sv-cumulative", type=number, metavar="T", help=texts["sv_cumulative"])
    group.add_argument("--sv-ratio", type=number, metavar="X", help=texts["sv_ratio"])
    group.add_argument("--per-layer", action="store_true", help=texts["per_layer"])
    group.add_argument("--budget", metavar="P", help=texts["budget"])
    p.add_argument("--margin", type=float, default=1.0, metavar="M", help=texts["margin"])
    p.add_argument("--min-rank", type=int, metavar="K", help=texts["min_rank"])
    p.add_argument("--max-rank", type=int, metavar="K", help=texts["max_rank"])
    p.add_argument("--allowed-ranks", metavar="LIST", help=texts["allowed_ranks"])
    p.add_argument("--uniform", action="store_true", help=texts["uniform"])


def named_policies(args: argparse.Namespace) -> list[str]:
    """The policy flags given, as their command-line spellings (``--rank``, ``--per-layer``, ...)."""
    named = ["--" + name.replace("_", "-") for name in VALUED_POLICIES if getattr(args, name) is not None]
    if args.per_layer:
        named.append("--per-layer")
    return named


def policy_from_args(args: argparse.Namespace) -> Any:
    """The compress Policy the flags name; InputError when none is named."""
    from gradience.audit.suggest import parse_allowed_ranks
    from gradience.compress import Policy
    from gradience.errors import InputError

    chosen = [(name, getattr(args, name)) for name in VALUED_POLICIES if getattr(args, name) is not None]
    if args.per_layer:
        chosen.append(("per_layer", None))
    if not chosen:
        raise InputError("no policy given: pass one of --rank K, --energy T, --sv-fro T, --sv-cumulative T, "
                         "--sv-ratio X, --per-layer, --budget P")
    name, value = chosen[0]
    return Policy(name=name, value=value, margin=args.margin, min_rank=args.min_rank, max_rank=args.max_rank,
                  allowed_ranks=parse_allowed_ranks(args.allowed_ranks) if args.allowed_ranks else None,
                  uniform=args.uniform)
