"""``gradience audit``: wasted rank and update size of a trained LoRA adapter (SPEC §3.4).

Thin layer: parses flags, calls :mod:`gradience.audit` and renders. Imports nothing heavy at module level;
the audit itself needs numpy only (never torch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradience.cli.main import add_common_flags

FAIL_ON_HELP = (
    "CI gate rules, comma-separated (exit 1 when one is met, each met rule printed on stderr). "
    "A per-layer metric (utilization, stable_rank, effective_rank, energy_rank_90/95/99, delta_sigma_max, "
    "delta_frob_norm, udr, udr_f, sdi, ...) is met when ANY layer satisfies it, e.g. 'utilization<0.25', "
    "'udr>1.0'; a numeric summary key (utilization_mean, stable_rank_mean, energy_rank_90_p90, udr_median, "
    "...) compares the summary value, e.g. 'utilization_mean<0.2'; flags: zero_update, non_finite, "
    "issues (any warning or error issue), error. Unknown metrics are a usage error (exit 2)."
)


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "audit", help="analyze a LoRA adapter for wasted rank and update size (UDR)",
        description="Audit a PEFT LoRA adapter: exact per-layer spectra from the factors, utilization, "
                    "energy ranks, rank suggestions and, with a base model, UDR/SDI (Update Dominance Ratio, Spectral "
                    "Drift Index; a base saved beside the "
                    "adapter, as runs/toy/base is beside runs/toy/peft, is used without --base-model).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gradience audit runs/toy/peft --top-wasteful 10\n"
               "  gradience audit --peft-dir out/adapter --suggest-per-layer --emit-config lora_suggested.yaml\n"
               "  gradience audit --peft-dir out/adapter --base-model meta-llama/Llama-2-7b-hf --json "
               "--fail-on 'udr_median>0.3'")
    p.add_argument("adapter", nargs="?", metavar="ADAPTER_DIR",
                   help="PEFT adapter directory (the same as --peft-dir DIR)")
    p.add_argument("--peft-dir", metavar="DIR", help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--adapter-config", metavar="F", help="adapter_config.json path (overrides discovery)")
    p.add_argument("--weights", metavar="F", help="adapter weights file (.safetensors, index, or .bin/.pt)")
    p.add_argument("--adapter-name", metavar="N", help="which adapter of a multi-adapter directory")
    p.add_argument("--all", action="store_true", help="audit every adapter of a multi-adapter directory")
    p.add_argument("--json", action="store_true", help="print the gradience.audit/v1 JSON summary")
    p.add_argument("--top-wasteful", type=int, metavar="N",
                   help="list the N layers of lowest utilization (text default: 5; JSON key top_wasteful)")
    p.add_argument("--top-singular-values", type=int, metavar="K",
                   help="keep only the top K singular values per layer in JSON (default: all)")
    p.add_argument("--layers", action="store_true", help="print every layer (text); all σ in JSON")
    p.add_argument("--suggest-per-layer", action="store_true",
                   help="per-layer rank suggestions as an applicable rank_pattern/alpha_pattern")
    p.add_argument("--emit-config", metavar="F",
                   help="write the per-layer suggestion as a PEFT LoraConfig fragment (r, lora_alpha, use_rslora, "
                        "target_modules, rank_pattern, alpha_pattern) to F: JSON for .json, YAML for .yaml/.yml "
                        "(implies --suggest-per-layer)")
    p.add_argument("--margin", type=float, default=None, metavar="M",
                   help="per-layer suggestion: allowed rank >= M x k@90%% (energy rank: directions holding 90%% "
                        "of the update energy; default 1.0)")
    p.add_argument("--allowed-ranks", metavar="LIST", help="ranks suggestions may use (default 1,2,4,...,256)")
    p.add_argument("--append", metavar="RUN.jsonl",
                   help="append the summary (without layers) as a lora_audit metrics event to a telemetry log")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base model (local dir or hub id in the local HF cache) for UDR/SDI (default: the base "
                        "saved beside the adapter as ../base, else the adapter's base_model_name_or_path when it "
                        "resolves locally); one that does not resolve leaves UDR 'not computed' with a warning "
                        "issue unless --require-udr")
    p.add_argument("--require-udr", action="store_true",
                   help="exit 2 when UDR/SDI cannot be computed (no base, or the base does not resolve)")
    p.add_argument("--base-norms-cache", metavar="F", help="cache file for base-weight norms")
    p.add_argument("--no-udr", action="store_true",
                   help="do not try the adapter's own base_model_name_or_path for UDR")
    p.add_argument("--qlora", action="store_true",
                   help="the adapter was trained on a 4-bit (QLoRA) version of the 16-bit --base-model: report per "
                        "layer the residual a merge into the 16-bit weights adds, ‖W16 - deq(Q(W16))‖ / ‖s·B·A‖, "
                        "and which base to merge into (automatic when the config's base name says bnb-4bit)")
    p.add_argument("--fail-on", action="append", metavar="RULES", help=FAIL_ON_HELP)
    # Intruder dimensions (issue 23; Shuttleworth et al. 2025, PEFT reduce_intruder_dimension).
    p.add_argument("--intruders", action="store_true",
                   help="per layer, the top-k singular vectors of W + dW whose best |cos| against every singular "
                        "vector of the base W is below eps (intruder dimensions); needs the base model")
    p.add_argument("--intruder-k", type=int, default=None, metavar="K",
                   help="--intruders: how many top singular vectors of W + dW are checked (default 10)")
    p.add_argument("--intruder-eps", type=float, default=None, metavar="EPS",
                   help="--intruders: |cos| threshold (default 0.5)")
    p.add_argument("--intruder-cache", metavar="DIR", help="--intruders: cache directory for base partial spectra")
    p.add_argument("--device", default=None, choices=("auto", "numpy", "cpu", "cuda"),
                   help="--intruders: where W's products run (auto: torch on the CPU when installed, else numpy)")
    add_common_flags(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> Any:
    from gradience.audit import AuditOptions
    from gradience.audit.suggest import parse_allowed_ranks
    from gradience.errors import InputError
    from gradience.policy.thresholds import ALLOWED_RANKS_DEFAULT, SUGGEST_MARGIN_DEFAULT

    if args.top_wasteful is not None and args.top_wasteful < 0:
        raise InputError("--top-wasteful must be >= 0")
    if args.top_singular_values is not None and args.top_singular_values < 1:
        raise InputError("--top-singular-values must be >= 1")
    margin = SUGGEST_MARGIN_DEFAULT if args.margin is None else args.margin
    if not margin > 0 or margin == float("inf"):
        raise InputError(f"--margin must be a positive number, got {args.margin}")
    return AuditOptions(
        top_wasteful=args.top_wasteful,
        top_singular_values=None if args.layers else args.top_singular_values,
        suggest_per_layer=args.suggest_per_layer or bool(args.emit_config),
        margin=margin,
        allowed_ranks=parse_allowed_ranks(args.allowed_ranks) if args.allowed_ranks else ALLOWED_RANKS_DEFAULT,
        udr=bool(args.base_model) or not args.no_udr,
        base_model=args.base_model,
        base_norms_cache=args.base_norms_cache,
        progress=sys.stderr.isatty(),
        base_required=bool(args.require_udr),
        intruders=_intruder_options(args),
        qlora=bool(getattr(args, "qlora", False)),
    )


def _intruder_options(args: argparse.Namespace) -> Any:
    """IntruderOptions with --intruders (checked before any work), None without; its flags alone are an error."""
    from gradience.errors import InputError

    given = [flag for flag, value in (("--intruder-k", args.intruder_k), ("--intruder-eps", args.intruder_eps),
                                      ("--intruder-cache", args.intruder_cache), ("--device", args.device))
             if value is not None]
    if not args.intruders:
        if given:
            raise InputError(f"{given[0]} needs --intruders")
        return None
    if args.intruder_cache is not None:
        import os

        # A file (or a loop) where the cache directory should be: one line now, not one warning per layer later.
        if os.path.lexists(args.intruder_cache) and not os.path.isdir(args.intruder_cache):
            raise InputError("--intruder-cache must be a directory (it is created when missing); this path "
                             "exists and is not one", args.intruder_cache)
    from gradience.intruders import IntruderOptions
    from gradience.policy.thresholds import INTRUDER_EPS, INTRUDER_TOP_K

    opts = IntruderOptions(k=INTRUDER_TOP_K if args.intruder_k is None else args.intruder_k,
                           eps=INTRUDER_EPS if args.intruder_eps is None else args.intruder_eps,
                           device=args.device or "auto", cache_dir=args.intruder_cache)
    opts.validate()
    return opts


def _load_all(args: argparse.Namespace) -> list[Any]:
    """The adapters to audit: one, the named one, or each of a multi-adapter directory with --all."""
    from gradience.adapter import list_adapters, load_adapter
    from gradience.errors import InputError

    if args.adapter is not None:
        if args.peft_dir is not None and args.peft_dir != args.adapter:
            raise InputError(f"two adapters given: {args.adapter} and --peft-dir {args.peft_dir}; pass one")
        args.peft_dir = args.adapter
    if not (args.peft_dir or args.weights or args.adapter_config):
        raise InputError("no adapter given: pass the adapter directory (gradience audit DIR, or --peft-dir DIR; "
                         "or --weights F / --adapter-config F)")
    explicit = {"adapter_config": args.adapter_config, "weights": args.weights}
    if args.adapter_name:
        return [load_adapter(args.peft_dir, adapter_name=args.adapter_name, **explicit)]
    names = list_adapters(args.peft_dir) if args.peft_dir and not args.weights else []
    if len(names) > 1:
        if not args.all:
            raise InputError(f"several adapters found ({', '.join(names)}); choose one with --adapter-name "
                             "or audit each with --all", args.peft_dir)
        return [load_adapter(args.peft_dir, adapter_name=name) for name in names]
    return [load_adapter(args.peft_dir, **explicit)]


def run(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        # Third-party warnings (e.g. torch's weights_only unpickler on a refused .bin) would break the
        # one-line error contract; everything we need to say is an issue or an InputError. --debug shows them.
        if not args.debug:
            warnings.simplefilter("ignore")
        return _run(args)


def safe_text_line(text: str) -> str:
    from gradience.textfmt import safe_text

    return safe_text(text)


def _run(args: argparse.Namespace) -> int:
    from gradience.audit import MULTI_SCHEMA, run_audit
    from gradience.audit.core import default_top_wasteful

    # Gates, the text renderer and the YAML/JSON writers are imported only by the runs that use them
    # (a plain `--json` run pays for none of them: SPEC §11 whole-process time).
    gates: list[Any] = []
    if args.fail_on:
        from gradience.audit.gates import evaluate_gates, validate_gates
        from gradience.gates import parse_gates

        gates = parse_gates(args.fail_on)
    options = _options(args)
    emit_format = _emit_format(args)
    if args.append:  # refuse a path --append cannot extend before doing the work
        from gradience.telemetry.writer import check_appendable

        check_appendable(args.append)
    results = [run_audit(loaded, options) for loaded in _load_all(args)]
    summaries = [result.to_summary(include_layers=True) for result in results]
    udr_disabled = bool(args.no_udr and not args.base_model)
    _check_udr(args, summaries)
    if gates:
        for summary in summaries:
            validate_gates(gates, summary, udr_disabled=udr_disabled)

    multi = bool(args.all)  # --all always gives the multi-adapter JSON, so scripts see one shape
    if args.json:
        if multi:
            doc: Any = {"schema": MULTI_SCHEMA,
                        "adapters": {s["adapter_name"] or "default": s for s in summaries}}
        else:
            doc = summaries[0]
        from gradience.audit.jsonout import dumps_json

        sys.stdout.write(dumps_json(doc) + "\n")
    else:
        from gradience.audit.render import render_text

        blocks = [render_text(s, top_wasteful=default_top_wasteful(options), show_layers=args.layers)
                  for s in summaries]
        from gradience.textfmt import safe_text

        sys.stdout.write(safe_text("\n".join(blocks), keep_newlines=True))  # names from the file, escaped

    if args.emit_config:
        _emit_config(args.emit_config, emit_format, summaries[0])

    if args.append:
        from gradience.telemetry import append_metrics_event

        for summary in summaries:
            metrics = {k: v for k, v in summary.items() if k != "layers"}
            append_metrics_event(args.append, "lora_audit", metrics)

    met: list[str] = []
    for summary in summaries if gates else ():
        prefix = f"[{summary['adapter_name']}] " if multi and summary.get("adapter_name") else ""
        met += [prefix + msg for msg in evaluate_gates(gates, summary, udr_disabled=udr_disabled)]
    for msg in met:
        print(f"gradience audit: fail-on met: {safe_text_line(msg)}", file=sys.stderr)
    return 1 if met else 0


def _check_udr(args: argparse.Namespace, summaries: list[dict[str, Any]]) -> None:
    """--require-udr: exit 2 (before anything is printed) when a summary has no UDR. Without it, an explicit
    --base-model that did not resolve is said once on stderr; the output carries it as an issue."""
    from gradience.errors import InputError

    for summary in summaries:
        unresolved = [i for i in summary.get("issues") or [] if i.get("code") == "base_model_unresolved"]
        if args.require_udr and not summary.get("n_layers_with_udr"):
            if args.no_udr and not args.base_model:
                raise InputError("--require-udr and --no-udr contradict each other")
            why = unresolved[0]["message"] if unresolved else "no layer got a UDR value (see the issues)"
            raise InputError(f"--require-udr: {why}")
        if args.base_model and unresolved:
            print(f"gradience audit: warning: {safe_text_line(unresolved[0]['message'])}", file=sys.stderr)


def _emit_format(args: argparse.Namespace) -> str | None:
    """'json' or 'yaml' for --emit-config (checked before any work), None without it."""
    import os

    from gradience.errors import InputError

    if not args.emit_config:
        return None
    if args.all:
        raise InputError("--emit-config writes one adapter's config: use it with --adapter-name, not --all")
    ext = os.path.splitext(args.emit_config)[1].lower()
    formats = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}
    if ext not in formats:
        raise InputError("--emit-config: the file name must end in .json, .yaml or .yml", args.emit_config)
    parent = os.path.dirname(os.path.abspath(args.emit_config))
    if not os.path.isdir(parent):
        raise InputError("--emit-config: the directory does not exist", parent)
    return formats[ext]


def _emit_config(path: str, fmt: str | None, summary: dict[str, Any]) -> None:
    from gradience.audit.suggest import lora_config_fragment
    from gradience.errors import InputError
    from gradience.jsonio import atomic_write_text, dumps

    fragment = lora_config_fragment(summary)
    if fmt == "yaml":
        import yaml

        text = ("# LoraConfig fragment from gradience audit --suggest-per-layer (keeps every module's scale)\n"
                + yaml.safe_dump(fragment, sort_keys=False, allow_unicode=True))
    else:
        text = dumps(fragment, pretty=True) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise InputError(f"--emit-config: cannot write ({exc.strerror or exc})", path) from None
    print(f"gradience audit: wrote LoraConfig fragment to {path}", file=sys.stderr)
