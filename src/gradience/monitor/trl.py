"""TRL's own trainer metrics (DPO/KTO, GRPO/RLOO, SFT, reward modelling) in monitor's story: facts, no rule.

Why: the Trainer's loss alone does not tell a preference or RL run's story; its user watches the reward margins
and accuracies, the policy's reward, KL, entropy, clipping and completion lengths that TRL logs. These arrive as
``train_step`` fields and ``eval`` metrics under TRL's names (``gradience.telemetry.logmap.is_trl_metric``, which
cites trl/trainer/{sft,dpo,kto,grpo,rloo,reward}_trainer.py). They are summarised per name - first, last, min,
max (with their steps) and the trend of the last window (``train_steps.window_trend``, the loss's rule) - train
and each eval split apart. No advice is derived: published thresholds for these signals are lacking, so none is
invented. DPO's ``rewards/accuracies`` is never fed in as ``accuracy`` (the underfit rule reads that one).
Memory is bounded: a fixed number of names per side, O(1) state per name.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gradience.monitor.train_steps import window_trend
from gradience.policy import thresholds as T
from gradience.telemetry.logmap import _number, is_trl_metric
from gradience.textfmt import safe_text

MAX_NAMES = 64          # TRL metric names summarised per side (train, each eval split); the rest are counted
MAX_EVAL_SPLITS = 16    # eval splits with a TRL summary

# Train-step fields and record envelope keys that are not TRL's: a train_step holding only these has none
# (a C-level subset test keeps the million-step hot path cheap).
PLAIN_TRAIN_KEYS = frozenset({"loss", "lr", "learning_rate", "grad_norm", "epoch", "tokens", "samples",
                              "wall_time_s", "schema", "ts", "run_id", "event", "step"})
# Eval metric names the core signals read (loss, perplexity, accuracy, n): not TRL's, even where a TRL trainer
# logs the same name (RewardTrainer's eval ``accuracy`` is the Test Acc signal already).
_CORE_EVAL_KEYS = frozenset({"loss", "ppl", "perplexity", "accuracy", "acc", "n"})

# Groups by the TRL trainers that log each name (huggingface/trl, trl/trainer/*_trainer.py, ``self._metrics``).
# A name logged by several trainers sits in "shared". Order: how text lists the groups.
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("preference", "DPO/KTO", "trl/trainer/dpo_trainer.py, trl/trainer/kto_trainer.py"),
    ("online_rl", "GRPO/RLOO", "trl/trainer/grpo_trainer.py, trl/trainer/rloo_trainer.py"),
    ("reward_model", "RewardTrainer", "trl/trainer/reward_trainer.py; in LLaMA-Factory's trainer_log.jsonl, "
     "`accuracy` is DPO's rewards/accuracies (llamafactory/train/callbacks.py, LogCallback.on_log)"),
    ("shared", "SFT and several trainers", "trl/trainer/sft_trainer.py (also dpo, kto, grpo, rloo)"),
    ("other", "other TRL names", "trl/trainer/*_trainer.py"),
)
_PREFERENCE = frozenset({"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"})
_ONLINE_RL = frozenset({"reward", "reward_std", "frac_reward_zero_std", "cispo_clip_ratio", "policy_loss",
                        "entropy_coef", "step_time"})
_ONLINE_RL_PREFIXES = ("completions/", "clip_ratio/", "sampling/", "tools/", "vespo/", "rewards/")
_REWARD_MODEL = frozenset({"accuracy", "margin", "mean_reward", "min_reward", "max_reward"})
_SHARED = frozenset({"entropy", "mean_token_accuracy", "num_tokens", "aux_loss", "kl"})
# Shown first in text (what a user of each trainer looks at), then the rest by name.
HEADLINE = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "reward", "reward_std",
            "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length", "mean_token_accuracy",
            "num_tokens", "accuracy", "margin")


def group_of(name: str) -> str:
    """The group of a TRL metric name (see GROUPS)."""
    if name in _PREFERENCE or name.startswith(("logps/", "logits/")):
        return "preference"
    if name in _ONLINE_RL or name.startswith(_ONLINE_RL_PREFIXES):  # rewards/<reward func>/mean: GRPO/RLOO
        return "online_rl"
    if name in _REWARD_MODEL:
        return "reward_model"
    if name in _SHARED:
        return "shared"
    return "other"


class _Series:
    """One metric over steps: first/last/min/max of the finite values (with steps), non-finite count, and the
    last trend window."""

    __slots__ = ("first", "first_step", "last", "last_step", "max", "max_step", "min", "min_step", "n",
                 "nonfinite", "window")

    def __init__(self) -> None:
        self.n = 0
        self.nonfinite = 0
        self.first: float | None = None
        self.first_step: int | None = None
        self.last: float | None = None
        self.last_step: int | None = None
        self.min: float | None = None
        self.min_step: int | None = None
        self.max: float | None = None
        self.max_step: int | None = None
        self.window: deque[tuple[int, float]] = deque(maxlen=T.LOSS_TREND_WINDOW)

    def add(self, step: int, value: float) -> None:
        self.n += 1
        if not math.isfinite(value):
            self.nonfinite += 1
            return
        if self.first is None:
            self.first, self.first_step = value, step
        self.last, self.last_step = value, step
        if self.min is None or value < self.min:
            self.min, self.min_step = value, step
        if self.max is None or value > self.max:
            self.max, self.max_step = value, step
        self.window.append((step, value))

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "nonfinite": self.nonfinite, "first": self.first, "first_step": self.first_step,
                "last": self.last, "last_step": self.last_step, "min": self.min, "min_step": self.min_step,
                "max": self.max, "max_step": self.max_step, "trend": _trend(list(self.window))}


def _trend(pts: list[tuple[int, float]]) -> dict[str, Any] | None:
    """The loss's trend rule plus ``change``: the fitted change across the window in the metric's own units (its
    ``relative_change`` divides by the window's mean, meaningless for margins and rewards near zero)."""
    trend = window_trend(pts)
    if trend is not None:
        trend["change"] = trend["slope_per_step"] * (trend["to_step"] - trend["from_step"])
    return trend


class _Side:
    """The TRL metrics of one side (train steps, or one eval split), bounded to MAX_NAMES names."""

    def __init__(self) -> None:
        self.series: dict[str, _Series] = {}
        self.not_listed: set[str] = set()
        self.records = 0
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, step: int, values: list[tuple[str, float]]) -> None:
        self.records += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        for name, value in values:
            series = self.series.get(name)
            if series is None:
                if len(self.series) >= MAX_NAMES:
                    if len(self.not_listed) < 10_000:
                        self.not_listed.add(name)
                    continue
                series = self.series[name] = _Series()
            series.add(step, value)

    def to_dict(self) -> dict[str, Any]:
        groups: dict[str, list[str]] = {}
        for name in sorted(self.series):
            groups.setdefault(group_of(name), []).append(name)
        return {"records": self.records, "first_step": self.first_step, "last_step": self.last_step,
                "metrics": {name: self.series[name].to_dict() for name in sorted(self.series)},
                "groups": {g: groups[g] for g, _, _ in GROUPS if g in groups},
                "names_not_listed": len(self.not_listed)}


