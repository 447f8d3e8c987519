"""Metric names of other loggers -> the run events of ``run.jsonl`` (``train_step`` / ``eval``).

TensorBoard tags, W&B history keys, W&B exports and LLaMA-Factory's ``trainer_log.jsonl`` all carry the
Trainer's ``log()`` dicts under a few spellings. Why one mapper: every reader must give the analyzer the same
events a Gradience-instrumented run would, so ``monitor`` (story, gates, ``--json``, ``report``) runs unchanged.

Spellings (sources):
- transformers ``integrations/integration_utils.py`` ``rewrite_logs``: ``eval_X`` -> ``eval/X``, ``test_X``
  -> ``test/X``, anything else -> ``train/X`` (TensorBoardCallback and WandbCallback both use it; W&B rows add
  ``train/global_step``).
- ``trainer_state.json`` ``log_history`` / LLaMA-Factory ``trainer_log.jsonl``: bare ``loss``, ``learning_rate``
  (LLaMA-Factory: ``lr``), ``grad_norm``, ``epoch``, ``eval_loss``.
- TRL's trainers (huggingface/trl ``trl/trainer/{sft,dpo,kto,grpo,rloo,reward}_trainer.py``): each ``log()``
  averages ``self._metrics[mode]`` into the Trainer's dict (eval ones as ``eval_<name>``), so they arrive as
  ``train/<name>`` / ``eval/<name>``. The eval ones are eval metrics like any other (``eval/rewards/margins``
  reaches the eval split's metrics); the train ones ride in the ``train_step`` under TRL's name
  (``rewards/margins``), read by ``monitor/trl.py`` only, and are listed as known TRL metrics (a ``known_tag``
  issue), not as unknown.
Tags that map to nothing are counted and listed (an ``unknown_tag`` issue), never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradience.issues import Issue

Event = tuple[str, int | None, dict[str, Any]]

# Trainer log key -> train_step field.
TRAIN_FIELDS: dict[str, str] = {"loss": "loss", "learning_rate": "lr", "lr": "lr", "grad_norm": "grad_norm",
                                "epoch": "epoch"}
# Keys of the Trainer's end-of-training summary entry (not a train step).
SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                          "train_loss"})
# Bookkeeping keys of the loggers themselves: neither a metric nor unknown.
IGNORED_KEYS = frozenset({"global_step", "_step", "_runtime", "_timestamp", "_wandb", "Step", "step",
                          "current_steps", "total_steps", "percentage", "elapsed_time", "remaining_time",
                          "throughput", "total_tokens", "num_input_tokens_seen"})
MAX_UNKNOWN_LISTED = 50
# TRL's per-step metrics (names as in ``self._metrics[mode]["<name>"]`` of each trainer, huggingface/trl main,
# July 2026): known, carried by no train_step field. Eval ones (``eval/<name>``) are eval metrics.
TRL_TRAIN_METRICS: dict[str, str] = {
    **dict.fromkeys(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected", "logits/chosen", "logits/rejected"), "trl/trainer/dpo_trainer.py"),
    **dict.fromkeys(("kl",), "trl/trainer/kto_trainer.py"),
    **dict.fromkeys(("entropy", "mean_token_accuracy", "num_tokens", "aux_loss"), "trl/trainer/sft_trainer.py"),
    **dict.fromkeys(("reward", "reward_std", "frac_reward_zero_std", "clip_ratio", "cispo_clip_ratio", "policy_loss",
                     "entropy_coef", "step_time"), "trl/trainer/grpo_trainer.py"),
    **dict.fromkeys(("accuracy", "margin", "mean_reward", "min_reward", "max_reward"),
                    "trl/trainer/reward_trainer.py"),
}
# Families of TRL metric names (GRPO/RLOO: ``completions/mean_length``, ``clip_ratio/low_mean``,
# ``rewards/<reward func>/mean``, ``sampling/importance_sampling_ratio/max``, ``tools/call_frequency`` ...).
TRL_TRAIN_PREFIXES: tuple[str, ...] = ("rewards/", "logps/", "logits/", "completions/", "clip_ratio/", "sampling/",
                                       "tools/", "vespo/")
MAX_KNOWN_LISTED = 200


def is_trl_metric(name: str) -> bool:
    """A metric TRL's trainers log (its name without the ``train/`` prefix)."""
    return name in TRL_TRAIN_METRICS or name.startswith(TRL_TRAIN_PREFIXES)


def classify(key: str) -> tuple[str, str | None, str]:
    """``(kind, split, name)``: kind is ``train`` / ``eval`` / ``summary`` / ``ignored`` / ``known`` (a
    TRL metric no event carries) / ``unknown``."""
    if key.startswith("train/"):
        rest = key[len("train/"):]
        if rest in TRAIN_FIELDS:
            return "train", None, TRAIN_FIELDS[rest]
        if rest in SUMMARY_KEYS:
            return "summary", None, rest
        if rest in IGNORED_KEYS:
            return "ignored", None, key
        return ("known" if is_trl_metric(rest) else "unknown"), None, key
    if key.startswith("eval/"):
        return _eval(key[len("eval/"):])
    if key.startswith("eval_"):
        return _eval(key[len("eval_"):])
    if key.startswith("test/"):
        return "eval", "test", key[len("test/"):]
    if key in TRAIN_FIELDS:
        return "train", None, TRAIN_FIELDS[key]
    if key in SUMMARY_KEYS:
        return "summary", None, key
    if key in IGNORED_KEYS:
        return "ignored", None, key
    return ("known" if is_trl_metric(key) else "unknown"), None, key


