"""``gradience`` entry point: builds the parser from the command modules and maps errors to exit codes.

Exit codes (SPEC §10): 0 success, 1 a ``--fail-on`` gate was met, 2 usage or input error. Errors print one
line ``gradience <command>: error: ...`` on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from gradience._version import __version__

# Each module defines ``add_parser(subparsers)``; it must import nothing heavy at module level so that
# ``gradience --help`` and the light commands stay fast.
COMMAND_MODULES = ("check", "monitor", "audit", "compress", "merge", "compare", "report", "bench", "demo", "verify", "export")

EXIT_OK = 0
EXIT_GATE = 1
EXIT_INPUT = 2
MAX_ERROR_CHARS = 2000  # an error line quoting a 1 MB tensor name is shortened to this


def _limit_blas_threads() -> None:
    """Tiny r x r LAPACK calls are several times slower multi-threaded on small machines (SPEC §11);
    must run before numpy is first imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradience",
        description="Flight recorder and mechanic for LoRA / PEFT fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gradience.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _limit_blas_threads()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_INPUT
    prog = f"gradience {args.command}"
    debug = bool(getattr(args, "debug", False))
    from gradience.errors import GradienceError
    from gradience.textfmt import safe_text

    with contextlib.suppress(AttributeError, ValueError):  # a replaced stream without reconfigure()
        # Strings from input files can hold lone UTF-16 surrogates, which no encoding accepts: print them
        # escaped (\udc80) instead of failing with UnicodeEncodeError after half a report.
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]

    try:
        return int(args.func(args) or 0)
    except GradienceError as exc:
        if debug:
            raise
        # One line whatever the input held: names with newlines, escape sequences or lone surrogates are
        # shown escaped, and a megabyte-long name is shortened.
        print(f"{prog}: error: {safe_text(str(exc), max_len=MAX_ERROR_CHARS)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gradience ... | head`: the reader went away; not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    except Exception as exc:  # a bug in gradience: still one line, with a hint to get the traceback
        if debug:
            raise
        detail = safe_text(f"{type(exc).__name__}: {exc}", max_len=MAX_ERROR_CHARS)
        print(f"{prog}: error: internal error: {detail} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_INPUT


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command has."""
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
