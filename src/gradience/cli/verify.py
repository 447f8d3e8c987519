"""``gradience verify``: prove what a merge or an engine actually applied (issue 20).

Thin layer: picks the mode from the flags, calls :mod:`gradience.verify` and renders. Imports nothing heavy at
module level (numpy only when it runs, never torch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags
from gradience.textfmt import safe_text

EPILOG = """\
modes:
  merged checkpoint   --merged DIR --base-model BASE --peft-dir ADAPTER
                      per module: the applied scale c = <W_merged - W_base, s*B*A> / ||s*B*A||^2, the residual,
                      and a verdict: exact (within the stored dtype's rounding), not_applied, applied_twice,
                      wrong_scale (sqrt(r), 1/sqrt(r), ... named), different_base, residual_unexplained;
                      every weight no adapter module adapts must be unchanged
                      a bitsandbytes 4-bit BASE is read de-quantised (the correct QLoRA merge is deq(W4) + s*B*A);
                      --qlora [nf4|fp4] with a 16-bit BASE (on by default when the adapter config names a 4-bit
                      base): each module is also checked against deq(Q(W16)) and the base the merge used is named
                      (a merge into W16 is different_base, reason merged_into_16bit: unsloth-zoo PR 810)
  engine mapping      --peft-dir ADAPTER --base-model BASE [--engine peft|vllm|llama.cpp]
                      every LoRA pair resolves to a base weight of the right shape under the engine's naming
  GGUF                --gguf FILE.gguf --peft-dir ADAPTER [--base-model BASE]
                      llama.cpp's alpha/rank * B*A of every pair equals PEFT's s*B*A (needs gradience[gguf])

--fail-on flags: not_exact (any module not exact / unmapped / an untouched weight changed), error (any error
issue), or a verdict name (not_applied, applied_twice, wrong_scale, different_base, residual_unexplained).

examples:
  gradience verify --merged ./merged --base-model ./llama-7b --peft-dir ./adapter --fail-on not_exact
  gradience verify --merged ./merged --base-model ./llama-7b --peft-dir ./qlora-adapter --qlora
  gradience verify --peft-dir ./adapter --base-model ./qwen2-vl --engine vllm
  gradience export --peft-dir ./adapter --to gguf --base-model ./llama-7b --out adapter.gguf
  gradience verify --gguf adapter.gguf --peft-dir ./adapter
"""

_VERDICT_FLAGS = ("not_applied", "applied_twice", "wrong_scale", "different_base", "residual_unexplained")


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "verify", help="prove what a merge or an engine applied (merged checkpoint, engine mapping, GGUF)",
        description="Verify a merged checkpoint against its base and adapter, an adapter's mapping onto a base "
                    "under an engine's naming, or a llama.cpp LoRA GGUF against the PEFT adapter.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peft-dir", metavar="ADAPTER", help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--adapter-name", metavar="N", help="which adapter of a multi-adapter directory")
    p.add_argument("--base-model", metavar="ID_OR_DIR", help="base model (local dir or hub id in the local HF cache)")
    p.add_argument("--merged", metavar="DIR", help="merged checkpoint directory to verify")
    p.add_argument("--gguf", metavar="FILE", help="llama.cpp LoRA GGUF to compare with the adapter")
    p.add_argument("--qlora", nargs="?", const="nf4", choices=("nf4", "fp4"), metavar="TYPE",
                   help="merged mode: the adapter was trained on a 4-bit base (nf4 default, or fp4): check the "
                        "merge against deq(Q(W16)) too and name the base it used")
    p.add_argument("--engine", default="peft", metavar="E",
                   help="mapping mode: peft (default), vllm or llama.cpp")
    p.add_argument("--json", action="store_true", help="print the gradience.verify/v1 document")
    p.add_argument("--fail-on", action="append", metavar="RULES",
                   help="exit 1 when met: not_exact, error, or a verdict name (see below)")
    add_common_flags(p)
    p.set_defaults(func=run)


def _met(doc: dict[str, Any], flag: str) -> list[str]:
    """Names that meet one --fail-on flag."""
    rows = doc["modules"]
    if flag == "not_exact":
        if doc["mode"] == "mapping":
            return [r["name"] for r in rows if r["status"] == "error"]
        met = [r["name"] for r in rows if r.get("verdict") != "exact"]
        return met + list(doc.get("unchanged", {}).get("changed", [])) + list(doc.get("extra_in_gguf", []))
    if flag == "error":
        return [i["code"] for i in doc["issues"] if i["severity"] == "error"]
    return [r["name"] for r in rows if r.get("verdict") == flag]


def _check_gates(specs: list[str] | None) -> list[str]:
    from gradience.errors import InputError
    from gradience.gates import parse_gates

    flags = []
    for gate in parse_gates(specs):
        if not gate.is_flag or gate.metric not in ("not_exact", "error", *_VERDICT_FLAGS):
            raise InputError(f"--fail-on: unknown rule '{gate.text}' (expected not_exact, error or one of "
                             f"{', '.join(_VERDICT_FLAGS)})")
        flags.append(gate.metric)
    return flags


def run(args: argparse.Namespace) -> int:
    from gradience import jsonio
    from gradience.adapter import load_adapter
    from gradience.errors import InputError
    from gradience.verify.render import render_text

    flags = _check_gates(args.fail_on)
    if not args.peft_dir:
        raise InputError("no adapter given: pass --peft-dir ADAPTER")
    if args.merged and args.gguf:
        raise InputError("--merged and --gguf are two different checks: pass one")
    loaded = load_adapter(args.peft_dir, adapter_name=args.adapter_name)
    if args.gguf:
        from gradience.verify import verify_gguf

        doc = verify_gguf(loaded, args.gguf, args.base_model)
    elif not args.base_model:
        raise InputError("no base model given: pass --base-model BASE (with --merged DIR to check a merged checkpoint)")
    elif args.merged:
        from gradience.verify import verify_merged

        doc = verify_merged(loaded, args.merged, args.base_model, qlora=args.qlora)
    else:
        from gradience.verify import verify_mapping

        doc = verify_mapping(loaded, args.base_model, args.engine)
    if args.json:
        sys.stdout.write(jsonio.dumps(doc, pretty=True) + "\n")
    else:
        sys.stdout.write(safe_text(render_text(doc), keep_newlines=True))
    hit = [(flag, names) for flag in flags if (names := _met(doc, flag))]
    for flag, names in hit:
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        print(f"gradience verify: fail-on met: {flag}: {safe_text(shown, max_len=500)}", file=sys.stderr)
    return 1 if hit else 0
