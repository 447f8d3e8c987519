"""``gradience export --to gguf``: a llama.cpp LoRA GGUF that computes PEFT's ΔW for every module (issue 20).

Thin layer over :mod:`gradience.export.gguf` (needs the ``gguf`` extra); imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from gradience.cli.main import add_common_flags
from gradience.textfmt import safe_text

EPILOG = """\
Each module's own PEFT scale (alpha/r, alpha/sqrt(r) with rsLoRA, alpha_pattern, rank_pattern) is baked into
its lora_b so that llama.cpp's one adapter.lora.alpha / rank reproduces PEFT's delta W; llama.cpp's own
convert_lora_to_gguf.py writes the config's lora_alpha and copies the factors, which is wrong for rsLoRA and
alpha_pattern adapters. modules_to_save and DoRA adapters are refused (merge into the base instead).

examples:
  gradience export --peft-dir ./adapter --to gguf --base-model ./llama-7b --out adapter.gguf
  gradience verify --gguf adapter.gguf --peft-dir ./adapter --base-model ./llama-7b
  llama-cli -m llama-7b.gguf --lora adapter.gguf ...
"""


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export", help="write an adapter for another engine (llama.cpp GGUF LoRA)",
        description="Export a PEFT LoRA adapter to a llama.cpp LoRA GGUF whose delta W equals PEFT's.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peft-dir", metavar="ADAPTER", help="PEFT adapter directory")
    p.add_argument("--adapter-name", metavar="N", help="which adapter of a multi-adapter directory")
    p.add_argument("--to", choices=("gguf",), default=None, help="output format (gguf)")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base model directory (config.json for the architecture and head counts, weight names)")
    p.add_argument("--out", metavar="FILE", help="the .gguf file to write")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16"), default="f32", help="factor dtype (default f32)")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.add_argument("--json", action="store_true", help="print the gradience.export/v1 summary")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradience import jsonio
    from gradience.adapter import load_adapter
    from gradience.errors import InputError

    if args.to is None:
        raise InputError("no output format given: pass --to gguf")
    missing = [flag for flag, value in (("--peft-dir", args.peft_dir), ("--base-model", args.base_model),
                                        ("--out", args.out)) if not value]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: export needs --peft-dir, --base-model and --out")
    from gradience.export.gguf import export_gguf, import_gguf

    import_gguf("gradience export --to gguf")  # before reading anything: the missing extra is the first error
    if args.adapter_name is None:
        from gradience.adapter import list_adapters

        names = list_adapters(args.peft_dir)
        if len(names) > 1:  # as audit: a file for the wrong adapter of the directory is worse than asking
            raise InputError(f"several adapters found ({', '.join(names)}); choose one with --adapter-name",
                             args.peft_dir)
    loaded = load_adapter(args.peft_dir, adapter_name=args.adapter_name)
    doc = export_gguf(loaded, args.base_model, args.out, outtype=args.outtype, force=args.force)
    if args.json:
        sys.stdout.write(jsonio.dumps(doc, pretty=True) + "\n")
    else:
        rescaled = doc["rescaled_modules"]
        sys.stdout.write(safe_text(
            f"wrote {doc['out']}: {doc['tensors']} tensors ({doc['architecture']}, {doc['outtype']}), "
            f"adapter.lora.alpha = {doc['lora_alpha']:g}; {rescaled} of {len(doc['modules'])} module(s) had their "
            "PEFT scale baked into lora_b\n"
            f"check it: gradience verify --gguf {shlex.quote(doc['out'])} --peft-dir {shlex.quote(args.peft_dir)} "
            f"--base-model {shlex.quote(args.base_model)}"
            + (f" --adapter-name {shlex.quote(args.adapter_name)}" if args.adapter_name else "") + "\n",
            keep_newlines=True))
    return 0
