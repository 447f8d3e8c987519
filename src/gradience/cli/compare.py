"""``gradience compare A B``: two adapters (or audit JSON files) side by side (SPEC §13).

Thin layer: parses flags, calls :func:`gradience.compare.compare` and renders. Imports nothing heavy at module
level; the comparison needs numpy only (never torch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags
from gradience.textfmt import safe_text

EPILOG = """\
A and B are PEFT adapter directories (full analysis: update cosine and subspace overlaps from the factors) or
`gradience audit --json` files (metric deltas only). A base saved beside an adapter (../base, as the toy run,
demo and bench write) gives UDR without --base-model. Exit 0; 1 when a --fail-on rule is met; 2 for bad input.

examples:
  gradience compare runs/conservative/adapter runs/aggressive/adapter --base-model ./base
  gradience compare conservative_audit.json aggressive_audit.json --top 5
  gradience compare A B --json --fail-on 'cos<0.5,udr_median_delta>0.2'
"""

FAIL_ON_HELP = (
    "CI gate rules, comma-separated (exit 1 when one is met). Per module (met when ANY matched module satisfies "
    "it): cos, overlap_left, overlap_right, k, and <m>_a / <m>_b / <m>_delta for m in r, scale, utilization, "
    "stable_rank, energy_rank_90, delta_sigma_max, delta_frob_norm, udr (e.g. 'cos<0.5', 'udr_delta>0.2'); "
    "summary: cos_mean, cos_median, overlap_left_mean, overlap_right_mean, n_matched, n_only_in_a, n_only_in_b, "
    "udr_median_delta, fraction_udr_gt_0_3_delta, utilization_mean_delta, udr_median_a ... (e.g. "
    "'udr_median_delta>0.2'); flags: unmatched, issues, error. A rule on a metric that could not be computed "
    "is an error (exit 2), never a pass."
)


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compare", help="compare two LoRA adapters: update cosine, subspace overlap, UDR differences",
        description="Compare two LoRA adapters module by module: each side's rank, utilization, update size\n"
                    "and UDR (Update Dominance Ratio) with their differences, the cosine of the two updates ΔW and the "
                    "overlap of their\n"
                    "top-k singular subspaces (from the factors; the dense ΔW is never formed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="adapter directory or audit JSON file (gradience audit --json)")
    p.add_argument("b", metavar="B", help="adapter directory or audit JSON file")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base model (local dir or hub id in the local HF cache): UDR for both sides, base read once")
    p.add_argument("--base-norms-cache", metavar="F", help="cache file for base-weight norms (shared by both sides)")
    p.add_argument("--k", type=int, metavar="K",
                   help="singular directions per side for the overlaps (default: min(k@90%% of A, of B) per module)")
    p.add_argument("--sort", choices=("udr", "cos", "overlap", "name"),
                   help="module order: udr = largest |ΔUDR| first, cos / overlap = least similar first, name "
                        "(default: udr when both sides have UDR, else cos, else name)")
    p.add_argument("--top", type=int, metavar="N", help="modules in the text table (default 10)")
    p.add_argument("--json", action="store_true", help="print the gradience.compare/v1 JSON document")
    p.add_argument("--fail-on", action="append", metavar="RULES", help=FAIL_ON_HELP)
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        if not args.debug:  # everything worth saying is an issue or an InputError (one-line contract)
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from gradience import jsonio
    from gradience.compare import CompareOptions, compare
    from gradience.compare.gates import check_known, evaluate_gates, validate_gates
    from gradience.compare.render import render_text
    from gradience.errors import InputError
    from gradience.gates import parse_gates
    from gradience.policy.thresholds import COMPARE_TOP_DEFAULT

    gates = parse_gates(args.fail_on)
    check_known(gates)
    if args.k is not None and args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    if args.top is not None and args.top < 0:
        raise InputError(f"--top must be >= 0, got {args.top}")
    options = CompareOptions(base_model=args.base_model, base_norms_cache=args.base_norms_cache, k=args.k,
                             sort=args.sort, top=COMPARE_TOP_DEFAULT if args.top is None else args.top,
                             progress=sys.stderr.isatty())
    doc = compare(args.a, args.b, options)
    validate_gates(gates, doc)  # before any output: a rule that cannot be evaluated is exit 2, not a pass
    if args.json:
        sys.stdout.write(jsonio.dumps(doc, pretty=True) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(doc), keep_newlines=True))  # names from the files, escaped
    met = evaluate_gates(gates, doc)
    for msg in met:
        print(f"gradience compare: fail-on met: {safe_text(msg)}", file=sys.stderr)
    return 1 if met else 0