class TrlAnalyzer:
    """TRL metrics of one run, fed from ``RunAnalyzer`` (train_step fields, eval metrics)."""

    def __init__(self) -> None:
        self.train = _Side()
        self.evals: dict[str, _Side] = {}
        self._is_trl: dict[str, bool] = {}
        self._index = 0

    def _trl(self, name: str) -> bool:
        known = self._is_trl.get(name)
        if known is None:
            known = is_trl_metric(name)
            if len(self._is_trl) < 10_000:  # bounded: a log with millions of distinct keys is hostile
                self._is_trl[name] = known
        return known

    def _values(self, data: dict[str, Any], skip: frozenset[str]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        for key, value in data.items():
            if key in skip or not isinstance(key, str) or not self._trl(key):
                continue
            number = _number(value)
            if number is not None:
                out.append((key, number))
        return out

    def feed_train(self, step: int | None, data: dict[str, Any]) -> None:
        """A train_step that holds keys beyond the Trainer's (the caller tests that, cheaply)."""
        self._index += 1
        values = self._values(data, PLAIN_TRAIN_KEYS)
        if values:
            self.train.add(step if step is not None else self._index, values)

    def feed_eval(self, step: int | None, split: str, metrics: dict[str, Any]) -> None:
        values = self._values(metrics, _CORE_EVAL_KEYS)
        if not values:
            return
        side = self.evals.get(split)
        if side is None:
            if len(self.evals) >= MAX_EVAL_SPLITS:
                return
            side = self.evals[split] = _Side()
        side.add(step if step is not None else side.records + 1, values)

    def summary(self) -> dict[str, Any] | None:
        """The ``trl`` block of ``monitor --json``; None when the run logged no TRL metric."""
        if not self.train.series and not self.evals:
            return None
        train = self.train.to_dict() if self.train.series else None
        evals = {split: self.evals[split].to_dict() for split in sorted(self.evals)}
        present = {g for side in [train, *evals.values()] if side for g in side["groups"]}
        return {"train": train, "eval": evals,
                "groups": {g: {"trainers": label, "source": source} for g, label, source in GROUPS
                           if g in present},
                "note": "TRL's logged metrics as facts (first/last/min/max, trend of the last "
                        f"{T.LOSS_TREND_WINDOW} points); no advice is derived from them"}


MAX_TEXT_METRICS = 12  # metric lines per side in text; all are in --json


def _value(x: Any) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, ".4g")


