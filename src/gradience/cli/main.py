"""``gradience`` entry point: builds the parser from the command modules and maps errors to exit codes.

Exit codes (SPEC §10): 0 success, 1 a ``--fail-on`` gate was met, 2 usage or input error. Errors print one
line ``gradience <command>: error: ...`` on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gradience._version import __version__

# Each module defines ``add_parser(subparsers)``; it must import nothing heavy at module level so that
# ``gradience --help`` and the light commands stay fast.
COMMAND_MODULES = ("check", "monitor", "audit", "compress", "merge", "compare", "report", "bench", "demo", "verify", "export", "series")

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
    """argparse that reports usage errors as one line and exit 2, like every other input error.

    Abbreviated long flags are refused (``allow_abbrev=False``): with prefix matching, ``--smok`` would run a
    bench and a flag added later could silently change what an old abbreviation means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line, escaped: argv can hold newlines or terminal escape sequences."""
        from gradience.textfmt import safe_text

        self.exit(EXIT_INPUT, f"{self.prog}: error: {safe_text(message, max_len=MAX_ERROR_CHARS)}\n")

    def unknown_arguments(self, extras: Sequence[str]) -> NoReturn:
        """``unrecognized arguments`` from the parser of the command itself (so the line starts with
        ``gradience <command>: error:``), with the closest known flag for each misspelled one."""
        import difflib

        known = [opt for opt in self._option_string_actions if opt.startswith("--")]
        flags = [tok.split("=", 1)[0] for tok in extras if tok.startswith("-") and len(tok) > 1]
        hints = []
        for flag in flags:
            if flag in known:  # a flag of this command given before the command's name
                hints.append(f"{flag} goes after the command name")
                continue
            close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?" if len(flags) == 1 else f"{flag}: did you mean {close[0]}?")
        self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


EPILOG = """examples:
  gradience demo                                    # the golden path on a built-in toy run, offline
  gradience audit runs/toy/peft --top-wasteful 10   # wasted rank and UDR of an adapter
  gradience monitor runs/toy/run.jsonl --verbose    # the story of a run
  gradience COMMAND --help                          # flags and examples of one command
"""


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command argv names, if any: the top-level parser has no option that takes a value, so it is the
    first token that is not an option."""
    first = next((tok for tok in argv if not tok.startswith("-")), None)
    return first if first in COMMAND_MODULES else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``gradience`` parser; with ``command`` only that command's module is imported and its parser built
    (start-up time of every run, SPEC §11); without, all of them (``gradience --help`` lists every command)."""
    parser = _Parser(
        prog="gradience",
        description="Flight recorder and mechanic for LoRA / PEFT fine-tuning.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gradience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES if command is None else (command,):
        module = importlib.import_module(f"gradience.cli.{name}")
        module.add_parser(sub)
    return parser


def _parse(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser(_chosen_command(argv))
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = getattr(args, "command", None)
        subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = subparsers.choices.get(command) if subparsers is not None and command else None
        reporter = chosen if isinstance(chosen, _Parser) else parser
        assert isinstance(reporter, _Parser)
        reporter.unknown_arguments(extras)
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    _limit_blas_threads()
    parser, args = _parse(list(sys.argv[1:] if argv is None else argv))
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

    # --json: what the command prints is held back and written only when it succeeds, so on an error stdout
    # gets nothing at all (never a partial document; `> out.json` then holds nothing rather than broken JSON).
    # --follow streams on purpose and is left alone.
    held = io.StringIO() if getattr(args, "json", False) and not getattr(args, "follow", False) else None
    real_stdout = sys.stdout
    try:
        if held is None:
            return int(args.func(args) or 0)
        sys.stdout = held
        try:
            rc = int(args.func(args) or 0)
        finally:
            sys.stdout = real_stdout
        real_stdout.write(held.getvalue())
        real_stdout.flush()
        return rc
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
