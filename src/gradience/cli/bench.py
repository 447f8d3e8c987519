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

EPILOG = """verdicts: PASS when the 95% paired interval of Δ lies above −tolerance, FAIL when it lies below, INCONCLUSIVE
otherwise (with the eval items that would decide it); the point-estimate rule is kept in bench.json.

exit codes: 0 finished; 1 with --ci when the verdict is not PASS or task.probe_gate is not met;
2 bad config or input (one line on stderr; an output directory holding another bench says how to start over).

examples:
  gradience bench --config examples/bench/toy.yaml --smoke            # offline toy, ~1-3 min on a CPU
  python -m gradience.bench --config examples/bench/toy.yaml --seeds 1,2,3 --output-dir runs/bench
  python -m gradience.bench --config experiments.yaml --base-model microsoft/DialoGPT-medium --ci
  python -m gradience.bench.run_bench --config F --output D           # the reference tool's command line
  gradience bench --config examples/bench/toy.yaml --peft-dir run/peft_r4 --against run/peft
                                      # your own (compressed) adapter against the original, no training
  gradience bench --config examples/bench/toy.yaml --seeds 1,2,3 --executor ray --max-parallel 2
                                      # arms side by side on a Ray cluster (README "Scaling out")
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
    p.add_argument("--peft-dir", metavar="ADAPTER",
                   help="evaluate your own adapter on the config's task and eval items (nothing is trained), "
                        "paired against the base model or --against; with --base-model DIR, the base it was "
                        "trained on (default: the base saved beside it, else the config's model.name)")
    p.add_argument("--against", metavar="ADAPTER2",
                   help="with --peft-dir: the reference adapter (e.g. the original of a compressed adapter)")
    p.add_argument("--json", action="store_true", help="print bench.json (gradience.bench/v1) on stdout")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="'local' (default): arms one after another here; 'ray': each (seed, arm) a Ray task, "
                        "side by side (the [ray] extra; the output dir must be shared with the workers)")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="with --executor ray: the cluster (default: RAY_ADDRESS, else the one started on this "
                        "machine with `ray start --head`)")
    p.add_argument("--gpus-per-arm", type=float, default=0.0, metavar="N",
                   help="with --executor ray: GPUs each arm asks Ray for (default 0)")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="with --executor ray: at most N arms at once (default: as many as the cluster fits)")
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
    if args.peft_dir:
        return _run_peft_dir(args, cfg)
    if args.against:
        raise InputError("needs --peft-dir (the adapter to evaluate against it)", path="--against")
    output_dir = args.output_dir or "runs/bench"
    executor = getattr(args, "executor", "local")
    if executor == "ray":
        from gradience.bench.executors.ray_exec import run_bench_ray

        bench = run_bench_ray(cfg, output_dir, resume=args.resume, address=args.address,
                              gpus_per_arm=args.gpus_per_arm, max_parallel=args.max_parallel)
    else:
        if args.address or args.gpus_per_arm or args.max_parallel is not None:
            raise InputError("--address, --gpus-per-arm and --max-parallel need --executor ray", path="--executor")
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


_TRAINING_FLAGS = (("seeds", "--seeds"), ("arms", "--arms"), ("resume", "--resume"), ("launcher", "--launcher"),
                   ("num_processes", "--num-processes"), ("base_norms_cache", "--base-norms-cache"),
                   ("address", "--address"), ("gpus_per_arm", "--gpus-per-arm"), ("max_parallel", "--max-parallel"))


def _run_peft_dir(args: argparse.Namespace, cfg: Any) -> int:
    """``--peft-dir ADAPTER [--against ADAPTER2]``: evaluate the user's adapter, print its verdict."""
    from gradience.bench.evaluate import evaluate_adapters
    from gradience.bench.render import render_text
    from gradience.bench.runner import _stderr
    from gradience.errors import InputError
    from gradience.jsonio import dumps
    from gradience.textfmt import safe_text

    if getattr(args, "executor", "local") != "local":
        raise InputError("not used with --peft-dir (nothing is trained)", path="--executor")
    for attr, flag in _TRAINING_FLAGS:
        if getattr(args, attr, None) not in (None, False):
            raise InputError("not used with --peft-dir (nothing is trained)", path=flag)
    output_dir = args.output_dir or "runs/bench_eval"
    bench = evaluate_adapters(cfg, output_dir, args.peft_dir, against=args.against, base_model=args.base_model,
                              progress=_stderr)
    out = dumps(bench) if args.json else safe_text(render_text(bench), keep_newlines=True)
    sys.stdout.write(out + ("\n" if not out.endswith("\n") else ""))
    print(f"bench: outputs in {safe_text(output_dir)}: bench.json, bench.md, eval_items.json", file=sys.stderr)
    return EXIT_POLICY_FAIL if args.ci and bench["verdict"] != "PASS" else 0
