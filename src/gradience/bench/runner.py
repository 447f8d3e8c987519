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
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gradience.bench.arms import ArmPlan, arm_key, plan_arms, slug
from gradience.bench.assemble import assemble
from gradience.bench.config import BenchConfig
from gradience.bench.outdir import fresh_dir, prepare_output_dir
from gradience.bench.results import ArmResult, cached_audit, has_symlink
from gradience.bench.stats import metric_value
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

Progress = Callable[[str], None]


@contextlib.contextmanager
def _quiet_hf() -> Any:
    """No per-load progress bars or deprecation chatter between the bench's own progress lines."""
    import warnings

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    if "datasets" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["datasets"].disable_progress_bars()
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


def _io_problem(exc: BaseException) -> str | None:
    """The OS's words for a failed read/write (``No space left on device``), also when safetensors' Rust writer
    reports it as ``SafetensorError: ... I/O error: ...``; None for anything that is not an I/O failure."""
    if isinstance(exc, OSError):
        from gradience.io.textfile import os_problem

        return os_problem(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text[text.index("I/O error"):][:200]
    return None


class BenchRunner:
    """Runs (or resumes) a bench into ``output_dir``; :meth:`run` returns the ``bench.json`` object."""

    def __init__(self, cfg: BenchConfig, output_dir: str | os.PathLike[str], *, resume: bool = False,
                 progress: Progress | None = _stderr, threads: int | None = None) -> None:
        from gradience.bench.executors import arm_threads

        self.threads = arm_threads() if threads is None else threads  # the same in every executor: bit-equal results
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
    def _check_output_dir(self) -> None:
        self.cfg = prepare_output_dir(self.out, self.cfg, self.resume)

    def _fresh_dir(self, path: Path) -> None:
        fresh_dir(self.out, path)

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
        if plan.kind == "truncate" and not any(Path(probe.adapter_dir).glob("adapter_model.*")):
            from gradience.bench.outdir import start_over

            raise InputError("the probe's adapter weights are gone (runtime.keep_adapter_weights: false removes "
                             f"them when a bench ends), so {plan.name} cannot be truncated from it; "
                             f"{start_over(self.out)}", path=probe.adapter_dir)
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

    def _cached(self, task: PreparedTask, result_path: Path, adapter_dir: Path) -> ArmResult | None:
        """A finished result to reuse on --resume: read safely, and scored on this task's eval items."""
        if not self.resume:
            return None
        cached = ArmResult.load(result_path, adapter_dir, self.out)
        exact = task.kind == "causal_lm" and self.cfg.metric == "exact_match"
        n_items = len(task.eval_prompts) if exact else len(task.eval_set)
        return cached if cached is not None and len(cached.per_item) == n_items else None

    def _run_probe(self, task: PreparedTask, seed: int, targets: list[str] | None) -> tuple[ArmResult, dict[str, Any]]:
        probe_dir = self.out / f"seed_{seed}" / "probe"
        result_path, audit_path = probe_dir / "result.json", probe_dir / "audit.json"
        cached = self._cached(task, result_path, probe_dir / "adapter")
        audit = cached_audit(audit_path) if cached is not None and not has_symlink(self.out, audit_path) else None
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
            from gradience.bench.executors import pin_threads

            pin_threads(self.threads)
            with _quiet_hf():
                return self._run()
        except Exception as exc:  # a full disk, a read-only or vanished directory: one line, not a traceback
            problem = _io_problem(exc)
            if problem is None:
                raise
            where = getattr(exc, "filename", None)
            raise InputError(f"bench stopped: cannot write or read its files: {problem} (finished arms are kept; "
                             "free the space and rerun with --resume)",
                             path=where if isinstance(where, str) else self.out) from None

    def _start(self, where: str = "") -> tuple[tuple[int, ...], PreparedTask, list[str] | None]:
        """The first progress line, the task (data + base, written once), and the ETA counters; shared by
        the local and the Ray executor. ``where``: said after the output dir (e.g. " on Ray")."""
        seeds = self.cfg.seed_list()
        self.progress(f"bench: {len(seeds)} seed(s) × (probe + {len(self.cfg.arms)} arms) into {self.out}{where}; "
                      "loading data and the base model…")
        task = prepare_task(self.cfg, self.out)
        targets = list(self.cfg.target_modules) if self.cfg.target_modules else None
        self._arms_total = len(seeds) * (1 + len(self.cfg.arms))
        n_truncate = sum(a.startswith("truncate_") for a in self.cfg.arms)
        self._truncations_left = len(seeds) * n_truncate
        self._trainings_left = self._arms_total - self._truncations_left
        return tuple(seeds), task, targets

    def _skipped(self, plan: ArmPlan, seed: int,
                 arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]]) -> bool:
        """Record an arm the planner skipped (e.g. its rank equals the probe's) and say so; both executors."""
        if not plan.skipped:
            return False
        arms[plan.name][seed] = (plan, None)
        self._done("truncate" if plan.kind == "truncate" else "train", None)
        self._note(seed, plan.name, 0.0, f"  skipped: {plan.skipped}")
        return True

    def _run(self) -> dict[str, Any]:
        seeds, task, targets = self._start()
        probes: dict[int, ArmResult] = {}
        arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]] = {a: {} for a in self.cfg.arms}
        for seed in seeds:
            probe, audit = self._run_probe(task, seed, targets)
            probes[seed] = probe
            done_keys: dict[Any, ArmResult] = {}  # (kind, ranks) -> the arm of this seed that ran them
            for plan in plan_arms(self.cfg, audit, seed, targets):
                if self._skipped(plan, seed, arms):
                    continue
                kind = "truncate" if plan.kind == "truncate" else "train"
                arm_dir = self.out / f"seed_{seed}" / slug(plan.name)
                key = arm_key(plan)
                cached = self._cached(task, arm_dir / "result.json", arm_dir / "adapter")
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
        bench = assemble(self.cfg, task, seeds, probes, arms, time.perf_counter() - self._started)
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
                if not has_symlink(self.out, weights) and weights.is_file():
                    weights.unlink()

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
