"""Bench configuration: the reference tool's bench YAML, accepted as is, plus ``seeds``, ``arms``, ``policy``.

Why strict: a misspelt key in an experiment config silently runs a different experiment. Every key is
known; an unknown one is an error naming it and the closest known key. Values are checked for type and
range here, once, so the runner never meets a bad value halfway through a multi-hour bench.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gradience.bench.config_compat import reference_keys, translate
from gradience.bench.config_values import MAX_RANK as _MAX_RANK
from gradience.bench.config_values import Reader as _Reader
from gradience.bench.config_values import closest as _closest
from gradience.bench.config_values import parse_arms as _parse_arms
from gradience.bench.config_values import parse_seeds, show
from gradience.errors import InputError
from gradience.policy.thresholds import (
    ALLOWED_RANKS_DEFAULT,
    BENCH_MIN_PASS_RATE,
    BENCH_SMOKE_EVAL_SAMPLES,
    BENCH_SMOKE_MAX_STEPS,
    BENCH_SMOKE_TRAIN_SAMPLES,
    BENCH_TOLERANCE_DEFAULT,
)

TASK_TYPES = ("classification", "causal_lm")
DEFAULT_ARMS = ("truncate_median", "truncate_p90", "truncate_per_layer",
                "retrain_median", "retrain_p90", "retrain_per_layer", "retrain_shuffled")
KNOWN_ARMS = DEFAULT_ARMS  # plus ``uniform:K`` for any positive K
DEVICES = ("cpu", "cuda", "auto")
LAUNCHERS = ("none", "accelerate")

# Every accepted key, per section (None: a scalar top-level key). The reference tool's keys come first.
SCHEMA_KEYS: dict[str, tuple[str, ...] | None] = {
    "bench_version": None,
    "model": ("name", "torch_dtype", "gradient_checkpointing", "use_cache"),
    "task": ("dataset", "subset", "metric", "type", "max_train_samples", "max_eval_samples",
             "exact_match", "max_new_tokens", "text_column", "answer_column", "probe_gate", "generation"),
    "train": ("seed", "max_steps", "eval_steps", "lr", "weight_decay", "per_device_train_batch_size",
              "per_device_eval_batch_size", "logging_steps", "gradient_accumulation_steps", "warmup_ratio",
              "save_steps", "save_strategy"),
    "lora": ("probe_r", "alpha", "dropout", "target_modules", "use_rslora"),
    "compression": ("allowed_ranks", "acc_tolerance", "margin"),
    "audit": ("base_model", "compute_udr", "base_norms_cache", "enable_composition_analysis"),
    "runtime": ("device", "smoke_max_steps", "smoke_train_samples", "smoke_eval_samples", "launcher",
                "num_processes", "bootstrap_samples", "keep_adapter_weights", "keep_checkpoints"),
    "seeds": None,
    "arms": None,
    "policy": ("min_pass_rate",),
}
# Bound what a config can make the runner do (a typo of 1e9 steps must not start a month-long job silently).
_MAX_CONFIG_BYTES = 1 << 20
# model.torch_dtype as the reference reads it (protocol.py: bf16/fp16 on a GPU, float32 on a CPU).
TORCH_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


@dataclass(frozen=True)
class BenchConfig:
    """A validated bench configuration (defaults are the offline toy's)."""

    source: str | None = None
    bench_version: str = "0.1"
    model: str = "gradience/tiny-distilbert"
    task_type: str = "classification"
    dataset: str = "gradience/tiny-sentiment"
    subset: str | None = None
    metric: str = "accuracy"
    max_train_samples: int | None = 2000
    max_eval_samples: int | None = 500
    exact_match: bool = False
    max_new_tokens: int = 16
    text_column: str | None = None
    answer_column: str | None = None
    train_seed: int = 42
    max_steps: int = 200
    eval_steps: int = 50
    lr: float = 5e-5
    weight_decay: float = 0.0
    train_batch_size: int = 8
    eval_batch_size: int = 32
    logging_steps: int = 10
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    probe_r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False
    allowed_ranks: tuple[int, ...] = ALLOWED_RANKS_DEFAULT
    tolerance: float = BENCH_TOLERANCE_DEFAULT
    margin: float = 1.0
    base_model: str | None = None
    compute_udr: bool = False
    base_norms_cache: str | None = None
    device: str = "cpu"
    smoke_max_steps: int = BENCH_SMOKE_MAX_STEPS
    smoke_train_samples: int = BENCH_SMOKE_TRAIN_SAMPLES
    smoke_eval_samples: int = BENCH_SMOKE_EVAL_SAMPLES
    launcher: str = "none"
    num_processes: int = 1
    bootstrap_samples: int = 2000
    seeds: tuple[int, ...] = ()
    arms: tuple[str, ...] = DEFAULT_ARMS
    min_pass_rate: float = BENCH_MIN_PASS_RATE
    smoke: bool = False
    torch_dtype: str | None = None             # model.torch_dtype; None/auto: the checkpoint loads as float32
    gradient_checkpointing: bool = False       # model.gradient_checkpointing (memory, not results)
    probe_gate_min: float | None = None        # task.probe_gate.min_value: the probe must reach it
    keep_adapter_weights: bool = True          # runtime.keep_adapter_weights: False deletes arm weights at the end
    base_norms_cache_from_cli: bool = False    # a cache path outside the bench dir needs the user's own flag
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)  # reference keys that have no effect

    @property
    def dataset_spec(self) -> str:
        """The dataset as the loaders name it: ``glue`` + ``sst2`` is ``glue/sst2``; ``id`` + ``cfg`` is ``id:cfg``."""
        if not self.subset:
            return self.dataset
        return f"{self.dataset}/{self.subset}" if self.dataset == "glue" else f"{self.dataset}:{self.subset}"

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in ("loss", "eval_loss", "ppl", "perplexity")

    def seed_list(self) -> tuple[int, ...]:
        return self.seeds or (self.train_seed,)

    def effective(self) -> BenchConfig:
        """The config the runner uses: ``smoke`` shrinks steps and data to the runtime.smoke_* sizes."""
        if not self.smoke:
            return self
        return replace(self, max_steps=min(self.max_steps, self.smoke_max_steps),
                       eval_steps=min(self.eval_steps, self.smoke_max_steps),
                       max_train_samples=_min_opt(self.max_train_samples, self.smoke_train_samples),
                       max_eval_samples=_min_opt(self.max_eval_samples, self.smoke_eval_samples))

    def to_state(self) -> dict[str, Any]:
        """Every field as plain JSON (for the accelerate worker, which rebuilds the exact config)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) if f.name != "raw" for v in [getattr(self, f.name)]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BenchConfig:
        values = {f.name: state[f.name] for f in fields(cls) if f.name in state and f.name != "raw"}
        for name in ("target_modules", "allowed_ranks", "seeds", "arms", "ignored_keys"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as bench.json records it (what actually ran)."""
        return {
            "source": self.source, "bench_version": self.bench_version, "model": self.model,
            "task": {"type": self.task_type, "dataset": self.dataset_spec, "metric": self.metric,
                     "higher_is_better": self.higher_is_better, "max_train_samples": self.max_train_samples,
                     "max_eval_samples": self.max_eval_samples, "exact_match": self.exact_match},
            "train": {"max_steps": self.max_steps, "eval_steps": self.eval_steps, "lr": self.lr,
                      "weight_decay": self.weight_decay, "per_device_train_batch_size": self.train_batch_size,
                      "per_device_eval_batch_size": self.eval_batch_size,
                      "gradient_accumulation_steps": self.gradient_accumulation_steps,
                      "warmup_ratio": self.warmup_ratio},
            "lora": {"probe_r": self.probe_r, "alpha": self.alpha, "dropout": self.dropout,
                     "target_modules": list(self.target_modules) if self.target_modules else None,
                     "use_rslora": self.use_rslora},
            "compression": {"allowed_ranks": list(self.allowed_ranks), "acc_tolerance": self.tolerance,
                            "margin": self.margin},
            "audit": {"base_model": self.base_model, "compute_udr": self.compute_udr},
            "runtime": {"device": self.device, "launcher": self.launcher, "num_processes": self.num_processes,
                        "smoke": self.smoke, "bootstrap_samples": self.bootstrap_samples,
                        **({} if self.keep_adapter_weights else {"keep_adapter_weights": False})},
            "seeds": list(self.seed_list()), "arms": list(self.arms),
            # additive keys, present only when set (a bench resumed from an older version still matches)
            **({"model_options": {"torch_dtype": self.torch_dtype,
                                  "gradient_checkpointing": self.gradient_checkpointing}}
               if self.torch_dtype or self.gradient_checkpointing else {}),
            **({"probe_gate": {"metric": self.metric, "min_value": self.probe_gate_min}}
               if self.probe_gate_min is not None else {}),
        }


