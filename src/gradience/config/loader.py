"""Reading config files (JSON or YAML, safely) and finding them in directories (SPEC §2 discovery)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from gradience.config.normalize import ConfigForm, detect_form, unwrap
from gradience.errors import InputError

# A training/LoRA config is a few KiB; anything this large is not one, and reading it would only waste memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# How deep below a directory discovery looks (runs/<name>/<checkpoint>/<adapter> is 3 deep).
MAX_DISCOVERY_DEPTH = 4

CONFIG_FILENAMES: dict[str, str] = {"peft": "adapter_config.json", "training": "training_args.json"}
_PICKLED_TWINS: dict[str, str] = {"training": "training_args.bin"}
_YAML_SUFFIXES = frozenset({".yaml", ".yml"})


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode a JSON or YAML file into a mapping; every failure is one InputError naming the file."""
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError("is a directory, expected a JSON or YAML config file "
                             "(for directories use --peft-dir / --training-dir)", p)
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"file is {size} bytes; a config file is expected to be under "
                             f"{MAX_CONFIG_BYTES // (1024 * 1024)} MiB", p)
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file", p) from None
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", p) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start}); expected a JSON or YAML config", p) from None
    if not text.strip():
        raise InputError("file is empty; expected a JSON or YAML mapping", p)

    data: Any
    if p.suffix.lower() in _YAML_SUFFIXES:
        data = _parse_yaml(text, p)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if p.suffix.lower() == ".json":
                raise InputError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", p) from None
            data = _parse_yaml(text, p)  # no telling suffix: YAML is the other accepted format
        except RecursionError:
            raise InputError("JSON nested too deeply", p) from None
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping of keys to values at the top level, got {type(data).__name__}", p)
    return data


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml  # core dependency; imported here to keep `import gradience` cheap

    try:
        return yaml.safe_load(text)  # safe_load only: never construct arbitrary Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"invalid YAML{where}: {problem}", path) from None
    except RecursionError:
        raise InputError("YAML nested too deeply", path) from None


def load_config_file(path: str | os.PathLike[str]) -> tuple[ConfigForm, dict[str, Any]]:
    """Read a config file; return (detected form: canonical|flat|peft|training_args, decoded data)."""
    data = read_mapping(path)
    return detect_form(unwrap(data)), data


def find_config_in_dir(path: str | os.PathLike[str], kind: Literal["peft", "training"]) -> Path:
    """The ``adapter_config.json`` (kind "peft") or ``training_args.json`` (kind "training") for a directory:
    the directory itself first, then below it level by level; exactly one match at the shallowest level
    is used, several are an error listing them, none is an error saying what was looked for.
    A path that is a file is returned as is."""
    if kind not in CONFIG_FILENAMES:
        raise ValueError(f"kind must be one of {sorted(CONFIG_FILENAMES)}, got {kind!r}")
    filename = CONFIG_FILENAMES[kind]
    root = Path(path)
    if root.is_file():
        return root
    if not root.is_dir():
        raise InputError("no such directory", root)
    level = [root]
    for _depth in range(MAX_DISCOVERY_DEPTH + 1):
        matches = sorted(d / filename for d in level if (d / filename).is_file())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(str(m.relative_to(root)) for m in matches)
            raise InputError(f"found several {filename} at the same depth ({listed}); "
                             "pass the one to use", root)
        level = [child for d in level for child in _subdirs(d)]
        if not level:
            break
    twin = _PICKLED_TWINS.get(kind)
    if twin and (root / twin).is_file():
        raise InputError(f"found {twin} but no {filename}: {twin} is a pickle, which gradience never loads; "
                         f"write {filename} with TrainingArguments.to_json_string()", root)
    raise InputError(f"no {filename} found in this directory or up to {MAX_DISCOVERY_DEPTH} levels below it",
                     root)


def _subdirs(directory: Path) -> list[Path]:
    """Child directories, sorted, skipping hidden ones and symlinked ones (no cycles)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_dir() and not e.is_symlink() and not e.name.startswith(".")]
