"""``gradience bench`` / ``python -m gradience.bench``: validate a suggested rank by truncating and retraining.

Thin layer over :mod:`gradience.bench` (SPEC §15). torch / transformers are imported only when a bench runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any

from gradience.cli.main import add_common_flags

EXIT_POLICY_FAIL = 1

EPILOG = """examples:
  gradience bench --config examples/bench/toy.yaml --smoke            # offline toy, ~1-3 min on a CPU
  python -m gradience.bench --config examples/bench/toy.yaml --seeds 1,2,3 --output-dir runs/bench
  python -m gradience.bench --config experiments.yaml --base-model microsoft/DialoGPT-medium --ci
  python -m gradience.bench.run_bench --config F --output D           # the reference tool's command line

exit codes: 0 finished; 1 with --ci when the policy verdict is FAIL or task.probe_gate is not met;
2 bad config or input (one line on stderr; an output directory holding another bench says how to start over).
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="F",
                   help="bench YAML (the reference tool's bench_version/model/task/train/lora/compression/"
                        "audit/runtime sections, plus seeds, arms, policy)")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base model for UDR (Update Dominance Ratio) per arm (local dir or hub id in the "
                        "local HF cache); implies UDR")
    p.add_argument("--base-norms-cache", metavar="PATH",
                   help="base-norm cache file for UDR, anywhere (a config's audit.base_norms_cache must lie inside "
                        "the output directory)")
    p.add_argument("--output-dir", metavar="D", default=None, help="output directory (default runs/bench)")
    p.add_argument("--smoke", action="store_true",
                   help="a short run at the config's runtime.smoke_* sizes (steps, train and eval samples)")
    p.add_argument("--seeds", metavar="LIST", help="seeds, e.g. 1,2,3 (default: the config's seeds or train.seed)")
    p.add_argument("--arms", metavar="LIST",
                   help="arms, e.g. truncate_per_layer,retrain_per_layer,uniform:4 (default: all seven)")
    p.add_argument("--resume", action="store_true", help="continue a bench in --output-dir, skipping finished arms")
    p.add_argument("--ci", action="store_true", help="exit 1 when the policy verdict is FAIL")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None, help="training device")
    p.add_argument("--launcher", choices=("none", "accelerate"), default=None,
                   help="'accelerate': launch each arm's training with accelerate launch (DDP)")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="processes per arm with --launcher accelerate (default: the config's, else 1)")
    p.add_argument("--json", action="store_true", help="print bench.json (gradience.bench/v1) on stdout")
    add_common_flags(p)
    p.set_defaults(func=run)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="validate a suggested rank: truncate and retrain arms, paired CIs, verdicts",
                       description="Gradience Bench: train a probe LoRA, audit it, then test the suggested "
                                   "ranks by truncation (no retraining) and by retraining, over seeds, with "
                                   "paired-bootstrap intervals and PASS/FAIL verdicts (SPEC §15).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)


def run(args: argparse.Namespace) -> int:
    from gradience.bench.config import load_bench_config, parse_arms, parse_seeds
    from gradience.bench.render import render_text
    from gradience.bench.runner import run_bench
    from gradience.errors import InputError
    from gradience.jsonio import dumps

    cfg = load_bench_config(args.config)
    if cfg.ignored_keys:
        print(f"gradience bench: warning: {args.config}: ignored (the reference tool does not read them either): "
              f"{', '.join(cfg.ignored_keys)}", file=sys.stderr)
    overrides: dict[str, Any] = {"smoke": bool(args.smoke)}
    if args.base_norms_cache:
        overrides["base_norms_cache"] = args.base_norms_cache
        overrides["base_norms_cache_from_cli"] = True
    if args.seeds:
        overrides["seeds"] = parse_seeds(args.seeds)
    if args.arms:
        overrides["arms"] = parse_arms(args.arms)
    if args.base_model:
        overrides["base_model"] = args.base_model
        overrides["compute_udr"] = True
    if args.device:
        overrides["device"] = args.device
    if args.launcher:
        overrides["launcher"] = args.launcher
    if args.num_processes is not None:
        if not 1 <= args.num_processes <= 1024:
            raise InputError("--num-processes: between 1 and 1024")
        overrides["num_processes"] = args.num_processes
    cfg = replace(cfg, **overrides)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine; use --device cpu", path="--device")
    output_dir = args.output_dir or "runs/bench"
    bench = run_bench(cfg, output_dir, resume=args.resume)
    from gradience.textfmt import safe_text

    # A terminal gets a plain aligned table; the Markdown is in bench.md (and the full record in bench.json).
    out = dumps(bench) if args.json else safe_text(render_text(bench), keep_newlines=True)
    sys.stdout.write(out + ("\n" if not out.endswith("\n") else ""))
    written = [n for n in ("bench.json", "bench.md", "report.html") if os.path.isfile(os.path.join(output_dir, n))]
    print(f"bench: outputs in {safe_text(output_dir)}: {', '.join(written)} (per-arm adapters and logs under "
          "seed_*/)", file=sys.stderr)
    gate_failed = bool(bench.get("probe_gate")) and not bench["probe_gate"]["passed"]
    return EXIT_POLICY_FAIL if args.ci and (bench["verdict"] != "PASS" or gate_failed) else 0
