"""``gradience compress``: write a smaller adapter that PEFT (and vLLM / llama.cpp) load exactly (SPEC §12).

Thin layer: parses flags, calls :mod:`gradience.compress` and renders. Imports nothing heavy (numpy only when
it runs, never torch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags
from gradience.cli.policy_flags import add_policy_flags, named_policies, number, policy_from_args
from gradience.textfmt import safe_text

EPILOG = """\
policies (exactly one):
  --rank K            k = K in every layer
  --energy T          smallest k with sum_{i<=k} s_i^2 >= T * sum s_i^2   (PEFT convert_to_lora's float rank)
  --sv-fro T          smallest k with ||dW_k||_F >= T * ||dW||_F          (kohya resize_lora sv_fro)
  --sv-cumulative T   smallest k with sum_{i<=k} s_i >= T * sum s_i        (kohya resize_lora sv_cumulative)
  --sv-ratio X        keep every s_i >= s_1 / X                           (kohya resize_lora sv_ratio)
  --per-layer         the audit's per-layer suggestion (allowed rank >= margin x k@90%)
  --budget P          P LoRA parameters (integer, or a percentage like 30%), allocated greedily by retained
                      relative energy per parameter

Output: OUT/adapter_model.safetensors, OUT/adapter_config.json (one lora_alpha, per-module ranks in
rank_pattern, no alpha_pattern, use_rslora false) and OUT/compress.json (gradience.compress/v1), written to
a temporary directory beside OUT and swapped into place atomically. --force replaces only an earlier output
of ours (OUT holding compress.json); leftovers of killed runs beside OUT are cleaned up and reported.
Portability: PEFT, vLLM (current releases, >= 0.33.0, unless --engine-version vllm=X.Y.Z) and llama.cpp, from
the engine table in gradience.engines (each row names the engine source it encodes).

examples:
  gradience audit --peft-dir ./adapter --suggest-per-layer        # how much rank is used?
  gradience compress --peft-dir ./adapter --out ./adapter-r8 --energy 0.9 --dry-run
  gradience compress ./adapter --out ./adapter-r4 --rank 4                 # the adapter as a positional too
  gradience compress --peft-dir ./adapter --out ./adapter-small --per-layer --margin 1.5
  gradience compress --peft-dir ./adapter --out ./adapter-vllm --energy 0.95 --uniform   # one rank (vLLM < 0.33)
  gradience compress --peft-dir ./adapter --out ./adapter-30pct --budget 30% --dtype bfloat16 --json
  gradience audit --peft-dir ./adapter-small                      # the new ranks; then evaluate it
  gradience compress ./mlx-adapters --out ./peft-r8 --rank 8 --format peft     # MLX-LM adapter -> PEFT
  gradience compress ./mlx-adapters --out ./peft --format peft     # conversion only: same ranks, same ΔW
"""


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compress", help="write a smaller adapter (exact truncated SVD from the factors)",
        description="Compress a PEFT LoRA adapter: per layer the exact best rank-k approximation of dW from the "
                    "factors (never the dense dW), balanced factors, a config PEFT loads directly, and a "
                    "portability verdict for PEFT, vLLM and llama.cpp.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", nargs="?", metavar="IN", help="PEFT adapter directory (the same as --peft-dir IN)")
    p.add_argument("--peft-dir", metavar="IN", help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--adapter-name", metavar="N", help="which adapter of a multi-adapter directory")
    p.add_argument("--out", metavar="OUT", help="output directory (must not be IN or inside it)")
    add_policy_flags(p, unit="layer", help_for={
        "energy": "smallest k retaining fraction T of sum sigma^2 (PEFT convert_to_lora meaning)",
        "sv_fro": "kohya's sv_fro: smallest k with ||dW_k||_F >= T ||dW||_F",
        "sv_cumulative": "kohya's sv_cumulative: smallest k with sum of the top-k sigma >= T sum sigma",
        "sv_ratio": "kohya's sv_ratio: keep sigma_i >= sigma_1 / X",
        "per_layer": "the audit's per-layer suggestion (with --margin, rounded to allowed ranks)",
        "budget": "total LoRA parameters: an integer or a percentage of the input's (e.g. 30%%)",
        "margin": "--per-layer: allowed rank >= M x k@90%% (energy rank: directions holding 90%% "
                  "of the update energy; default 1.0)",
        "min_rank": "never below K (the layer's r caps it)",
        "max_rank": "never above K (wins over rounding)",
        "allowed_ranks": "round each k up to one of these ranks (default: exact k; --per-layer: 1,2,4,...,256)",
        "uniform": "one rank everywhere (the largest per-layer choice; lower-rank modules zero-padded), "
                   "for engines that ignore rank_pattern (vLLM before 0.33.0; current vLLM reads it)"})
    p.add_argument("--format", choices=("peft", "mlx"), default=None, dest="out_format",
                   help="output layout: peft (adapter_model.safetensors, PEFT config) or mlx (mlx-lm's "
                        "adapters.safetensors; one rank and one scale, lower ranks zero-padded); default: the "
                        "input's. --format alone (no policy) converts only: every module keeps its rank")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                   help="dtype of the new factors (default: keep each factor's dtype)")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base model (local dir or hub id in the local HF cache): UDR before/after and the exact "
                        "merged-weight error of DoRA modules")
    p.add_argument("--base-norms-cache", metavar="F", help="cache file for base-weight norms")
    p.add_argument("--scale-intruders", type=number, metavar="LAMBDA",
                   help="instead of a rank policy: scale the intruder dimensions of W + dW by LAMBDA (PEFT's "
                        "reduce_intruder_dimension, default there 0.75), same ranks; needs --base-model; writes "
                        "OUT/intruders.json (gradience.intruders.mitigate/v1)")
    p.add_argument("--dry-run", action="store_true", help="plan only: print what would be written, write nothing")
    p.add_argument("--json", action="store_true", help="print the gradience.compress/v1 document")
    p.add_argument("--force", action="store_true", help="replace OUT when it is an earlier compress output")
    p.add_argument("--engine-version", action="append", default=[], metavar="ENGINE=VERSION",
                   help="judge portability for this engine release (e.g. vllm=0.10.2; default: current "
                        "releases, vLLM >= 0.33.0); repeatable")
    add_common_flags(p)
    p.set_defaults(func=run)


_policy = policy_from_args  # the earlier private name; policy_from_args lives in cli/policy_flags.py


def _engine_versions(items: list[str]) -> dict[str, str]:
    from gradience.engines import parse_engine_versions
    from gradience.errors import InputError

    versions: dict[str, str] = {}
    for item in items:
        engine, sep, version = item.partition("=")
        if not sep:
            raise InputError(f"--engine-version expects ENGINE=VERSION (e.g. vllm=0.10.2), got {item[:60]!r}")
        versions[engine.strip().lower().replace("-", "_").replace(".", "_")] = version.strip()
    try:
        parse_engine_versions(versions)
    except ValueError as exc:
        raise InputError(f"--engine-version: {exc}") from None
    return versions


def run(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from gradience.adapter import load_adapter
    from gradience.compress import CompressOptions, compress
    from gradience.compress.render import render_text
    from gradience.errors import InputError

    if args.adapter is not None:
        if args.peft_dir is not None and args.peft_dir != args.adapter:
            raise InputError(f"two adapters given: {args.adapter} and --peft-dir {args.peft_dir}; pass one")
        args.peft_dir = args.adapter
    if not args.peft_dir:
        raise InputError("no adapter given: pass the adapter directory (gradience compress IN, or --peft-dir IN)")
    if not args.out and not args.dry_run:
        raise InputError("no output given: pass --out OUT (or --dry-run to plan only)")
    if args.scale_intruders is not None:
        if args.out_format is not None:
            raise InputError("--format applies to the rank policies; --scale-intruders keeps the input's layout")
        return _scale_intruders(args)
    conversion = args.out_format is not None and not named_policies(args)
    policy = None if conversion else policy_from_args(args)
    loaded = load_adapter(args.peft_dir, adapter_name=args.adapter_name)
    if policy is None:
        policy = _conversion_policy(loaded, args)
    options = CompressOptions(policy=policy, dtype=args.dtype, base_model=args.base_model,
                              base_norms_cache=args.base_norms_cache, dry_run=args.dry_run, force=args.force,
                              engine_versions=_engine_versions(args.engine_version), format=args.out_format)
    result = compress(loaded, args.out, options)
    doc = result.to_dict()
    if args.json:  # the audit's fast row writer (same parsed document)
        from gradience.audit.jsonout import dumps_json

        sys.stdout.write(dumps_json(doc) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(doc), keep_newlines=True))  # names from the files, escaped
    return 0


def _conversion_policy(loaded: Any, args: argparse.Namespace) -> Any:
    """``--format`` with no rank policy: a pure format conversion. Every module keeps its own rank (``--rank``
    at the largest rank is capped at each module's r), so ΔW is unchanged; the modifiers still apply."""
    from gradience.errors import InputError

    if not loaded.pairs:
        raise InputError("the adapter holds no LoRA pairs to convert", loaded.adapter_weights_path)
    top = max(p.r for p in loaded.pairs)
    base = policy_from_args(argparse.Namespace(**{**vars(args), "rank": top}))
    base.extra["conversion"] = f"--format {args.out_format} alone: every module keeps its rank (ΔW unchanged)"
    return base


def _scale_intruders(args: argparse.Namespace) -> int:
    """``--scale-intruders λ``: the intruder mitigation instead of a rank policy (same ranks, same config)."""
    from gradience import jsonio
    from gradience.adapter import load_adapter
    from gradience.errors import InputError
    from gradience.intruders.mitigate import mitigate_adapter

    others = named_policies(args)
    if others:
        raise InputError(f"--scale-intruders keeps every rank: it cannot be combined with {others[0]}")
    if not args.base_model:
        raise InputError("--scale-intruders needs the base model (--base-model DIR_OR_ID)")
    loaded = load_adapter(args.peft_dir, adapter_name=args.adapter_name)
    doc = mitigate_adapter(loaded, args.base_model, args.out, args.scale_intruders, force=args.force,
                           dry_run=args.dry_run)
    if args.json:
        sys.stdout.write(jsonio.dumps(doc, pretty=True) + "\n")
    else:
        rows = [row for row in doc["layers"] if row["intruder_count"]]
        lines = [f"intruders scaled by {doc['lambda']:g}: {doc['n_layers_changed']} of {doc['n_layers_checked']} "
                 f"layers changed (k={doc['intruder_k']}, eps={doc['intruder_eps']:g})"]
        for row in rows:
            kept, change = row["energy_retained"], row["rel_change"]
            lines.append(f"  {row['name']}: {row['intruder_count']} intruder(s), ΔW changed by "
                         f"{'n/a' if change is None else format(change, '.1%')} (relative Frobenius), rank-r "
                         f"truncation keeps {'n/a' if kept is None else format(kept, '.2%')} of the new ΔW")
        lines.append(f"wrote {doc['out_dir']}" if doc["written"] else "dry run: nothing written")
        sys.stdout.write(safe_text("\n".join(lines) + "\n", keep_newlines=True))
    return 0
