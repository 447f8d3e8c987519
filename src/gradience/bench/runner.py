"""The bench protocol (SPEC §15): per seed, probe → eval → audit → arms, then verdicts and outputs.

Layout of the output directory::

    bench_config.json            the resolved config (a resume must match it)
    base/                        the shared base every arm starts from (built-in / classification models)
    seed_<S>/probe/              adapter/, run.jsonl, audit.json, result.json
    seed_<S>/<arm>/              adapter/, run.jsonl (retrain arms), compress.json (truncate arms), result.json
    bench.json  bench.md  report.html

Each ``result.json`` is written atomically when its arm finishes; ``--resume`` reuses finished ones, so a
killed bench continues where it stopped. Progress goes to a callback (the CLI prints it on stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gradience.bench.arms import ArmPlan, arm_key, plan_arms, slug
from gradience.bench.config import BenchConfig
from gradience.bench.stats import Verdicts, metric_value, noise_floor, paired_bootstrap_ci
from gradience.bench.tasks import (
    PreparedTask,
    evaluate_per_item,
    load_adapter_model,
    metric_summary,
    prepare_task,
)
from gradience.bench.train import LoraSpec, train_arm
from gradience.errors import InputError
from gradience.jsonio import atomic_write_text, dumps

SCHEMA = "gradience.bench/v1"
RESULT_SCHEMA = "gradience.bench.arm/v1"
CONTROL_ARMS = ("retrain_shuffled",)
_MAX_RESULT_BYTES = 64 << 20   # a result.json holds one score per eval item
_MAX_STATE_BYTES = 1 << 20     # bench_config.json


def _has_symlink(root: Path, path: Path) -> bool:
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

Progress = Callable[[str], None]


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
    def load(cls, path: Path, adapter_dir: Path) -> ArmResult | None:
        """A finished arm's result, or None when the file is missing, torn, odd or from another schema.

        ``adapter_dir`` is where this arm's adapter must be (inside the bench directory): the path stored in
        the file is never used, so an edited or foreign result.json cannot make the bench read elsewhere.
        """
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
        if _has_symlink(path.parent, adapter_dir) or (
                result.same_as is None and not (adapter_dir / "adapter_config.json").is_file()):
            return None
        return result


@contextlib.contextmanager
def _quiet_hf() -> Any:
    """No per-load progress bars or deprecation chatter between the bench's own progress lines."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:
            pass
        yield


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f}s" if s < 90 else f"{int(s // 60)}m{int(s % 60):02d}s"


class BenchRunner:
    """Runs (or resumes) a bench into ``output_dir``; :meth:`run` returns the ``bench.json`` object."""

    def __init__(self, cfg: BenchConfig, output_dir: str | os.PathLike[str], *, resume: bool = False,
                 progress: Progress | None = _stderr) -> None:
        self.cfg = cfg.effective()
        self.out = Path(output_dir)
        self.resume = resume
        self.progress = progress or (lambda _line: None)
        self.device = self.cfg.device
        self._started = time.perf_counter()
        self._train_seconds: list[float] = []     # probes, retrain and uniform arms
        self._truncate_seconds: list[float] = []  # truncate arms (seconds, no training)
        self._trainings_left = 0
        self._truncations_left = 0
        self._arms_done = 0
        self._arms_total = 0

    # -- set-up ---------------------------------------------------------------------------------------
    def _start_over(self) -> str:
        import shlex

        return f"to start over, delete it (rm -r {shlex.quote(str(self.out))}) or choose another --output-dir"

    def _check_output_dir(self) -> None:
        """OUT is new, empty, or (with --resume) holds a bench started with the same config."""
        from gradience.errors import GradienceError
        from gradience.io.textfile import probe, read_json_file

        state = self.out / "bench_config.json"
        resolved = dumps(self.cfg.to_dict())
        st = probe(self.out)
        if st is not None and not self.out.is_dir():
            raise InputError("output path exists and is not a directory", path=self.out)
        self._check_norms_cache()
        if probe(state) is not None or state.is_symlink():
            if not self.resume:
                raise InputError(f"holds an earlier bench; pass --resume to continue it, or {self._start_over()}",
                                 path=self.out)
            try:
                previous = read_json_file(state, what="bench state", max_bytes=_MAX_STATE_BYTES)
            except GradienceError as exc:
                raise InputError(f"cannot resume: {exc}; {self._start_over()}", path=self.out) from None
            if previous != json.loads(resolved):
                raise InputError("the config differs from the one this bench was started with; --resume needs "
                                 f"the same config, or {self._start_over()}", path=state)
            for child in self.out.iterdir():
                if child.name.startswith("seed_") and child.is_symlink():
                    raise InputError(f"{child.name} is a symbolic link; a bench directory holds its own seed "
                                     f"directories (nothing outside it is read or deleted): {self._start_over()}",
                                     path=self.out)
            return
        if st is not None and any(self.out.iterdir()):
            hint = (" (an earlier bench that never wrote its state?)" if any(
                c.name.startswith("seed_") or c.name == "base" for c in self.out.iterdir()) else "")
            raise InputError(f"output directory is not empty{hint}; {self._start_over()}", path=self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output directory: {exc.strerror or exc}", path=self.out) from None
        atomic_write_text(state, resolved + "\n")

    def _check_norms_cache(self) -> None:
        """A config's ``audit.base_norms_cache`` stays inside the bench directory; elsewhere needs the CLI flag."""
        cache = self.cfg.base_norms_cache
        if not cache or self.cfg.base_norms_cache_from_cli:
            return
        path = Path(os.path.expanduser(cache))
        full = path if path.is_absolute() else self.out / path
        root = os.path.realpath(self.out)
        if os.path.commonpath([root, os.path.realpath(full)]) != root:
            raise InputError(f"audit.base_norms_cache {cache!r} is outside the bench directory; a config may only "
                             "name a cache inside it (pass --base-norms-cache PATH on the command line to use "
                             "another place)", path=self.cfg.source or "config")
        self.cfg = replace(self.cfg, base_norms_cache=str(full))

    def _fresh_dir(self, path: Path) -> None:
        """Make ``path`` (inside OUT) an empty directory; never follows or deletes through a symlink."""
        if _has_symlink(self.out, path):
            raise InputError(f"{path.relative_to(self.out)} is (or lies under) a symbolic link; the bench never "
                             f"deletes or writes through links: {self._start_over()}", path=self.out)
        if path.exists():
            shutil.rmtree(path)  # a half-finished earlier attempt: start afresh
        path.mkdir(parents=True)

    # -- arms -----------------------------------------------------------------------------------------
    def _eta(self) -> float:
        """Remaining time from the mean time of each kind of arm: trainings dominate, truncations are cheap."""
        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else 0.0

        return (self._trainings_left * mean(self._train_seconds)
                + self._truncations_left * mean(self._truncate_seconds))

    def _done(self, kind: str, seconds: float | None) -> None:
        """Book-keeping after an arm (or the probe) finished, was resumed or skipped."""
        self._arms_done += 1
        if kind == "truncate":
            self._truncations_left -= 1
            if seconds is not None:
                self._truncate_seconds.append(seconds)
        else:
            self._trainings_left -= 1
            if seconds is not None:
                self._train_seconds.append(seconds)

    def _note(self, seed: int, name: str, seconds: float | None, extra: str = "") -> None:
        elapsed = time.perf_counter() - self._started
        eta = "-" if self._train_seconds == [] else _fmt_seconds(self._eta())
        took = "resumed" if seconds is None else _fmt_seconds(seconds)
        self.progress(f"bench: seed {seed} {name:<20} {took:>8}  [{self._arms_done}/{self._arms_total}] "
                      f"elapsed {_fmt_seconds(elapsed)}, ETA {eta}{extra}")

    def _evaluate(self, task: PreparedTask, adapter_dir: Path) -> tuple[np.ndarray, dict[str, float]]:
        model = load_adapter_model(task, adapter_dir, self.device)
        per_item = evaluate_per_item(model, task, self.cfg, self.device)
        return per_item, metric_summary(per_item, task, self.cfg)

    def _audit(self, adapter_dir: Path, *, suggest: bool) -> dict[str, Any]:
        from gradience.adapter import load_adapter
        from gradience.audit.core import AuditOptions, run_audit

        udr = self.cfg.compute_udr or bool(self.cfg.base_model)
        options = AuditOptions(suggest_per_layer=suggest, allowed_ranks=self.cfg.allowed_ranks,
                               margin=self.cfg.margin, udr=udr, base_model=self.cfg.base_model,
                               base_norms_cache=self.cfg.base_norms_cache)
        return run_audit(load_adapter(str(adapter_dir)), options).to_summary(include_layers=True)

    @staticmethod
    def _udr_block(audit: dict[str, Any]) -> dict[str, Any] | None:
        if not audit.get("udr_requested"):
            return None
        keys = ("udr_median", "udr_mean", "udr_p90", "udr_max", "fraction_udr_gt_0_1", "fraction_udr_gt_0_3",
                "sdi_median", "n_layers_with_udr")
        block = {k: audit.get(k) for k in keys}
        block["per_layer"] = {row["name"]: row.get("udr") for row in audit.get("layers", [])}
        return block

    def _train(self, task: PreparedTask, seed: int, spec: LoraSpec, arm_dir: Path) -> Path:
        if self.cfg.launcher == "accelerate":
            return self._train_accelerate(seed, spec, arm_dir)
        return train_arm(task, self.cfg, seed, spec, arm_dir, self.device)

    def _train_accelerate(self, seed: int, spec: LoraSpec, arm_dir: Path) -> Path:
        """One arm as ``accelerate launch`` of the worker (DDP across processes; no home-made distribution)."""
        spec_file = arm_dir / "worker_spec.json"
        atomic_write_text(spec_file, dumps({"config": self.cfg.to_state(), "seed": seed, "lora": spec.to_dict(),
                                            "arm_dir": str(arm_dir), "output_dir": str(self.out),
                                            "device": self.device}))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.cfg.num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if self.cfg.num_processes > 1:
            # accelerate's multi-process launcher (torch.distributed.run underneath); on CPU the Trainer then
            # runs DDP over gloo (TrainingArguments(use_cpu=True)). Its ``--cpu`` flag is single-process only.
            cmd += ["--multi_gpu"]
        elif self.device == "cpu":
            cmd += ["--cpu"]
        cmd += ["-m", "gradience.bench.worker", str(spec_file)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise InputError(f"accelerate launch failed (exit {proc.returncode}): {tail[0][:300]}", path=arm_dir)
        return arm_dir / "adapter"

    def _compress(self, probe_adapter: Path, arm_dir: Path, plan: ArmPlan) -> tuple[Path, dict[str, Any]]:
        """Truncate the probe with compress (SPEC §12): the exact factored SVD, no retraining."""
        from gradience.adapter import load_adapter
        from gradience.compress import CompressOptions, Policy, compress

        if plan.r is not None:
            policy = Policy(name="rank", value=int(plan.r))
        else:
            policy = Policy(name="per_layer", margin=self.cfg.margin, allowed_ranks=self.cfg.allowed_ranks)
        out = arm_dir / "adapter"
        result = compress(load_adapter(str(probe_adapter)), out, CompressOptions(policy=policy, force=True))
        return out, result.to_dict()

    def _run_arm(self, task: PreparedTask, seed: int, plan: ArmPlan, probe: ArmResult) -> ArmResult:
        arm_dir = self.out / f"seed_{seed}" / slug(plan.name)
        self._fresh_dir(arm_dir)
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if plan.kind == "truncate":
            adapter_dir, report = self._compress(Path(probe.adapter_dir), arm_dir, plan)
            extra["compress_summary"] = report.get("summary")
        else:
            assert plan.lora is not None
            adapter_dir = self._train(task, seed, plan.lora, arm_dir)
        per_item, summary = self._evaluate(task, adapter_dir)
        audit = self._audit(adapter_dir, suggest=False)
        summary.update(extra)
        result = ArmResult(name=plan.name, seed=seed, metric=metric_value(per_item, self.cfg.metric),
                           per_item=per_item.tolist(), params=int(audit["total_lora_params"]),
                           seconds=time.perf_counter() - started, summary=summary, adapter_dir=str(adapter_dir),
                           udr=self._udr_block(audit), plan=plan.describe())
        atomic_write_text(arm_dir / "result.json", dumps(result.to_dict()) + "\n")
        return result

    @staticmethod
    def _cached_audit(path: Path) -> dict[str, Any] | None:
        from gradience.errors import GradienceError
        from gradience.io.textfile import read_json_file

        try:
            audit = read_json_file(path, what="probe audit", max_bytes=_MAX_RESULT_BYTES)
        except GradienceError:
            return None
        return audit if isinstance(audit, dict) else None

    def _run_probe(self, task: PreparedTask, seed: int, targets: list[str] | None) -> tuple[ArmResult, dict[str, Any]]:
        probe_dir = self.out / f"seed_{seed}" / "probe"
        result_path, audit_path = probe_dir / "result.json", probe_dir / "audit.json"
        cached = ArmResult.load(result_path, probe_dir / "adapter") if self.resume else None
        audit = self._cached_audit(audit_path) if cached is not None else None
        if cached is not None and audit is not None:
            self._done("train", None)
            self._note(seed, "probe", None)
            return cached, audit
        self._fresh_dir(probe_dir)
        self.progress(f"bench: training the probe of seed {seed} (r={self.cfg.probe_r}, {self.cfg.max_steps} steps)…")
        started = time.perf_counter()
        spec = LoraSpec(r=self.cfg.probe_r, alpha=self.cfg.alpha, target_modules=targets, dropout=self.cfg.dropout,
                        use_rslora=self.cfg.use_rslora)
        adapter_dir = self._train(task, seed, spec, probe_dir)
        per_item, summary = self._evaluate(task, adapter_dir)
        audit = self._audit(adapter_dir, suggest=True)
        atomic_write_text(audit_path, dumps(audit) + "\n")
        result = ArmResult(name="probe", seed=seed, metric=metric_value(per_item, self.cfg.metric),
                           per_item=per_item.tolist(), params=int(audit["total_lora_params"]),
                           seconds=time.perf_counter() - started, summary=summary, adapter_dir=str(adapter_dir),
                           udr=self._udr_block(audit), plan={"name": "probe", "kind": "probe", "r": self.cfg.probe_r})
        atomic_write_text(result_path, dumps(result.to_dict()) + "\n")
        self._done("train", result.seconds)
        self._note(seed, "probe", result.seconds, f"  {self.cfg.metric}={result.metric:.4f}")
        return result, audit

    # -- the whole bench --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self._check_output_dir()
            with _quiet_hf():
                return self._run()
        except OSError as exc:  # a full disk, a read-only or vanished directory: one line, not a traceback
            from gradience.io.textfile import os_problem

            where = exc.filename if isinstance(exc.filename, str) else self.out
            raise InputError(f"bench stopped: cannot write or read its files: {os_problem(exc)} (finished arms "
                             "are kept; free the space and rerun with --resume)", path=where) from None

    def _run(self) -> dict[str, Any]:
        seeds = self.cfg.seed_list()
        self.progress(f"bench: {len(seeds)} seed(s) × (probe + {len(self.cfg.arms)} arms) into {self.out}; "
                      "loading data and the base model…")
        task = prepare_task(self.cfg, self.out)
        targets = list(self.cfg.target_modules) if self.cfg.target_modules else None
        self._arms_total = len(seeds) * (1 + len(self.cfg.arms))
        n_truncate = sum(a.startswith("truncate_") for a in self.cfg.arms)
        self._truncations_left = len(seeds) * n_truncate
        self._trainings_left = self._arms_total - self._truncations_left
        probes: dict[int, ArmResult] = {}
        arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]] = {a: {} for a in self.cfg.arms}
        for seed in seeds:
            probe, audit = self._run_probe(task, seed, targets)
            probes[seed] = probe
            done_keys: dict[Any, ArmResult] = {}  # (kind, ranks) -> the arm of this seed that ran them
            for plan in plan_arms(self.cfg, audit, seed, targets):
                kind = "truncate" if plan.kind == "truncate" else "train"
                if plan.skipped:
                    arms[plan.name][seed] = (plan, None)
                    self._done(kind, None)
                    self._note(seed, plan.name, 0.0, f"  skipped: {plan.skipped}")
                    continue
                arm_dir = self.out / f"seed_{seed}" / slug(plan.name)
                key = arm_key(plan)
                cached = ArmResult.load(arm_dir / "result.json", arm_dir / "adapter") if self.resume else None
                twin = done_keys.get(key)
                if cached is not None and (cached.same_as is None or (twin and twin.name == cached.same_as)):
                    if twin is not None and cached.same_as is not None:
                        cached.adapter_dir = twin.adapter_dir
                    self._done(kind, None)
                    arms[plan.name][seed] = (plan, cached)
                    done_keys.setdefault(key, cached)
                    self._note(seed, plan.name, None)
                    continue
                if twin is not None:
                    result = self._reuse(twin, plan, arm_dir)
                    self._done(kind, None)
                    arms[plan.name][seed] = (plan, result)
                    self._note(seed, plan.name, 0.0, f"  same ranks as {twin.name}: its result (not run twice)")
                    continue
                result = self._run_arm(task, seed, plan, probe)
                done_keys[key] = result
                self._done(kind, result.seconds)
                arms[plan.name][seed] = (plan, result)
                delta = result.metric - probe.metric
                self._note(seed, plan.name, result.seconds, f"  Δ={delta:+.4f}")
        bench = self._assemble(task, seeds, probes, arms)
        self._write_outputs(bench)
        if not self.cfg.keep_adapter_weights:
            self._drop_adapter_weights(seeds)
        return bench

    def _reuse(self, twin: ArmResult, plan: ArmPlan, arm_dir: Path) -> ArmResult:
        """The result of an arm with the same (kind, ranks), under this arm's name, recorded in its own dir."""
        self._fresh_dir(arm_dir)
        result = ArmResult(name=plan.name, seed=twin.seed, metric=twin.metric, per_item=list(twin.per_item),
                           params=twin.params, seconds=0.0, summary=dict(twin.summary),
                           adapter_dir=twin.adapter_dir, udr=twin.udr, plan=plan.describe(), same_as=twin.name)
        atomic_write_text(arm_dir / "result.json", dumps(result.to_dict()) + "\n")
        return result

    def _drop_adapter_weights(self, seeds: tuple[int, ...]) -> None:
        """runtime.keep_adapter_weights: false (the reference's disk saver): weights go, configs and JSON stay."""
        for seed in seeds:
            seed_dir = self.out / f"seed_{seed}"
            if seed_dir.is_symlink() or not seed_dir.is_dir():
                continue
            for arm_dir in seed_dir.iterdir():
                weights = arm_dir / "adapter" / "adapter_model.safetensors"
                if not _has_symlink(self.out, weights) and weights.is_file():
                    weights.unlink()

    def _assemble(self, task: PreparedTask, seeds: tuple[int, ...], probes: dict[int, ArmResult],
                  arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]]) -> dict[str, Any]:
        cfg = self.cfg
        verdicts = Verdicts(tolerance=cfg.tolerance, min_pass_rate=cfg.min_pass_rate,
                            higher_is_better=cfg.higher_is_better)
        probe_params = probes[seeds[0]].params
        arm_rows: list[dict[str, Any]] = []
        for name in cfg.arms:
            per_seed: list[dict[str, Any]] = []
            deltas: list[float] = []
            params: list[int] = []
            plans = [plan for plan, _ in arms[name].values()]
            for seed in seeds:
                plan, res = arms[name].get(seed, (None, None))
                if res is None:
                    per_seed.append({"seed": seed, "metric": None, "delta": None, "ci95": None, "verdict": None,
                                     "skipped": plan.skipped if plan else "not run"})
                    continue
                probe = probes[seed]
                delta = res.metric - probe.metric
                lo, hi = paired_bootstrap_ci(probe.per_item, res.per_item, cfg.metric,
                                             samples=cfg.bootstrap_samples)
                deltas.append(delta)
                params.append(res.params)
                per_seed.append({"seed": seed, "metric": res.metric, "delta": delta, "ci95": [lo, hi],
                                 **({"same_as": res.same_as} if res.same_as else {}),
                                 "verdict": verdicts.verdict(delta), "params": res.params,
                                 "r": res.plan.get("r") if res.plan else None,
                                 "rank_pattern": res.plan.get("rank_pattern") if res.plan else None,
                                 "seconds": res.seconds, "adapter_dir": res.adapter_dir, "summary": res.summary})
            kind = plans[0].kind if plans else ("uniform" if name.startswith("uniform:") else name.split("_", 1)[0])
            rs = {p.r for p in plans if p.r is not None}
            mean_params = sum(params) / len(params) if params else None
            aggregate = verdicts.aggregate(deltas) if deltas else {
                "n_seeds": 0, "mean_delta": None, "sd_delta": None, "worst_delta": None, "pass_rate": None,
                "verdict": None}
            labels = {p.label for p in plans if p.label}
            arm_rows.append({
                "name": name, "kind": kind, "r": rs.pop() if len(rs) == 1 else None,
                "rank_pattern": plans[0].rank_pattern if plans and plans[0].rank_pattern and len(seeds) == 1 else None,
                "label": labels.pop() if len(labels) == 1 else None,
                "params": round(mean_params) if mean_params is not None else None,
                "params_ratio": (mean_params / probe_params) if mean_params is not None and probe_params else None,
                "per_seed": per_seed, "aggregate": aggregate,
            })
        candidates = [row for row in arm_rows
                      if row["aggregate"]["verdict"] == "PASS" and row["name"] not in CONTROL_ARMS
                      and row["label"] is None and row["params_ratio"] is not None and row["params_ratio"] < 1.0]
        best = min(candidates, key=lambda row: (row["params_ratio"], row["name"])) if candidates else None
        probe_metrics = [probes[s].metric for s in seeds]
        return {
            "schema": SCHEMA,
            "config": cfg.to_dict(),
            "seeds": list(seeds),
            "task": {"kind": task.kind, "model": task.model_name, "dataset": task.dataset_name,
                     "metric": cfg.metric, "higher_is_better": cfg.higher_is_better, "n_eval_items":
                     len(probes[seeds[0]].per_item)},
            "probe": {"r": cfg.probe_r, "alpha": cfg.alpha, "params": probe_params,
                      "per_seed": [{"seed": s, "metric": probes[s].metric, "summary": probes[s].summary,
                                    "seconds": probes[s].seconds, "adapter_dir": probes[s].adapter_dir}
                                   for s in seeds]},
            "arms": arm_rows,
            "noise_floor": noise_floor(probe_metrics),
            "policy": {"tolerance": cfg.tolerance, "min_pass_rate": cfg.min_pass_rate,
                       "rule": "an arm PASSes a seed when Δ ≥ −tolerance (Δ ≤ +tolerance for a loss); across "
                               "seeds when its pass rate ≥ min_pass_rate and its worst Δ passes"},
            "verdict": "PASS" if best else "FAIL",
            "recommended_arm": best["name"] if best else None,
            "screening": len(seeds) == 1,
            "udr": {"probe": {str(s): probes[s].udr for s in seeds},
                    "arms": {name: {str(s): (res.udr if res else None) for s, (_, res) in arms[name].items()}
                             for name in cfg.arms}}
            if any(p.udr for p in probes.values()) else None,
            "elapsed_seconds": time.perf_counter() - self._started,
            **({"probe_gate": self._probe_gate(probes, seeds)} if cfg.probe_gate_min is not None else {}),
            **({"ignored_config_keys": list(cfg.ignored_keys)} if cfg.ignored_keys else {}),
        }

    def _probe_gate(self, probes: dict[int, ArmResult], seeds: tuple[int, ...]) -> dict[str, Any]:
        """task.probe_gate: a probe below ``min_value`` is undertrained and its arms' Δ mean little."""
        gate = self.cfg.probe_gate_min
        assert gate is not None
        ok = (lambda m: m >= gate) if self.cfg.higher_is_better else (lambda m: m <= gate)
        per_seed = [{"seed": s, "metric": probes[s].metric, "passed": bool(ok(probes[s].metric))} for s in seeds]
        return {"metric": self.cfg.metric, "min_value": gate, "passed": all(p["passed"] for p in per_seed),
                "per_seed": per_seed}

    def _write_outputs(self, bench: dict[str, Any]) -> None:
        from gradience.bench.render import render_markdown

        atomic_write_text(self.out / "bench.json", dumps(bench) + "\n")
        atomic_write_text(self.out / "bench.md", render_markdown(bench))
        from gradience.errors import MissingDependencyError
        from gradience.report import write_report

        try:
            write_report(self.out / "bench.json", self.out / "report.html")
        except MissingDependencyError as exc:  # bench.json and bench.md still stand without the report extra
            self.progress(f"bench: no report.html: {exc}")


def run_bench(cfg: BenchConfig, output_dir: str | os.PathLike[str], *, resume: bool = False,
              progress: Progress | None = _stderr, **overrides: Any) -> dict[str, Any]:
    """Run a bench (library entry point); ``overrides`` replace config fields (e.g. ``seeds=(1, 2, 3)``)."""
    if overrides:
        cfg = replace(cfg, **overrides)
    return BenchRunner(cfg, output_dir, resume=resume, progress=progress).run()