def _eval(rest: str) -> tuple[str, str | None, str]:
    """An eval metric; its split is resolved per log call at ``flush`` (``eval/<name>_loss`` from a dict of
    eval datasets makes ``<name>`` a split, as in the trainer_state reader)."""
    if rest in ("epoch", "global_step"):
        return "ignored", None, rest
    return "eval", None, rest


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


@dataclass(slots=True)
class EventBuilder:
    """Scalars in log order -> events. Values logged at one step form one log call (the Trainer writes a
    call's scalars together), so a group is closed when the step changes or ``flush`` is called (W&B: one
    history row). Constant memory: only the open group is held."""

    summary: dict[str, Any] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    unknown_more: int = 0
    known: dict[str, int] = field(default_factory=dict)
    train_fields: dict[str, str] = field(default_factory=dict)  # tag -> train_step field, for readers' fast paths
    mapped: set[str] = field(default_factory=set)
    bad_values: int = 0
    _step: int | None = None
    _open: bool = False
    _train: dict[str, Any] = field(default_factory=dict)
    _evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    _eval_raw: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)

    def add(self, key: str, step: int | None, value: Any) -> list[Event] | tuple[()]:
        """Add one scalar; returns the events of the group it closed (usually none: an empty tuple)."""
        out: list[Event] | tuple[()] = self.flush() if self._open and step != self._step else ()
        self._open, self._step = True, step
        cached = self._cache.get(key)
        if cached is not None and cached[0] == "train" and type(value) is float:  # the common case, fast
            self._train[cached[2]] = value
            return out
        kind, split, name = cached or self._classify(key)
        if kind == "unknown":
            if key in self.unknown:
                self.unknown[key] += 1
            elif len(self.unknown) < MAX_UNKNOWN_LISTED:
                self.unknown[key] = 1
            else:
                self.unknown_more += 1
            return out
        if kind == "known":
            if key in self.known or len(self.known) < MAX_KNOWN_LISTED:
                self.known[key] = self.known.get(key, 0) + 1
            number = _number(value)  # carried in the train_step under TRL's name (monitor/trl.py reads it)
            if number is not None:
                self._train[name[len("train/"):] if name.startswith("train/") else name] = number
            return out
        if kind == "ignored":
            return out
        number = _number(value)
        if number is None:
            self.bad_values += 1
            return out
        if kind == "train":
            self._train[name] = number
        elif kind == "eval" and split is None:
            self._eval_raw["eval_" + name] = number
        elif kind == "eval":
            self._evals.setdefault(split or "eval", {})[name] = number
        else:
            self.summary[name] = number
        return out

    def _classify(self, key: str) -> tuple[str, str | None, str]:
        result = classify(key)
        if len(self._cache) < 10_000:  # bounded: a log with millions of distinct tags is hostile, not slow
            self._cache[key] = result
            if result[0] == "train":
                self.train_fields[key] = result[2]
        if result[0] in ("train", "eval", "summary") and len(self.mapped) < 1000:
            self.mapped.add(key)
        return result

    def flush(self) -> list[Event]:
        """Close the open group: its train_step (when it holds more than an epoch), then its evals."""
        out: list[Event] = []
        if self._eval_raw:
            from gradience.monitor.sources import _split_eval_entry

            for split, metrics in _split_eval_entry(self._eval_raw).items():
                self._evals.setdefault(split, {}).update(metrics)
        train = self._train
        if len(train) > 1 or (train and "epoch" not in train):  # more than an epoch
            out.append(("train_step", self._step, self._train))
        for split, metrics in self._evals.items():
            out.append(("eval", self._step, {"split": split, "metrics": metrics}))
        self._train, self._evals, self._eval_raw, self._open = {}, {}, {}, False
        return out

    def issues(self) -> list[Issue]:
        """The tags nothing maps to (listed, with counts) and values that were not numbers."""
        out: list[Issue] = []
        if self.unknown:
            names = ", ".join(sorted(self.unknown)[:10])
            more = len(self.unknown) - 10 + (1 if self.unknown_more else 0)
            out.append(Issue("unknown_tag", f"{len(self.unknown)}{'+' if self.unknown_more else ''} logged "
                             f"metric(s) not used by monitor: {names}{' …' if more > 0 else ''}",
                             severity="info", extra={"tags": dict(sorted(self.unknown.items())),
                                                     "values_not_listed": self.unknown_more}))
        if self.known:
            names = ", ".join(sorted(self.known)[:10])
            out.append(Issue("known_tag", f"{len(self.known)} TRL metric(s), summarised in monitor's trl block: {names}"
                             f"{' …' if len(self.known) > 10 else ''}", severity="info",
                             extra={"tags": dict(sorted(self.known.items()))}))
        if self.bad_values:
            out.append(Issue("bad_log_entry", f"{self.bad_values} logged value(s) are not numbers; ignored"))
        return out

