"""Reading config files (JSON or YAML, safely) and finding them in directories (SPEC §2 discovery)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from gradience.config.normalize import ConfigForm, detect_form, unwrap
from gradience.errors import InputError
from gradience.io.textfile import is_dir, is_file, read_text_limited
from gradience.jsonio import json_problem

# A training/LoRA config is a few KiB; anything this large is not one, and reading it would only waste memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# How deep below a directory discovery looks (runs/<name>/<checkpoint>/<adapter> is 3 deep).
MAX_DISCOVERY_DEPTH = 4
# A LoRA/training config uses no aliases or a handful; nesting is a few levels (see ``_yaml_loader``).
MAX_YAML_ALIASES = 1000
MAX_YAML_DEPTH = 100
MAX_YAML_NODES = 1_000_000

CONFIG_FILENAMES: dict[str, str] = {"peft": "adapter_config.json", "training": "training_args.json"}
_PICKLED_TWINS: dict[str, str] = {"training": "training_args.bin"}
_YAML_SUFFIXES = frozenset({".yaml", ".yml"})


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode a JSON or YAML file into a mapping; every failure is one InputError naming the file."""
    p = Path(path)
    if is_dir(p):
        raise InputError("is a directory, expected a JSON or YAML config file "
                         "(for directories use --peft-dir / --training-dir)", p)
    text = read_text_limited(p, what="config file", max_bytes=MAX_CONFIG_BYTES, missing="no such file")
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
        except ValueError as exc:  # integers beyond Python's digit limit
            raise InputError(f"unusable JSON: {str(exc).splitlines()[0][:200]}", p) from None
        else:
            deep = json_problem(data)  # the shared depth bound (gradience.jsonio): normalisation recurses
            if deep is not None:
                raise InputError(f"unusable JSON: {deep}", p)
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping of keys to values at the top level, got {type(data).__name__}", p)
    return data


def _yaml_loader() -> type:
    """``yaml.SafeLoader`` (never constructs Python objects) that also refuses alias bombs.

    A few hundred bytes of nested aliases (``&a [*a, *a, ...]``, "billion laughs") describe a tree with
    billions of leaves: safe_load builds it as shared references in no time, but anything that walks it
    (normalization, JSON output) hangs. The composer counts alias uses and the loader caps nesting, so such
    a document is refused while it is being read.
    """
    import yaml  # core dependency; imported here to keep `import gradience` cheap

    class BoundedSafeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._aliases = 0
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    event = self.peek_event()
                    raise yaml.composer.ComposerError(
                        None, None, f"more than {MAX_YAML_ALIASES} aliases (an alias bomb?)", event.start_mark)
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    event = self.peek_event()
                    raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels",
                                                      event.start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def compose_document(self) -> Any:
            node = super().compose_document()
            sizes: dict[int, int] = {}
            active: set[int] = set()

            def expanded(n: Any) -> int:
                """Size of the tree ``n`` stands for once every alias is expanded (memoized: linear time)."""
                key = id(n)
                if key in sizes:
                    return sizes[key]
                if key in active:
                    raise yaml.composer.ComposerError(None, None, "a recursive alias (a structure containing "
                                                                  "itself)", n.start_mark)
                active.add(key)
                total = 1
                if isinstance(n, yaml.SequenceNode):
                    total += sum(expanded(child) for child in n.value)
                elif isinstance(n, yaml.MappingNode):
                    total += sum(expanded(k) + expanded(v) for k, v in n.value)
                active.discard(key)
                sizes[key] = total
                if total > MAX_YAML_NODES:
                    raise yaml.composer.ComposerError(None, None, f"aliases expand it to more than {MAX_YAML_NODES} "
                                                                  "values (an alias bomb?)", n.start_mark)
                return total

            if node is not None:
                expanded(node)
            return node

    return BoundedSafeLoader


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml  # core dependency; imported here to keep `import gradience` cheap

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: never builds objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"invalid YAML{where}: {problem}", path) from None
    except RecursionError:
        raise InputError("YAML nested too deeply", path) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise InputError(f"unusable YAML: {str(exc).splitlines()[0][:200]}", path) from None
    return data


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
    if is_file(root):
        return root
    if not is_dir(root):
        raise InputError("no such directory", root)
    level = [root]
    for _depth in range(MAX_DISCOVERY_DEPTH + 1):
        matches = sorted(d / filename for d in level if is_file(d / filename))
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
    if twin and is_file(root / twin):
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
