"""The bench's output directory: what may be reused, what may be deleted (issue 17 item 6).

Why its own module: a bench directory, or a config, may come from someone else. Nothing outside OUT is ever
read, written or deleted because of what is inside it: symbolic links below OUT are refused (never followed,
never removed through), the state file is read bounded, and a config's ``audit.base_norms_cache`` must lie
inside OUT unless the user named it on the command line. Every refusal says how to start over, and only
suggests deleting a directory that holds a bench.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

from gradience.bench.config import BenchConfig
from gradience.bench.results import has_symlink
from gradience.errors import GradienceError, InputError
from gradience.jsonio import atomic_write_text, dumps

STATE_FILE = "bench_config.json"
_MAX_STATE_BYTES = 1 << 20


def start_over(out: Path) -> str:
    return f"to start over, delete it (rm -r {shlex.quote(str(out))}) or choose another --output-dir"


def prepare_output_dir(out: Path, cfg: BenchConfig, resume: bool) -> BenchConfig:
    """OUT is new, empty, or (with ``resume``) holds a bench started with the same config; returns ``cfg``
    with a config-relative norms cache resolved inside OUT. Writes the state file for a new bench."""
    from gradience.io.textfile import probe, read_json_file

    state = out / STATE_FILE
    st = probe(out)
    if st is not None and not out.is_dir():
        raise InputError("output path exists and is not a directory", path=out)
    cfg = resolve_norms_cache(out, cfg)
    resolved = dumps(cfg.to_dict())
    if probe(state) is not None or state.is_symlink():
        if not resume:
            raise InputError(f"holds an earlier bench; pass --resume to continue it, or {start_over(out)}", path=out)
        try:
            if state.is_symlink():
                raise InputError(f"{STATE_FILE} is a symbolic link (a bench reads only its own files)")
            previous = read_json_file(state, what="bench state", max_bytes=_MAX_STATE_BYTES)
        except GradienceError as exc:
            raise InputError(f"cannot resume: {exc}; {start_over(out)}", path=out) from None
        if previous != json.loads(resolved):
            raise InputError("the config differs from the one this bench was started with; --resume needs "
                             f"the same config, or {start_over(out)}", path=state)
        for child in out.iterdir():
            if (child.name.startswith("seed_") or child.name == "base") and child.is_symlink():
                raise InputError(f"{child.name} is a symbolic link; a bench directory holds its own base and seed "
                                 f"directories (nothing outside it is read or deleted): {start_over(out)}", path=out)
        return cfg
    if st is not None and any(out.iterdir()):
        if any(c.name.startswith("seed_") or c.name in ("base", "bench.json") for c in out.iterdir()):
            raise InputError(f"holds an earlier bench that never wrote its state (a failed start?); {start_over(out)}",
                             path=out)
        # not a bench of ours: never suggest deleting it
        raise InputError("output directory is not empty and holds no bench; choose an empty or new --output-dir",
                         path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory: {exc.strerror or exc}", path=out) from None
    atomic_write_text(state, resolved + "\n")
    return cfg


def resolve_norms_cache(out: Path, cfg: BenchConfig) -> BenchConfig:
    """A config's ``audit.base_norms_cache`` stays inside the bench directory; elsewhere needs the CLI flag."""
    cache = cfg.base_norms_cache
    if not cache or cfg.base_norms_cache_from_cli:
        return cfg
    path = Path(os.path.expanduser(cache))
    full = path if path.is_absolute() else out / path
    root = os.path.realpath(out)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise InputError(f"audit.base_norms_cache {cache!r} is outside the bench directory; a config may only "
                         "name a cache inside it (pass --base-norms-cache PATH on the command line to use "
                         "another place)", path=cfg.source or "config")
    return replace(cfg, base_norms_cache=str(full))


def fresh_dir(out: Path, path: Path) -> None:
    """Make ``path`` (inside OUT) an empty directory; never follows or deletes through a symlink."""
    if has_symlink(out, path):
        raise InputError(f"{path.relative_to(out)} is (or lies under) a symbolic link; the bench never deletes or "
                         f"writes through links: {start_over(out)}", path=out)
    if path.exists():
        shutil.rmtree(path)  # a half-finished earlier attempt: start afresh
    path.mkdir(parents=True)
