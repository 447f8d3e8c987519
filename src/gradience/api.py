"""``gradience.api``: the reference tool's thin programmatic wrappers (johntnanney/gradience ``gradience/api.py``),
same names and keyword arguments, so its users' scripts keep working.

Like the reference, each wrapper runs the command-line entry point in a subprocess (``sys.executable -m …``),
the reproducible surface, and returns the paths of what it wrote or the completed process. For in-process
use, call the library instead: ``gradience.audit.run_audit``, ``gradience.monitor.monitor_run``,
``gradience.bench.run_bench``. Importing this module imports no heavy dependency.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError

# A bench.json is tens of KiB; the bound only stops a wrong path (a dataset, /dev/zero) from being read whole.
MAX_BENCH_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BenchRunArtifacts:
    """Paths produced by one :func:`run_bench`."""

    output_dir: Path
    bench_json: Path
    bench_md: Path


@dataclass(frozen=True)
class BenchAggregateArtifacts:
    """The reference's multi-run aggregate (see :func:`aggregate_bench_runs`)."""

    output_dir: Path
    aggregate_json: Path
    aggregate_md: Path


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None, check: bool,
         log_path: str | os.PathLike[str] | None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; output goes to ``log_path`` when given (else inherited); ``check`` raises on failure."""
    merged = dict(os.environ)
    merged.update({k: str(v) for k, v in (env or {}).items()})
    if log_path is None:
        return subprocess.run(list(argv), env=merged, check=check, text=True)
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as fh:
        return subprocess.run(list(argv), env=merged, check=check, text=True, stdout=fh, stderr=subprocess.STDOUT)


def _gradience(python: str | None, *args: str) -> list[str]:
    return [python or sys.executable, "-m", "gradience", *args]


def run_bench(*, config: str | os.PathLike[str], output: str | os.PathLike[str], smoke: bool = False,
              ci: bool = False, python: str | None = None, env: Mapping[str, str] | None = None,
              log_path: str | os.PathLike[str] | None = None, check: bool = True) -> BenchRunArtifacts:
    """``python -m gradience.bench.run_bench --config C --output D [--smoke] [--ci]``."""
    out = Path(output)
    argv = [python or sys.executable, "-m", "gradience.bench.run_bench", "--config", os.fspath(config),
            "--output", os.fspath(out)]
    if smoke:
        argv.append("--smoke")
    if ci:
        argv.append("--ci")
    _run(argv, env=env, check=check, log_path=log_path)
    return BenchRunArtifacts(out, out / "bench.json", out / "bench.md")


def aggregate_bench_runs(*, runs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
                         include_smoke: bool = False, python: str | None = None,
                         env: Mapping[str, str] | None = None, log_path: str | os.PathLike[str] | None = None,
                         check: bool = True) -> BenchAggregateArtifacts:
    """Not provided: one bench here runs every seed and aggregates them itself (``seeds:`` in the config or
    ``--seeds 1,2,3``; bench.json holds the per-seed results and the paired-bootstrap intervals)."""
    raise GradienceError("aggregate_bench_runs is not provided: run one bench over all seeds instead "
                         "(`gradience bench --config C --seeds 1,2,3`); its bench.json aggregates them")


def audit(*, peft_dir: str | os.PathLike[str], layers: bool = True, base_model: str | None = None,
          base_norms_cache: str | os.PathLike[str] | None = None, no_udr: bool = False,
          extra_args: Sequence[str] | None = None, python: str | None = None, env: Mapping[str, str] | None = None,
          log_path: str | os.PathLike[str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m gradience audit --peft-dir D [--layers] [--base-model B] [--base-norms-cache F] [--no-udr]``."""
    argv = _gradience(python, "audit", "--peft-dir", os.fspath(peft_dir))
    if layers:
        argv.append("--layers")
    if base_model:
        argv += ["--base-model", base_model]
    if base_norms_cache:
        argv += ["--base-norms-cache", os.fspath(base_norms_cache)]
    if no_udr:
        argv.append("--no-udr")
    argv += list(extra_args or ())
    return _run(argv, env=env, check=check, log_path=log_path)


def monitor(*, run_jsonl: str | os.PathLike[str], verbose: bool = False, extra_args: Sequence[str] | None = None,
            python: str | None = None, env: Mapping[str, str] | None = None,
            log_path: str | os.PathLike[str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m gradience monitor RUN.jsonl [--verbose]``."""
    argv = _gradience(python, "monitor", os.fspath(run_jsonl))
    if verbose:
        argv.append("--verbose")
    argv += list(extra_args or ())
    return _run(argv, env=env, check=check, log_path=log_path)


def _load(path: Path) -> dict[str, Any]:
    from gradience.errors import InputError
    from gradience.io.textfile import read_json_file

    doc = read_json_file(path, what="bench output", max_bytes=MAX_BENCH_JSON_BYTES)
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object", path)
    return doc


def load_bench_report(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``<output_dir>/bench.json``."""
    return _load(Path(output_dir) / "bench.json")


def load_bench_aggregate(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``<output_dir>/bench_aggregate.json`` (written by the reference tool's aggregate; bench.json here)."""
    return _load(Path(output_dir) / "bench_aggregate.json")


__all__ = ["BenchAggregateArtifacts", "BenchRunArtifacts", "aggregate_bench_runs", "audit", "load_bench_aggregate",
           "load_bench_report", "monitor", "run_bench"]
