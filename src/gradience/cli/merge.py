"""``gradience merge``: combine LoRA adapters exactly, from their factors, into one adapter PEFT loads (issue 19).

Thin layer: parses flags, calls :mod:`gradience.merge` and renders. Imports nothing heavy (numpy only when it
runs, never torch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags
from gradience.cli.policy_flags import add_policy_flags, named_policies, number, policy_from_args
from gradience.textfmt import safe_text

EPILOG = """\
methods:
  cat      the exact weighted sum sum_i w_i*s_i*B_i*A_i, factors concatenated (rank sum(r_i); no SVD)
  linear   the same exact sum; with a policy, truncated like svd
  svd      the best rank-k approximation of the exact sum, from the factors (default k: the largest input rank)
  ties     TIES-Merging (Yadav et al. 2023): trim to --density, elect sign, disjoint mean; per module on the
           dense update, then a truncated SVD with the policy (default k: the largest input rank)
  dare     DARE (Yu et al. 2024): drop with --drop-rate p, rescale 1/(1-p) (--seed), weighted sum; then as ties
policies (svd / linear / ties / dare): the compress policies --rank, --energy, --sv-fro, --sv-cumulative,
  --sv-ratio, --per-layer, --budget, with --min-rank/--max-rank/--allowed-ranks/--uniform

examples:
  gradience merge ./task-a ./task-b --out ./merged                            # exact sum, weights 1,1
  gradience merge ./task-a ./task-b --out ./merged --weights 0.5,0.5 --method svd --rank 16
  gradience merge ./a ./b ./c --out ./merged --method ties --density 0.2 --energy 0.95 --json
  gradience audit --peft-dir ./merged                                          # then evaluate every task

Output: OUT/adapter_model.safetensors, OUT/adapter_config.json (one lora_alpha, per-module ranks in
rank_pattern, use_rslora false) and OUT/merge.json (gradience.merge/v1: inputs with sha256 and weights,
ranks, retained energy, error vs the exact weighted sum, interference per module), written atomically.
"""


def add_parser(sub: Any) -> None:
    from gradience.policy.thresholds import MERGE_DARE_DROP_DEFAULT, MERGE_TIES_DENSITY_DEFAULT

    p: argparse.ArgumentParser = sub.add_parser(
        "merge", help="merge LoRA adapters exactly, from their factors, into one PEFT adapter",
        description="Merge PEFT LoRA adapters: the exact weighted sum of their updates (or its best rank-k "
                    "approximation, or TIES / DARE per module), written as one adapter PEFT loads directly, "
                    "with interference diagnostics per module.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter directories (two or more)")
    p.add_argument("--out", metavar="OUT", help="output directory (must not be an input or inside one)")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter (default 1 each)")
    p.add_argument("--method", choices=("cat", "linear", "svd", "ties", "dare"), default="linear",
                   help="how updates are combined (default linear: the exact weighted sum)")
    add_policy_flags(p, unit="module", help_for={
        "per_layer": "the audit's per-layer rule on the merged spectrum",
        "budget": "total LoRA parameters: an integer or a percentage of the exact sum's (e.g. 30%%)"})
    p.add_argument("--density", type=number, default=MERGE_TIES_DENSITY_DEFAULT, metavar="D",
                   help=f"ties: fraction of each update's entries kept (default {MERGE_TIES_DENSITY_DEFAULT})")
    p.add_argument("--drop-rate", type=number, default=MERGE_DARE_DROP_DEFAULT, metavar="P",
                   help=f"dare: drop probability (default {MERGE_DARE_DROP_DEFAULT})")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                   help="dtype of the merged factors (default: the first input's)")
    p.add_argument("--dry-run", action="store_true", help="plan and measure only: write nothing")
    p.add_argument("--json", action="store_true", help="print the gradience.merge/v1 document")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT written by gradience; merge adapters whose base names differ; "
                        "drop non-LoRA tensors")
    add_common_flags(p)
    p.set_defaults(func=run)


def _policy(args: argparse.Namespace) -> Any:
    """The compress policy the flags name, or None when none is given."""
    named = bool(named_policies(args))
    if not named and args.uniform:
        from gradience.errors import InputError

        raise InputError("--uniform needs a policy; for the exact sum at one rank everywhere use --method linear "
                         "--rank K --uniform with K >= the largest sum(r_i)")
    return policy_from_args(args) if named else None


def run(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from gradience import jsonio
    from gradience.adapter import load_adapter
    from gradience.errors import InputError
    from gradience.merge import MergeOptions, merge
    from gradience.merge.render import render_text

    if not args.out and not args.dry_run:
        raise InputError("no output given: pass --out OUT (or --dry-run to measure only)")
    if len(args.adapters) < 2:
        raise InputError("merge needs at least two adapters")
    options = MergeOptions(method=args.method, weights=args.weights, policy=_policy(args), dtype=args.dtype,
                           density=args.density, drop_rate=args.drop_rate, seed=args.seed, force=args.force,
                           dry_run=args.dry_run)
    from gradience.policy.thresholds import MERGE_MAX_INPUTS

    if len(args.adapters) > MERGE_MAX_INPUTS:
        raise InputError(f"merge takes at most {MERGE_MAX_INPUTS} adapters, got {len(args.adapters)}")
    loaded = [load_adapter(path) for path in args.adapters]
    result = merge(loaded, args.out, options)
    doc = result.to_dict()
    if args.json:
        sys.stdout.write(jsonio.dumps(doc, pretty=True) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(doc), keep_newlines=True))
    return 0