def _min_opt(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> BenchConfig:
    """Validate a parsed config mapping (the YAML's top level) into a :class:`BenchConfig`."""
    if not isinstance(data, Mapping):
        raise InputError("a bench config must be a mapping of sections (model, task, train, lora, ...)",
                         path=source)
    if not all(isinstance(key, str) for key in data):
        bad = next(key for key in data if not isinstance(key, str))
        raise InputError(f"unknown key {show(bad)}{_closest(show(bad), list(SCHEMA_KEYS))}", path=source)
    data, ignored = translate(data, source)
    for key, value in data.items():
        if key not in SCHEMA_KEYS:
            raise InputError(f"unknown key {show(key, 60)}{_closest(key, [*SCHEMA_KEYS, *reference_keys('')])}",
                             path=source)
        sub = SCHEMA_KEYS[key]
        if sub is None:
            continue
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InputError(f"{key}: expected a mapping with keys {', '.join(sub)}", path=source)
        for subkey in value:
            if not isinstance(subkey, str) or subkey not in sub:
                raise InputError(f"unknown key '{key}.{show(subkey, 60).strip(chr(39))}'"
                                 f"{_closest(subkey if isinstance(subkey, str) else show(subkey), [*sub, *reference_keys(key)])}", path=source)

    def section(name: str) -> _Reader:
        value = data.get(name) or {}
        return _Reader(source, name, value)

    model, task, train, lora = section("model"), section("task"), section("train"), section("lora")
    comp, audit, runtime, policy = section("compression"), section("audit"), section("runtime"), section("policy")
    d = BenchConfig()
    values: dict[str, Any] = {"source": source, "raw": dict(data), "ignored_keys": tuple(ignored)}

    def put(attr: str, value: Any) -> None:
        if value is not None:
            values[attr] = value

    version = data.get("bench_version")
    if version is not None:
        if isinstance(version, (dict, list)):
            raise InputError(f"bench_version: expected a version string, got {type(version).__name__}", path=source)
        put("bench_version", show(version, 32).strip("'"))
    put("model", model.text("name"))
    put("dataset", task.text("dataset"))
    put("subset", task.text("subset"))
    task_type = task.text("type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise InputError(f"task.type: unknown task type {task_type!r}{_closest(task_type, TASK_TYPES)}", path=source)
    put("task_type", task_type)
    metric = task.text("metric")
    resolved_type = task_type or d.task_type
    known_metrics = ("accuracy",) if resolved_type == "classification" else ("eval_loss", "loss", "ppl",
                                                                             "perplexity", "exact_match")
    if metric is not None and metric not in known_metrics:
        raise InputError(f"task.metric: {metric!r} is not a metric of a {resolved_type} task "
                         f"(choose from {', '.join(known_metrics)})", path=source)
    if metric is None and resolved_type == "causal_lm":
        metric = "eval_loss"
    put("metric", metric)
    put("max_train_samples", task.integer("max_train_samples", 1, 10_000_000))
    put("max_eval_samples", task.integer("max_eval_samples", 1, 10_000_000))
    put("exact_match", task.flag("exact_match"))
    if values.get("exact_match"):
        values["metric"] = "exact_match"
    put("max_new_tokens", task.integer("max_new_tokens", 1, 4096))
    put("text_column", task.text("text_column"))
    put("answer_column", task.text("answer_column"))
    _generation(task, values, source)
    _probe_gate(task, values, source)

    put("train_seed", train.integer("seed", 0, 2**32 - 1))
    put("max_steps", train.integer("max_steps", 1, 10_000_000))
    put("eval_steps", train.integer("eval_steps", 1, 10_000_000))
    put("lr", train.number("lr", 1e-12, 1.0))
    put("weight_decay", train.number("weight_decay", 0.0, 10.0))
    put("train_batch_size", train.integer("per_device_train_batch_size", 1, 65536))
    put("eval_batch_size", train.integer("per_device_eval_batch_size", 1, 65536))
    put("logging_steps", train.integer("logging_steps", 1, 10_000_000))
    put("gradient_accumulation_steps", train.integer("gradient_accumulation_steps", 1, 65536))
    put("warmup_ratio", train.number("warmup_ratio", 0.0, 1.0))
    # The reference saves Trainer checkpoints every save_steps; the bench keeps none (each arm's adapter is
    # saved once, at the end): the keys are checked and have no effect on what is measured.
    train.integer("save_steps", 1, 10_000_000)
    train.text("save_strategy")

    dtype = model.text("torch_dtype")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise InputError(f"model.torch_dtype: {show(dtype)}: choose from {', '.join(TORCH_DTYPES)}", path=source)
    put("torch_dtype", None if dtype == "auto" else dtype)
    put("gradient_checkpointing", model.flag("gradient_checkpointing"))
    model.flag("use_cache")  # the KV cache during training: speed/memory only (transformers turns it off anyway)

    put("probe_r", lora.integer("probe_r", 1, _MAX_RANK))
    put("alpha", lora.number("alpha", 1e-6, 1e6))
    put("dropout", lora.number("dropout", 0.0, 0.999))
    put("target_modules", lora.names("target_modules"))
    put("use_rslora", lora.flag("use_rslora"))

    put("allowed_ranks", comp.integers("allowed_ranks", 1, _MAX_RANK, 64))
    put("tolerance", comp.number("acc_tolerance", 0.0, 1e6))
    put("margin", comp.number("margin", 0.1, 100.0))

    put("base_model", audit.text("base_model"))
    put("compute_udr", audit.flag("compute_udr"))
    put("base_norms_cache", audit.text("base_norms_cache"))
    audit.flag("enable_composition_analysis")  # the reference's energy-concentration block: not computed here

    device = runtime.text("device")
    if device is not None and device not in DEVICES:
        raise InputError(f"runtime.device: {device!r}: choose from {', '.join(DEVICES)}", path=source)
    put("device", device)
    put("smoke_max_steps", runtime.integer("smoke_max_steps", 1, 1_000_000))
    put("smoke_train_samples", runtime.integer("smoke_train_samples", 1, 10_000_000))
    put("smoke_eval_samples", runtime.integer("smoke_eval_samples", 1, 10_000_000))
    launcher = runtime.text("launcher")
    if launcher is not None and launcher not in LAUNCHERS:
        raise InputError(f"runtime.launcher: {launcher!r}: choose from {', '.join(LAUNCHERS)}", path=source)
    put("launcher", launcher)
    put("num_processes", runtime.integer("num_processes", 1, 1024))
    put("bootstrap_samples", runtime.integer("bootstrap_samples", 100, 1_000_000))
    put("keep_adapter_weights", runtime.flag("keep_adapter_weights"))
    runtime.flag("keep_checkpoints")  # no intermediate checkpoints are written (see train.save_steps)

    if data.get("seeds") is not None:
        values["seeds"] = parse_seeds(data["seeds"], source)
    if data.get("arms") is not None:
        values["arms"] = parse_arms(data["arms"], source)
    put("min_pass_rate", policy.number("min_pass_rate", 0.0, 1.0))

    if values.get("task_type") == "causal_lm":
        from gradience.toy.causal import BUILTIN_CAUSAL_DATASET, BUILTIN_CAUSAL_MODEL

        values.setdefault("model", BUILTIN_CAUSAL_MODEL)
        values.setdefault("dataset", BUILTIN_CAUSAL_DATASET)
    cfg = replace(d, **values)
    if cfg.probe_r > _MAX_RANK:
        raise InputError(f"lora.probe_r: at most {_MAX_RANK}", path=source)
    return cfg


def parse_arms(spec: Any, path: str = "--arms") -> tuple[str, ...]:
    """Arm names: the built-in ones and ``uniform:K``; a string is comma/space separated."""
    return _parse_arms(spec, path, KNOWN_ARMS)


def _generation(task: _Reader, values: dict[str, Any], source: str) -> None:
    """task.generation (gsm8k_causal_lm.py): max_new_tokens is used; decoding is greedy, as the reference's configs ask."""
    gen = task.get("generation")
    if gen is None:
        return
    if not isinstance(gen, Mapping):
        raise InputError("task.generation: expected a mapping (max_new_tokens, do_sample, temperature, num_beams)",
                         path=source)
    known = ("max_new_tokens", "do_sample", "temperature", "num_beams")
    for key in gen:
        if key not in known:
            raise InputError(f"unknown key 'task.generation.{show(key, 60).strip(chr(39))}'"
                             f"{_closest(show(key, 60), known)}", path=source)
    g = _Reader(source, "task.generation", gen)
    n = g.integer("max_new_tokens", 1, 4096)
    if n is not None:
        if values.get("max_new_tokens") not in (None, n):
            raise InputError("task.max_new_tokens and task.generation.max_new_tokens differ; keep one", path=source)
        values["max_new_tokens"] = n
    g.number("temperature", 0.0, 100.0)
    # Paired per-item verdicts need every arm decoded the same deterministic way: greedy only.
    if g.flag("do_sample") or (g.integer("num_beams", 1, 64) or 1) != 1:
        raise InputError("task.generation: the bench decodes greedily (do_sample: false, num_beams: 1) so that "
                         "every arm is scored on identical, deterministic generations", path=source)


def _probe_gate(task: _Reader, values: dict[str, Any], source: str) -> None:
    """task.probe_gate (task_profiles/*.py probe_gate): the probe must reach ``min_value`` of the metric."""
    gate = task.get("probe_gate")
    if gate is None:
        return
    if not isinstance(gate, Mapping) or not set(gate) <= {"metric", "min_value"}:
        raise InputError("task.probe_gate: expected a mapping with keys metric, min_value", path=source)
    g = _Reader(source, "task.probe_gate", gate)
    minimum = g.number("min_value", -1e9, 1e9)
    if minimum is None:
        raise InputError("task.probe_gate.min_value: missing", path=source)
    metric = g.text("metric")
    expected = values.get("metric") or "accuracy"
    if metric is not None and metric != expected:
        raise InputError(f"task.probe_gate.metric: {show(metric)}, but the bench measures {expected}", path=source)
    values["probe_gate_min"] = minimum


def load_bench_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Read and validate a bench YAML/JSON file: a regular file (never a FIFO or device), size-capped, parsed
    by the one bounded safe YAML loader (alias bombs and deep nesting refused while reading)."""
    from gradience.config.loader import _parse_yaml
    from gradience.io.textfile import read_text_limited

    p = Path(path)
    text = read_text_limited(p, what="config file", max_bytes=_MAX_CONFIG_BYTES, missing="config file does not exist")
    data = _parse_yaml(text, p) if text.strip() else {}
    return config_from_mapping(data if data is not None else {}, str(p))
