"""``gradience demo``: the whole golden path in one command (SPEC §8).

Runs the offline toy LoRA run, then ``check``, ``monitor --verbose`` and ``audit --top-wasteful 10`` on its
outputs through the same CLI entry point a user types, printing each command before its output. Needs only
the ``hf`` extra; without torch it fails with one line naming the extra.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from gradience.cli.main import add_common_flags

DEFAULT_OUT = "gradience_demo"


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the golden path end to end: toy LoRA run, check, monitor, audit",
        description="Train a tiny LoRA classifier offline, then run check, monitor and audit on it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A rerun into the same --out starts a fresh run.jsonl (the previous one is kept as run.jsonl.prev).\n\n"
               "examples:\n"
               "  gradience demo\n"
               "  gradience demo --out /tmp/gradience_demo --max-steps 20 --seed 1")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"))
    p.add_argument("--max-steps", type=int, default=None, help="training steps of the toy run (default 100)")
    p.add_argument("--seed", type=int, default=None)
    add_common_flags(p)
    p.set_defaults(func=run)


def _check_out_dir(out: str) -> None:
    """Create ``--out`` (or accept an existing directory) and prove it writable, as one-line input errors."""
    import stat
    import tempfile
    from pathlib import Path

    from gradience.errors import InputError
    from gradience.io.textfile import os_problem, probe

    path = Path(out)
    st = probe(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise InputError("--out names an existing file, not a directory", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise InputError(f"cannot write the demo output here: {os_problem(exc)}", path) from None


def _fresh_run_log(out: str) -> None:
    """A rerun into the same --out starts a fresh run.jsonl (the toy run appends, so monitor would otherwise
    read a log of several runs); the previous log is kept as run.jsonl.prev, and the user is told."""
    import os

    from gradience.errors import InputError
    from gradience.io.textfile import os_problem

    log = os.path.join(out, "run.jsonl")
    if not os.path.lexists(log):
        return
    try:
        os.replace(log, log + ".prev")
    except OSError as exc:
        raise InputError(f"cannot move the previous run log aside: {os_problem(exc)}", log) from None
    print(f"gradience demo: {out} holds an earlier demo; its run log is kept as {log}.prev and this run starts "
          "a fresh run.jsonl", file=sys.stderr)


def _banner(text: str) -> None:
    print(f"\n$ {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from gradience.cli.main import main as cli_main
    from gradience.toy.model import require_hf

    require_hf("gradience demo")  # one clear error naming the extra, before anything else happens
    _check_out_dir(args.out)  # a file, /proc/..., a read-only place: a usage error before the toy run
    from gradience.toy.run import ToyRunConfig, format_result, next_commands, run_toy

    _fresh_run_log(args.out)
    cfg = ToyRunConfig(out=args.out, device=args.device, progress=True)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.seed is not None:
        cfg.seed = args.seed
    _banner(f"python examples/vnext/toy_lora_run.py --out {shlex.quote(args.out)} --device {args.device}")
    result = run_toy(cfg)
    print(format_result(result), flush=True)
    worst = 0
    for command in next_commands(args.out):
        _banner(command)
        argv = shlex.split(command)[1:]
        if getattr(args, "debug", False):
            argv.append("--debug")
        code = cli_main(argv)
        sys.stdout.flush()
        if code not in (0, 1):  # 1 is a --fail-on gate; the demo sets none, but it is not a failure
            print(f"gradience demo: '{command}' exited with {code}", file=sys.stderr)
        worst = max(worst, code)
    _write_report(result.out)
    return worst


def _write_report(out: Any) -> None:
    """The HTML report of the demo run (with UDR: the toy base is saved in the run's ``base/``)."""
    from gradience.errors import GradienceError, MissingDependencyError
    from gradience.report import write_report

    try:
        path = write_report(out)
    except MissingDependencyError as exc:  # the demo itself needs only the hf extra
        print(f"gradience demo: report skipped: {exc}", file=sys.stderr)
        return
    except GradienceError as exc:
        print(f"gradience demo: report not written: {exc}", file=sys.stderr)
        return
    print(f"\nReport: {path} (open it in a browser; `gradience report {shlex.quote(str(out))}` rewrites it)",
          flush=True)
