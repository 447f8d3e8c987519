"""``python -m gradience.bench.run_bench --config F --output D``: the reference tool's bench command line.

Users of johntnanney/gradience run their bench this way (its README and CI); the same flags work here and
run ``gradience bench`` (``--output`` is ``--output-dir``). Its ``--keep-artifacts`` (always on there too),
``--clean-on-pass`` (not implemented there either) and ``--verbose`` are accepted. ``--device mps`` is not
a bench device here and is refused with the choices.

Importing this module keeps ``from gradience.bench import run_bench`` callable: the package's lazy
function and this module share the name, so the module object forwards calls to the library function.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_FLAGS_WITH_VALUE = {"--config": "--config", "--output": "--output-dir", "--output-dir": "--output-dir",
                     "--device": "--device", "--seeds": "--seeds", "--arms": "--arms",
                     "--base-model": "--base-model", "--base-norms-cache": "--base-norms-cache"}
_SWITCHES = {"--smoke": "--smoke", "--ci": "--ci", "--resume": "--resume", "--json": "--json"}
_ACCEPTED_NO_EFFECT = ("--keep-artifacts", "--verbose", "-v")


def translate_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The reference's flags as ``gradience bench`` arguments; returns (arguments, warnings)."""
    out: list[str] = ["bench"]
    notes: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _FLAGS_WITH_VALUE:
            out.append(_FLAGS_WITH_VALUE[name])
            if eq:
                out.append(value)
            elif i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        elif arg in _SWITCHES:
            out.append(_SWITCHES[arg])
        elif arg in _ACCEPTED_NO_EFFECT:
            pass  # artifacts are always kept; progress is always printed
        elif arg == "--clean-on-pass":
            notes.append("--clean-on-pass is not implemented (as in the reference tool); artifacts are kept")
        else:
            out.append(arg)  # help, unknown flags: gradience bench answers them
        i += 1
    return out, notes


def main(argv: list[str] | None = None) -> int:
    from gradience.cli.main import main as cli_main

    args, notes = translate_argv(list(sys.argv[1:] if argv is None else argv))
    for note in notes:
        print(f"gradience bench: warning: {note}", file=sys.stderr)
    return cli_main(args)


class _CallableModule(types.ModuleType):
    """``gradience.bench.run_bench(cfg, out)`` keeps working once this module has been imported."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from gradience.bench.runner import run_bench as _run

        return _run(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
