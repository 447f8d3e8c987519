"""``gradience bench --executor ray``: every (seed, arm) is a Ray task; the driver keeps the bench's order.

The protocol is the local one (:mod:`gradience.bench.runner`): a seed's probe runs first, its audit plans the
seed's arms, arms whose ranks coincide run once (the later ones reuse the first's result), truncate arms need
the probe's adapter. Only the scheduling differs: probes of all seeds, then every arm whose probe is done, run
side by side up to ``--max-parallel`` tasks, each asking Ray for its CPUs (the pinned thread count) and
``--gpus-per-arm`` GPUs. A task writes its arm's files itself (atomically, ``result.json`` last), so the output
directory must be shared by the driver and the workers (one machine, or a shared file system). The driver
assembles the same ``bench.json``/``bench.md``/``report.html`` as the local executor.

Failures: a worker process that dies is Ray's to retry (``max_retries``); the retried task starts the arm's
directory afresh. An arm that still fails stops the bench with one line; finished arms stay, and ``--resume``
reruns only the rest. Ray is imported lazily (the ``[ray]`` extra).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.bench.arms import ArmPlan, arm_key, plan_arms, slug
from gradience.bench.assemble import assemble
from gradience.bench.config import BenchConfig
from gradience.bench.executors import pin_threads
from gradience.bench.results import ArmResult, cached_audit, has_symlink
from gradience.bench.runner import BenchRunner, Progress, _quiet_hf, _stderr
from gradience.errors import GradienceError, InputError, MissingDependencyError

MAX_RETRIES = 1  # a killed worker's arm runs once more, from a fresh directory


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "ray", "--executor ray") from None
    return ray


# -- the worker side ------------------------------------------------------------------------------------
_TASKS: dict[tuple[str, str], Any] = {}  # (config, output dir) -> PreparedTask, kept per worker process


def run_job(cfg_state: dict[str, Any], out: str, threads: int, seed: int, kind: str,
            plan: ArmPlan | None, probe: ArmResult | None, targets: list[str] | None) -> dict[str, Any]:
    """One probe or arm in a Ray worker: the local runner's own code, files written where the driver reads them."""
    import json

    from gradience.bench.tasks import prepare_task

    pin_threads(threads)
    cfg = BenchConfig.from_state(cfg_state)
    runner = BenchRunner(cfg, out, resume=False, progress=None)
    runner.cfg = cfg  # from_state holds the driver's effective config already
    key = (json.dumps(cfg_state, sort_keys=True, default=str), out)
    with _quiet_hf():
        if key not in _TASKS:
            _TASKS.clear()
            _TASKS[key] = prepare_task(cfg, Path(out))  # the driver materialised the base: this only loads it
        task = _TASKS[key]
        if kind == "probe":
            result, audit = runner._run_probe(task, seed, targets)
            return {"result": result, "audit": audit}
        assert plan is not None and probe is not None
        return {"result": runner._run_arm(task, seed, plan, probe)}


# -- the driver side ------------------------------------------------------------------------------------
@dataclass
class _Job:
    seed: int
    kind: str                       # probe | arm
    plan: ArmPlan | None = None
    retries_seen: int = 0


@dataclass
class _SeedState:
    probe: ArmResult | None = None
    owners: dict[Any, str] = field(default_factory=dict)       # arm key -> the arm that computes it
    done: dict[str, ArmResult] = field(default_factory=dict)    # arm name -> its result
    waiting: dict[str, list[ArmPlan]] = field(default_factory=dict)  # owner -> twins to fill when it ends


