"""Finding the adapter in a directory: the directory itself first, then below it, one depth at a time.

PEFT's ``save_pretrained`` with several adapters writes the ``default`` adapter at the top of the directory and
every other adapter into a subfolder named after it; training output directories hold one adapter per
``checkpoint-N/``. Discovery therefore never guesses between candidates at the same depth: it lists them and lets
the user choose (``adapter_name``), and it stops at a bounded depth and directory count so that pointing it at a
huge tree cannot hang.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from gradience.adapter.config import CONFIG_FILENAME
from gradience.errors import InputError
from gradience.io.textfile import is_dir, is_file, os_problem, probe
from gradience.issues import Issue

# In order of preference.
WEIGHT_FILENAMES = (
    "adapter_model.safetensors",
    "adapter_model.safetensors.index.json",
    "adapter_model.bin",
    "adapter_model.pt",
    "adapter_model.pth",
    "adapters.safetensors",  # MLX-LM (adapter/mlx.py)
)
SHARD_RE = re.compile(r"^adapter_model-\d+-of-\d+\.safetensors$")
DEFAULT_ADAPTER = "default"
MAX_SEARCH_DEPTH = 4
MAX_SEARCH_DIRS = 20_000
_LOOKED_FOR = "adapter_model.safetensors (or a sharded index, adapter_model.bin / .pt)"
_CHOICE_HINT = "choose one with --adapter-name NAME (or point --peft-dir at it), or audit each with --all"


def _listdir(directory: Path) -> list[str]:
    """Entry names of a directory; a directory that cannot be listed is an error naming it (a silent "no
    adapter found" would send the user looking in the wrong place)."""
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise InputError(f"cannot list directory: {os_problem(exc)}", directory) from None


def _shards(directory: Path) -> list[str]:
    return sorted(n for n in _listdir(directory) if SHARD_RE.match(n))


def holds_adapter(directory: Path) -> bool:
    """Whether ``directory`` itself holds adapter weights (in any supported layout)."""
    return any(is_file(directory / n) for n in WEIGHT_FILENAMES) or bool(_shards(directory))


def find_weights(directory: Path) -> Path | None:
    """The preferred weights file of ``directory`` (the index for sharded weights), None when there is none."""
    for name in WEIGHT_FILENAMES:
        path = directory / name
        if is_file(path):
            return path
    shards = _shards(directory)
    if shards:
        raise InputError(f"found sharded weights ({', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}) "
                         "but no adapter_model.safetensors.index.json to say which tensor is where", directory)
    return None


def existing_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    st = probe(p)
    if st is None:
        raise InputError("directory not found", p)
    if not stat.S_ISDIR(st.st_mode):
        # only `audit` has --weights: the hint names what every command (export, verify, merge, ...) accepts
        raise InputError("is a file, not a directory: pass the adapter's directory (the one holding "
                         "adapter_config.json and the weights file)", p)
    return p


def _subdirs(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise InputError(f"cannot list directory: {os_problem(exc)}", directory) from None
    out = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        try:
            if entry.is_dir():
                out.append(Path(entry.path))
        except OSError:
            continue
    return out


def adapters_below(root: Path) -> list[Path]:
    """Adapter directories at the shallowest depth (1..MAX_SEARCH_DEPTH) below ``root`` that has any."""
    frontier = [root]
    visited = 0
    for _depth in range(MAX_SEARCH_DEPTH):
        deeper: list[Path] = []
        for directory in frontier:
            for sub in _subdirs(directory):
                visited += 1
                if visited > MAX_SEARCH_DIRS:
                    raise InputError(f"more than {MAX_SEARCH_DIRS} directories below it; point --peft-dir at the "
                                     "adapter directory itself", root)
                deeper.append(sub)
        found = [d for d in deeper if holds_adapter(d)]
        if found:
            return found
        frontier = deeper
    return []


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def list_adapters(peft_dir: str | os.PathLike[str]) -> list[str]:
    """Names to pass as ``adapter_name``: ``[]`` when the directory holds one adapter and nothing else.

    In PEFT's multi-adapter layout the top-level adapter is listed as ``"default"`` followed by the subfolder
    names; without a top-level adapter, the relative paths of the adapters found at the shallowest depth.
    """
    root = existing_dir(peft_dir)
    if holds_adapter(root):
        subs = [_relative(d, root) for d in _subdirs(root) if holds_adapter(d)]
        return [DEFAULT_ADAPTER, *[s for s in subs if s != DEFAULT_ADAPTER]] if subs else []
    return [_relative(d, root) for d in adapters_below(root)]


def resolve_adapter_dir(peft_dir: str | os.PathLike[str], adapter_name: str | None = None
                        ) -> tuple[Path, str | None, list[Issue]]:
    """(directory holding the adapter, the adapter's name when one was chosen or found below, issues)."""
    root = existing_dir(peft_dir)
    if adapter_name is not None:
        pure = PurePosixPath(adapter_name.replace(os.sep, "/"))
        if not adapter_name or pure.is_absolute() or ".." in pure.parts:
            raise InputError(f"invalid adapter name {adapter_name!r}: give a subfolder name of the directory", root)
        if adapter_name == DEFAULT_ADAPTER and holds_adapter(root):
            return root, DEFAULT_ADAPTER, []
        candidate = root / pure
        if is_dir(candidate) and holds_adapter(candidate):
            return candidate, adapter_name, []
        available = list_adapters(root) or ([DEFAULT_ADAPTER] if holds_adapter(root) else [])
        raise InputError(f"no adapter named '{adapter_name}' here (available: "
                         f"{', '.join(available) if available else 'none'})", root)
    if holds_adapter(root):
        others = [_relative(d, root) for d in _subdirs(root) if holds_adapter(d)]
        issues = []
        if others:
            issues.append(Issue("other_adapters",
                                f"the directory also holds adapter(s) {', '.join(others)} in subfolders; the top-level "
                                "(default) adapter is used (select another with --adapter-name, or use --all)",
                                severity="info", extra={"adapters": others}))
        return root, None, issues
    found = adapters_below(root)
    if len(found) == 1:
        return found[0], _relative(found[0], root), []
    if found:
        names = [_relative(d, root) for d in found]
        raise InputError(f"found {len(names)} adapters below it: {', '.join(names)}; {_CHOICE_HINT}", root)
    if is_file(root / CONFIG_FILENAME):
        raise InputError(f"has {CONFIG_FILENAME} but no adapter weights (looked for {_LOOKED_FOR})", root)
    raise InputError(f"no PEFT adapter found: looked for {_LOOKED_FOR} with {CONFIG_FILENAME} in this directory "
                     f"and up to {MAX_SEARCH_DEPTH} levels below it", root)