def _metric_line(name: str, m: dict[str, Any], width: int) -> str:
    trend = m.get("trend")
    how = "-" if not trend else \
        f"{trend['direction']} ({trend['change']:+.4g} over steps {trend['from_step']}-{trend['to_step']})"
    bad = f"; non-finite {m['nonfinite']}" if m.get("nonfinite") else ""
    return (f"    {safe_text(name, max_len=60):<{width}} last {_value(m.get('last'))} @ {m.get('last_step')}"
            f" (first {_value(m.get('first'))}, min {_value(m.get('min'))} @ {m.get('min_step')}, "
            f"max {_value(m.get('max'))} @ {m.get('max_step')}); trend {how}{bad}")


def _side_lines(title: str, side: dict[str, Any], groups: dict[str, Any]) -> list[str]:
    metrics: dict[str, Any] = side.get("metrics") or {}
    labels = ", ".join(str(groups.get(g, {}).get("trainers", g)) for g in side.get("groups") or {})
    first, last = side.get("first_step"), side.get("last_step")
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    lines = [f"  {title} ({steps}; {labels}):"]
    order = [n for n in HEADLINE if n in metrics] + sorted(n for n in metrics if n not in HEADLINE)
    shown = order[:MAX_TEXT_METRICS]
    width = min(max((len(n) for n in shown), default=0), 40)
    lines += [_metric_line(name, metrics[name], width) for name in shown]
    more = len(order) - len(shown) + int(side.get("names_not_listed") or 0)
    if more > 0:
        lines.append(f"    … {more} more TRL metric(s) (see --json)")
    return lines


def trl_lines(block: dict[str, Any] | None) -> list[str]:
    """The ``TRL metrics:`` text section (none when the run logged no TRL metric)."""
    if not block:
        return []
    groups: dict[str, Any] = block.get("groups") or {}
    lines = ["TRL metrics (as logged; no advice derived):"]
    if block.get("train"):
        lines += _side_lines("train", block["train"], groups)
    for split, side in (block.get("eval") or {}).items():
        lines += _side_lines(f"eval split '{safe_text(split, max_len=60)}'", side, groups)
    return lines
