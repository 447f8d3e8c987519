"""On-disk cache of base-weight norms, so a second audit against the same base reads no base tensor data.

One JSON file (default ``$XDG_CACHE_HOME/gradience/base_norms.json`` or ``~/.cache/gradience/...``) holds
entries for any number of bases: ``bases[identity][tensor|dtype]`` with σ₁, ‖W‖_F, the accuracy they were
computed to and the fingerprint (file name, size, mtime) of the shard they came from. A changed shard makes
its entries stale; a file that is not JSON or has the wrong schema is corrupt. Both are reported (info
issue) and recomputed, never trusted. Writes merge with the file's current content and are atomic.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.io.textfile import os_problem, probe, read_json_file
from gradience.issues import Issue
from gradience.jsonio import atomic_write_text

CACHE_SCHEMA = "gradience.base_norms/v1"
CACHE_FILENAME = "base_norms.json"
# Entries are ~150 bytes: this holds ~100k base tensors (dozens of bases); a larger file is not our cache.
MAX_CACHE_BYTES = 64 * 1024 * 1024


def default_cache_path() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "gradience" / CACHE_FILENAME


@dataclass(frozen=True)
class CachedNorms:
    sigma_max: float
    frob_norm: float
    rtol: float
    iterations: int


def tensor_key(tensor: str, dtype: str) -> str:
    return f"{tensor}|{dtype}"


def _real(x: Any) -> bool:
    """A finite real number that fits a float (bools, NaN tokens and 400-digit ints are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _valid_entry(entry: Any) -> bool:
    """Every field of an entry has the type ``get`` relies on; anything else is a stale entry, recomputed."""
    if not isinstance(entry, dict):
        return False
    fp = entry.get("file")
    iterations = entry.get("iterations", 0)
    return (
        isinstance(fp, list) and len(fp) == 3 and isinstance(fp[0], str)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in fp[1:])
        and all(_real(entry.get(k)) for k in ("sigma_max", "frob_norm", "rtol"))
        and entry["sigma_max"] >= 0 and entry["frob_norm"] >= 0 and entry["rtol"] >= 0
        and isinstance(iterations, int) and not isinstance(iterations, bool) and 0 <= iterations < 2**31
    )


@dataclass
class NormsCache:
    """The cache file's content for one base identity, plus what was found wrong while loading it."""

    path: Path
    identity: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    hits: int = 0
    stale: int = 0
    _new: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, identity: str) -> NormsCache:
        target = Path(path).expanduser() if path else default_cache_path()
        cache = cls(target, identity)
        data = _read(target, cache.issues)
        if data is not None:
            base = data["bases"].get(identity)
            if isinstance(base, dict):
                cache.entries = {k: v for k, v in base.items() if _valid_entry(v)}
                if len(cache.entries) != len(base):
                    cache.issues.append(Issue(
                        "base_norms_cache_corrupt",
                        f"{target}: {len(base) - len(cache.entries)} malformed cache entries ignored and recomputed",
                        "info"))
        return cache

    def get(self, tensor: str, dtype: str, file_fp: tuple[str, int, int] | None, rtol: float) -> CachedNorms | None:
        entry = self.entries.get(tensor_key(tensor, dtype))
        if entry is None or file_fp is None:
            return None
        if tuple(entry["file"]) != file_fp:
            self.stale += 1
            return None
        if entry["rtol"] > rtol:
            return None  # computed to a looser accuracy than asked for now
        self.hits += 1
        return CachedNorms(float(entry["sigma_max"]), float(entry["frob_norm"]), float(entry["rtol"]),
                           int(entry.get("iterations", 0)))

    def put(self, tensor: str, dtype: str, file_fp: tuple[str, int, int] | None, norms: CachedNorms) -> None:
        if file_fp is None or not (math.isfinite(norms.sigma_max) and math.isfinite(norms.frob_norm)):
            return
        self._new[tensor_key(tensor, dtype)] = {
            "file": list(file_fp), "sigma_max": norms.sigma_max, "frob_norm": norms.frob_norm,
            "rtol": norms.rtol, "iterations": norms.iterations,
        }

    def stale_issue(self) -> Issue | None:
        if not self.stale:
            return None
        return Issue("base_norms_cache_stale",
                     f"{self.path}: {self.stale} cached base norm(s) were computed from a different version of "
                     "the base files (size/mtime changed) and were recomputed", "info")

    def save(self) -> Issue | None:
        """Merge new entries into the file (re-read first: another process may have written) atomically."""
        if not self._new:
            return None
        data = _read(self.path, []) or {"schema": CACHE_SCHEMA, "bases": {}}
        # Only valid entries are written back, for every base: another base's malformed entry (a bare NaN
        # token, which Python's json reads) would make the strict write fail; it would be recomputed anyway.
        data["bases"] = {ident: {k: v for k, v in entries.items() if _valid_entry(v)}
                         for ident, entries in data["bases"].items() if isinstance(entries, dict)}
        base = data["bases"].setdefault(self.identity, {})
        base.update(self._new)
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
        except OSError as exc:
            # A warning: every later audit against this base will read all base weights again.
            return Issue("base_norms_cache_unwritable",
                         f"{self.path}: cannot write the base norms cache ({os_problem(exc)}); base norms will be "
                         "recomputed on every audit (choose another --base-norms-cache)", "warning")
        self._new = {}
        return None


def _read(path: Path, issues: list[Issue]) -> dict[str, Any] | None:
    """The cache file's content, or None when absent / corrupt (corrupt adds an info issue)."""
    try:
        if probe(path) is None:
            return None
        data = read_json_file(path, what="base norms cache", max_bytes=MAX_CACHE_BYTES)
    except InputError as exc:
        issues.append(Issue("base_norms_cache_corrupt", f"{path}: unusable base norms cache ({exc.problem}); "
                            "norms recomputed", "info"))
        return None
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("bases"), dict):
        issues.append(Issue("base_norms_cache_corrupt", f"{path}: not a {CACHE_SCHEMA} cache; "
                            "norms recomputed and the file rewritten", "info"))
        return None
    return data