class RayBenchRunner(BenchRunner):
    """A bench whose probes and arms are Ray tasks (see the module docstring)."""

    def __init__(self, cfg: BenchConfig, output_dir: Any, *, resume: bool = False,
                 progress: Progress | None = _stderr, address: str | None = None, gpus_per_arm: float = 0.0,
                 max_parallel: int | None = None, threads: int = 1) -> None:
        super().__init__(cfg, output_dir, resume=resume, progress=progress, threads=threads)
        self.address = address
        self.gpus_per_arm = gpus_per_arm
        self.max_parallel = max_parallel
        self.connect_seconds: float | None = None
        # (seed, name, seconds from submit to result on the driver, the arm's own seconds): scheduling overhead
        self.task_timings: list[tuple[int, str, float, float]] = []

    def _connect(self) -> Any:
        ray = require_ray()
        started = time.perf_counter()
        if not ray.is_initialized():
            import warnings

            try:
                with warnings.catch_warnings():  # Ray's tip about accelerator variables on CPU-only tasks
                    warnings.simplefilter("ignore", FutureWarning)
                    ray.init(address=self.address or "auto", log_to_driver=False, logging_level="ERROR",
                             include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "auto (RAY_ADDRESS or the cluster started on this machine)"
                raise InputError(f"cannot connect to a Ray cluster at {where}: {str(exc).splitlines()[0][:200]} "
                                 "(start one with `ray start --head`)", path="--address") from None
        self.connect_seconds = time.perf_counter() - started
        return ray

    def _run(self) -> dict[str, Any]:
        ray = self._connect()
        # the task's base is written once by the driver; every worker loads it from OUT/base
        seeds, task, targets = self._start(f" on Ray (connected in {self.connect_seconds:.1f}s)")
        probes: dict[int, ArmResult] = {}
        arms: dict[str, dict[int, tuple[ArmPlan, ArmResult | None]]] = {a: {} for a in self.cfg.arms}
        states = {seed: _SeedState() for seed in seeds}
        queue: deque[_Job] = deque()

        resources: dict[str, Any] = {"num_cpus": self.threads, "max_retries": MAX_RETRIES}
        if self.gpus_per_arm:
            resources["num_gpus"] = self.gpus_per_arm
        remote = ray.remote(run_job).options(**resources)
        cfg_state = self.cfg.to_state()
        limit = self.max_parallel or 1_000_000
        pending: dict[Any, _Job] = {}
        submitted: dict[Any, float] = {}

        def probe_done(seed: int, probe: ArmResult, audit: dict[str, Any]) -> None:
            probes[seed] = probe
            st = states[seed]
            st.probe = probe
            for plan in plan_arms(self.cfg, audit, seed, targets):
                if self._skipped(plan, seed, arms):
                    continue
                kind = "truncate" if plan.kind == "truncate" else "train"
                key = arm_key(plan)
                arm_dir = self.out / f"seed_{seed}" / slug(plan.name)
                cached = self._cached(task, arm_dir / "result.json", arm_dir / "adapter")
                owner = st.owners.get(key)
                if cached is not None and (cached.same_as is None or cached.same_as == owner):
                    if owner is not None and cached.same_as is not None:
                        if owner in st.done:
                            cached.adapter_dir = st.done[owner].adapter_dir
                        else:  # its twin is still running: fill in when it ends (the same result)
                            st.waiting.setdefault(owner, []).append(plan)
                            continue
                    self._done(kind, None)
                    arms[plan.name][seed] = (plan, cached)
                    st.owners.setdefault(key, plan.name)
                    st.done[plan.name] = cached
                    self._note(seed, plan.name, None)
                    continue
                if owner is not None:
                    if owner in st.done:
                        reuse(seed, plan, st.done[owner])
                    else:
                        st.waiting.setdefault(owner, []).append(plan)
                    continue
                st.owners[key] = plan.name
                queue.append(_Job(seed, "arm", plan))

        def reuse(seed: int, plan: ArmPlan, twin: ArmResult) -> None:
            kind = "truncate" if plan.kind == "truncate" else "train"
            result = self._reuse(twin, plan, self.out / f"seed_{seed}" / slug(plan.name))
            self._done(kind, None)
            arms[plan.name][seed] = (plan, result)
            states[seed].done[plan.name] = result
            self._note(seed, plan.name, 0.0, f"  same ranks as {twin.name}: its result (not run twice)")

        def arm_done(seed: int, plan: ArmPlan, result: ArmResult) -> None:
            st = states[seed]
            kind = "truncate" if plan.kind == "truncate" else "train"
            st.done[plan.name] = result
            self._done(kind, result.seconds)
            arms[plan.name][seed] = (plan, result)
            assert st.probe is not None
            self._note(seed, plan.name, result.seconds, f"  Δ={result.metric - st.probe.metric:+.4f}")
            for twin_plan in st.waiting.pop(plan.name, []):
                twin_dir = self.out / f"seed_{seed}" / slug(twin_plan.name)
                cached = self._cached(task, twin_dir / "result.json", twin_dir / "adapter")
                if cached is not None and cached.same_as == plan.name:
                    cached.adapter_dir = result.adapter_dir
                    self._done(kind, None)
                    arms[twin_plan.name][seed] = (twin_plan, cached)
                    st.done[twin_plan.name] = cached
                    self._note(seed, twin_plan.name, None)
                else:
                    reuse(seed, twin_plan, result)

        for seed in seeds:
            cached_probe = self._cached_probe(task, seed)
            if cached_probe is not None:
                self._done("train", None)
                self._note(seed, "probe", None)
                probe_done(seed, *cached_probe)
            else:
                queue.append(_Job(seed, "probe"))

        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    job = queue.popleft()
                    if job.kind == "probe":
                        self.progress(f"bench: training the probe of seed {job.seed} (r={self.cfg.probe_r}, "
                                      f"{self.cfg.max_steps} steps) on Ray…")
                    ref = remote.remote(cfg_state, str(self.out), self.threads, job.seed, job.kind, job.plan,
                                        states[job.seed].probe, targets)
                    pending[ref] = job
                    submitted[ref] = time.perf_counter()
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                answer = self._get(ray, ready[0], job)
                self.task_timings.append((job.seed, "probe" if job.plan is None else job.plan.name,
                                          time.perf_counter() - submitted.pop(ready[0]), answer["result"].seconds))
                if job.kind == "probe":
                    result = answer["result"]
                    self._done("train", result.seconds)
                    self._note(job.seed, "probe", result.seconds, f"  {self.cfg.metric}={result.metric:.4f}")
                    probe_done(job.seed, result, answer["audit"])
                else:
                    assert job.plan is not None
                    arm_done(job.seed, job.plan, answer["result"])
        finally:
            for ref in pending:  # a failed arm stops the bench: no task keeps writing after it
                ray.cancel(ref, force=True)
        bench = assemble(self.cfg, task, seeds, probes, arms, time.perf_counter() - self._started)
        self._write_outputs(bench)
        if not self.cfg.keep_adapter_weights:
            self._drop_adapter_weights(seeds)
        return bench

    def _cached_probe(self, task: Any, seed: int) -> tuple[ArmResult, dict[str, Any]] | None:
        probe_dir = self.out / f"seed_{seed}" / "probe"
        audit_path = probe_dir / "audit.json"
        cached = self._cached(task, probe_dir / "result.json", probe_dir / "adapter")
        audit = cached_audit(audit_path) if cached is not None and not has_symlink(self.out, audit_path) else None
        return (cached, audit) if cached is not None and audit is not None else None

    def _get(self, ray: Any, ref: Any, job: _Job) -> dict[str, Any]:
        """A task's answer; its own one-line errors pass through, a lost worker becomes one line too."""
        name = "probe" if job.plan is None else job.plan.name
        try:
            answer: dict[str, Any] = ray.get(ref)
            return answer
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GradienceError):
                raise cause from None
            if isinstance(cause, OSError):
                raise cause from None
            detail = str(cause or exc).strip().splitlines()
            raise InputError(f"bench stopped: seed {job.seed} {name} failed on a Ray worker: "
                             f"{type(cause).__name__}: {(detail[-1] if detail else '')[:200]} (finished arms are "
                             "kept; rerun with --resume)", path=self.out) from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.RayError) as exc:
            raise InputError(f"bench stopped: seed {job.seed} {name} failed on Ray after {MAX_RETRIES} retr"
                             f"{'y' if MAX_RETRIES == 1 else 'ies'}: {type(exc).__name__} (its result.json was "
                             "not written; finished arms are kept; rerun with --resume)", path=self.out) from None


def run_bench_ray(cfg: BenchConfig, output_dir: Any, *, resume: bool = False, progress: Progress | None = _stderr,
                  address: str | None = None, gpus_per_arm: float = 0.0, max_parallel: int | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) a bench on a Ray cluster; returns the same ``bench.json`` object as the local runner."""
    import math

    from gradience.bench.executors import arm_threads

    if not (math.isfinite(gpus_per_arm) and 0 <= gpus_per_arm <= 64):
        raise InputError("--gpus-per-arm: between 0 and 64", path="--gpus-per-arm")
    if max_parallel is not None and not 1 <= max_parallel <= 100_000:
        raise InputError("--max-parallel: between 1 and 100000", path="--max-parallel")
    if cfg.launcher == "accelerate":
        raise InputError("--launcher accelerate runs each arm over several local processes; with --executor ray "
                         "an arm is one task (ask for its GPUs with --gpus-per-arm)", path="--executor")
    require_ray()
    return RayBenchRunner(cfg, output_dir, resume=resume, progress=progress, address=address,
                          gpus_per_arm=gpus_per_arm, max_parallel=max_parallel,
                          threads=arm_threads() if threads is None else threads).run()
