"""One arm's stored result (``seed_<S>/<arm>/result.json``) and the checks that make resuming safe.

Why strict on load: a bench directory may come from someone else or have been edited. A result is reused
only when it reads back cleanly (bounded, never a FIFO or device) and its adapter lies inside the bench
directory at the place the bench itself writes it; no path stored in the file is ever followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_SCHEMA = "gradience.bench.arm/v1"
_MAX_RESULT_BYTES = 64 << 20   # a result.json holds one score per eval item


def has_symlink(root: Path, path: Path) -> bool:
    """Whether any component of ``path`` below ``root`` (``root`` itself excluded) is a symlink."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return True
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return True
    return False



@dataclass
class ArmResult:
    """One arm (or the probe) of one seed, as stored in its ``result.json``."""

    name: str
    seed: int
    metric: float
    per_item: list[float]
    params: int
    seconds: float
    summary: dict[str, Any]
    adapter_dir: str
    udr: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    same_as: str | None = None   # an earlier arm of this seed with the same ranks: its result, not retrained

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RESULT_SCHEMA, "name": self.name, "seed": self.seed, "metric": self.metric,
                "params": self.params, "seconds": self.seconds, "summary": self.summary,
                "adapter_dir": self.adapter_dir, "udr": self.udr, "plan": self.plan, "per_item": self.per_item,
                **({"same_as": self.same_as} if self.same_as else {})}

    @classmethod
    def load(cls, path: Path, adapter_dir: Path, root: Path) -> ArmResult | None:
        """A finished arm's result, or None when the file is missing, torn, odd or from another schema.

        ``adapter_dir`` is where this arm's adapter must be (inside the bench directory ``root``): the path
        stored in the file is never used, so an edited or foreign result.json cannot make the bench read
        elsewhere; nothing is read through a symbolic link below ``root``.
        """
        if has_symlink(root, path) or has_symlink(root, adapter_dir):
            return None
        from gradience.errors import GradienceError
        from gradience.io.textfile import read_json_file

        try:
            data = read_json_file(path, what="arm result", max_bytes=_MAX_RESULT_BYTES)
            if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
                return None
            result = cls(name=str(data["name"]), seed=int(data["seed"]), metric=float(data["metric"]),
                         per_item=[float(x) for x in data["per_item"]], params=int(data["params"]),
                         seconds=float(data["seconds"]), summary=dict(data.get("summary") or {}),
                         adapter_dir=str(adapter_dir), udr=data.get("udr"), plan=data.get("plan"),
                         same_as=data.get("same_as") if isinstance(data.get("same_as"), str) else None)
        except (GradienceError, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
            return None
        if result.same_as is None and not (adapter_dir / "adapter_config.json").is_file():
            return None
        return result


def cached_audit(path: Path) -> dict[str, Any] | None:
    """The probe's saved audit summary, or None when it cannot be read back as a JSON object."""
    from gradience.errors import GradienceError
    from gradience.io.textfile import read_json_file

    try:
        audit = read_json_file(path, what="probe audit", max_bytes=_MAX_RESULT_BYTES)
    except GradienceError:
        return None
    return audit if isinstance(audit, dict) else None
