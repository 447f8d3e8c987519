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

from gradience.issues import Issue
from gradience.jsonio import atomic_write_text

CACHE_SCHEMA = "gradience.base_norms/v1"
CACHE_FILENAME = "base_norms.json"


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


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    fp = entry.get("file")
    return (
        isinstance(fp, list) and len(fp) == 3 and isinstance(fp[0], str)
        and all(isinstance(x, int) for x in fp[1:])
        and all(isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k])
                for k in ("sigma_max", "frob_norm", "rtol"))
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
        base = data["bases"].get(self.identity)
        if not isinstance(base, dict):
            base = {}
        base.update(self._new)
        data["bases"][self.identity] = base
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
        except OSError as exc:
            return Issue("base_norms_cache_unwritable",
                         f"{self.path}: cannot write the base norms cache ({exc.strerror or exc})", "info")
        self._new = {}
        return None


def _read(path: Path, issues: list[Issue]) -> dict[str, Any] | None:
    """The cache file's content, or None when absent / corrupt (corrupt adds an info issue)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue("base_norms_cache_corrupt", f"{path}: unreadable base norms cache ({exc}); "
                            "norms recomputed", "info"))
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        issues.append(Issue("base_norms_cache_corrupt", f"{path}: base norms cache is not valid JSON; "
                            "norms recomputed and the file rewritten", "info"))
        return None
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("bases"), dict):
        issues.append(Issue("base_norms_cache_corrupt", f"{path}: not a {CACHE_SCHEMA} cache; "
                            "norms recomputed and the file rewritten", "info"))
        return None
    return data
