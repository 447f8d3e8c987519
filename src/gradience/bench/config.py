"""Bench configuration: the reference tool's bench YAML, accepted as is, plus ``seeds``, ``arms``, ``policy``.

Why strict: a misspelt key in an experiment config silently runs a different experiment. Every key is
known; an unknown one is an error naming it and the closest known key. Values are checked for type and
range here, once, so the runner never meets a bad value halfway through a multi-hour bench.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

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
    "model": ("name",),
    "task": ("dataset", "subset", "metric", "type", "max_train_samples", "max_eval_samples",
             "exact_match", "max_new_tokens", "text_column", "answer_column"),
    "train": ("seed", "max_steps", "eval_steps", "lr", "weight_decay", "per_device_train_batch_size",
              "per_device_eval_batch_size", "logging_steps", "gradient_accumulation_steps", "warmup_ratio"),
    "lora": ("probe_r", "alpha", "dropout", "target_modules", "use_rslora"),
    "compression": ("allowed_ranks", "acc_tolerance", "margin"),
    "audit": ("base_model", "compute_udr", "base_norms_cache"),
    "runtime": ("device", "smoke_max_steps", "smoke_train_samples", "smoke_eval_samples", "launcher",
                "num_processes", "bootstrap_samples"),
    "seeds": None,
    "arms": None,
    "policy": ("min_pass_rate",),
}
# Bound what a config can make the runner do (a typo of 1e9 steps must not start a month-long job silently).
_MAX_SEEDS = 64
_MAX_ARMS = 64
_MAX_RANK = 4096
_MAX_CONFIG_BYTES = 1 << 20


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
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
        for name in ("target_modules", "allowed_ranks", "seeds", "arms"):
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
                        "smoke": self.smoke, "bootstrap_samples": self.bootstrap_samples},
            "seeds": list(self.seed_list()), "arms": list(self.arms),
        }


def _min_opt(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _closest(key: str, known: tuple[str, ...] | list[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (known keys: {', '.join(known)})"


class _Reader:
    """Typed access to one config section, every error naming the file and the dotted key."""

    def __init__(self, path: str, section: str, data: Mapping[str, Any]) -> None:
        self.path, self.section, self.data = path, section, data

    def _err(self, key: str, problem: str) -> InputError:
        where = f"{self.section}.{key}" if self.section else key
        return InputError(f"{where}: {problem}", path=self.path)

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def _scalar(self, key: str, what: str) -> int | float | str | None:
        """The raw value of a numeric key: None when absent, an error for lists, maps and booleans."""
        v = self.data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
            raise self._err(key, f"expected {what}, got {type(v).__name__}")
        return v

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        v = self._scalar(key, "an integer")
        if v is None:
            return None
        try:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            iv = int(v.strip()) if isinstance(v, str) else int(v)
        except (ValueError, OverflowError):
            raise self._err(key, f"expected an integer, got {str(v)[:40]!r}") from None
        if not lo <= iv <= hi:
            raise self._err(key, f"must be between {lo} and {hi}, got {iv}")
        return iv

    def number(self, key: str, lo: float, hi: float) -> float | None:
        v = self._scalar(key, "a number")
        if v is None:
            return None
        try:
            fv = float(v)  # YAML 1.1 reads 5e-5 as a string: coerce it
        except (ValueError, OverflowError):
            raise self._err(key, f"expected a number, got {str(v)[:40]!r}") from None
        if not (lo <= fv <= hi):  # also rejects NaN
            raise self._err(key, f"must be between {lo:g} and {hi:g}, got {fv!r}")
        return fv

    def text(self, key: str) -> str | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip() or len(v) > 4096:
            raise self._err(key, "expected a non-empty string")
        return v.strip()

    def flag(self, key: str) -> bool | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self._err(key, f"expected true or false, got {str(v)[:40]!r}")
        return v

    def names(self, key: str) -> tuple[str, ...] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            v = [t for t in v.replace(",", " ").split() if t]
        if not isinstance(v, list) or not v or not all(isinstance(t, str) and t for t in v) or len(v) > 256:
            raise self._err(key, "expected a non-empty list of names")
        return tuple(v)

    def integers(self, key: str, lo: int, hi: int, max_len: int) -> tuple[int, ...] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            v = [t for t in str(v).replace(",", " ").split() if t]
        if not isinstance(v, list) or not v or len(v) > max_len:
            raise self._err(key, f"expected a non-empty list of at most {max_len} integers")
        out = []
        for item in v:
            try:
                if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                    raise ValueError
                iv = int(item)
            except (TypeError, ValueError, OverflowError):
                raise self._err(key, f"expected integers, got {str(item)[:40]!r}") from None
            if not lo <= iv <= hi:
                raise self._err(key, f"values must be between {lo} and {hi}, got {iv}")
            out.append(iv)
        return tuple(out)


def parse_arms(spec: Any, path: str = "--arms") -> tuple[str, ...]:
    """Arm names: the built-in ones and ``uniform:K``; a string is comma/space separated."""
    items = [t for t in spec.replace(",", " ").split() if t] if isinstance(spec, str) else spec
    if not isinstance(items, list | tuple) or not items or len(items) > _MAX_ARMS:
        raise InputError(f"arms: expected a non-empty list of at most {_MAX_ARMS} arm names", path=path)
    out: list[str] = []
    for arm in items:
        if not isinstance(arm, str):
            raise InputError(f"arms: expected names, got {str(arm)[:40]!r}", path=path)
        if arm.startswith("uniform:"):
            k = arm.partition(":")[2]
            if not k.isdigit() or not 1 <= int(k) <= _MAX_RANK:
                raise InputError(f"arms: {arm!r}: uniform:K needs a rank K between 1 and {_MAX_RANK}", path=path)
            arm = f"uniform:{int(k)}"
        elif arm not in KNOWN_ARMS:
            raise InputError(f"arms: unknown arm {arm!r}{_closest(arm, [*KNOWN_ARMS, 'uniform:K'])}", path=path)
        if arm not in out:
            out.append(arm)
    return tuple(out)


def parse_seeds(spec: Any, path: str = "--seeds") -> tuple[int, ...]:
    r = _Reader(path, "", {"seeds": spec})
    seeds = r.integers("seeds", 0, 2**32 - 1, _MAX_SEEDS)
    assert seeds is not None
    return tuple(dict.fromkeys(seeds))


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> BenchConfig:
    """Validate a parsed config mapping (the YAML's top level) into a :class:`BenchConfig`."""
    if not isinstance(data, Mapping):
        raise InputError("a bench config must be a mapping of sections (model, task, train, lora, ...)",
                         path=source)
    for key, value in data.items():
        if not isinstance(key, str) or key not in SCHEMA_KEYS:
            raise InputError(f"unknown key {str(key)[:60]!r}{_closest(str(key), list(SCHEMA_KEYS))}", path=source)
        sub = SCHEMA_KEYS[key]
        if sub is None:
            continue
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InputError(f"{key}: expected a mapping with keys {', '.join(sub)}", path=source)
        for subkey in value:
            if not isinstance(subkey, str) or subkey not in sub:
                raise InputError(f"unknown key '{key}.{str(subkey)[:60]}'{_closest(str(subkey), sub)}",
                                 path=source)

    def section(name: str) -> _Reader:
        value = data.get(name) or {}
        return _Reader(source, name, value)

    model, task, train, lora = section("model"), section("task"), section("train"), section("lora")
    comp, audit, runtime, policy = section("compression"), section("audit"), section("runtime"), section("policy")
    d = BenchConfig()
    values: dict[str, Any] = {"source": source, "raw": dict(data)}

    def put(attr: str, value: Any) -> None:
        if value is not None:
            values[attr] = value

    version = data.get("bench_version")
    if version is not None:
        put("bench_version", str(version)[:32])
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


def load_bench_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Read and validate a bench YAML/JSON file (safe YAML only, size-capped)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise InputError("config file does not exist", path=p)
    if not p.is_file():
        raise InputError("not a regular file", path=p)
    size = p.stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise InputError(f"config file is {size} bytes; a bench config is at most {_MAX_CONFIG_BYTES}", path=p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read config: {exc}", path=p) from None
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {str(exc).splitlines()[0][:200]}", path=p) from None
    except RecursionError:
        raise InputError("config is nested too deeply", path=p) from None
    return config_from_mapping(data if data is not None else {}, str(p))
