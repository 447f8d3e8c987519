"""Error types shared by every command.

``InputError`` is what the CLI turns into one line on stderr and exit code 2: the input was missing,
unreadable or malformed. Library code raises it with the offending path so the message always names
the file.
"""

from __future__ import annotations

import os


class GradienceError(Exception):
    """Base class for errors Gradience reports to users (never a bug in Gradience itself)."""


class InputError(GradienceError):
    """A user-supplied input (file, directory, flag value) cannot be used.

    ``str(err)`` is ``"<path>: <problem>"`` when a path is known, else just the problem.
    """

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class MissingDependencyError(GradienceError):
    """An optional dependency (an extra) is needed for this operation but not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        # The hint installs THIS project from its checkout: a different, unrelated package of the same name
        # exists on PyPI, so installing the extra by distribution name would fetch the wrong project.
        super().__init__(
            f"{purpose} needs '{package}' (the gradience[{extra}] extra), which is not installed; "
            f"install it from the Gradience checkout with: pip install -e \".[{extra}]\" -c constraints.txt "
            "(the PyPI package named 'gradience' is another project)"
        )
