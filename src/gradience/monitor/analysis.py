"""Streaming analysis of one run: fed event by event, memory bounded whatever the number of events.

``RunAnalyzer.feed(event, step, data)`` takes telemetry records (or the equivalent events derived from an HF
``trainer_state.json``); ``summary()`` returns plain dicts for the ``signals``, ``training``, ``audit`` and
``alerts`` blocks of ``gradience monitor`` (SPEC §6). Long histories are kept as evenly thinned samples
(``_Thinned``) and running medians use a fixed window, so a million-step log costs the same memory as a
thousand-step one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from gradience.monitor.guard import GuardAnalyzer
from gradience.monitor.streaming import (  # noqa: F401  (re-exported: names of this module before the split)
    HISTORY_POINTS,
    MAX_ALERT_KINDS,
    MAX_LISTED_STEPS,
    _Findings,
    _finite,
    _nonfinite_name,
    _num,
    _RunningMedian,
    _Thinned,
)
from gradience.monitor.train_steps import TrainStepAnalyzer
from gradience.monitor.trl import PLAIN_TRAIN_KEYS, TrlAnalyzer
from gradience.policy import thresholds as T
from gradience.textfmt import finite

_plain_train = PLAIN_TRAIN_KEYS.issuperset  # a train_step with no key beyond these holds no TRL metric


def ppl_from(metrics: dict[str, Any]) -> float | None:
    """Perplexity as logged, else exp(loss) (inf when the loss is too large to exponentiate)."""
    ppl = _num(metrics.get("ppl", metrics.get("perplexity")))
    if ppl is not None:
        return ppl
    loss = _num(metrics.get("loss"))
    if loss is None or math.isnan(loss):
        return None
    return math.exp(loss) if loss < 709.0 else math.inf


def accuracy_from(metrics: dict[str, Any]) -> float | None:
    """Accuracy as a fraction; values above 1 are taken as percentages."""
    acc = _num(metrics.get("accuracy", metrics.get("acc")))
    if acc is None or not math.isfinite(acc):
        return None
    return acc / 100.0 if acc > 1.0 else acc


def _is_train_split(split: str) -> bool:
    return split.lower() == "train"


def choose_test_split(splits: Iterable[str]) -> str | None:
    """``test`` if logged, else the first stand-in of TEST_SPLIT_FALLBACKS that was logged."""
    lowered = {s.lower(): s for s in splits}
    if "test" in lowered:
        return lowered["test"]
    for name in T.TEST_SPLIT_FALLBACKS:
        if name in lowered:
            return lowered[name]
    return None


def overfitting_onset(test: list[tuple[int, float]], train: list[tuple[int, float]],
                      min_rise: float = T.OVERFIT_MIN_RISE) -> dict[str, Any] | None:
    """First eval step after the test-loss minimum where test loss has risen by more than ``min_rise``
    (relative) while the train loss kept falling, provided the last test loss is still above the minimum
    by that margin (a rise that recovered is noise, not overfitting). ``train`` holds (step, train loss)
    from train evals, or smoothed train_step losses when no train split was evaluated."""
    pts = [(s, v) for s, v in test if math.isfinite(v)]
    if len(pts) < 3 or not train:
        return None
    best_i = min(range(len(pts)), key=lambda i: (pts[i][1], i))
    best_step, best_loss = pts[best_i]
    limit = best_loss + abs(best_loss) * min_rise
    if pts[-1][1] <= limit:
        return None
    onset = next(((s, v) for s, v in pts[best_i + 1:] if v > limit), None)
    if onset is None:
        return None

    def train_at(step: int) -> float | None:
        # Train loss at (or just before) ``step``; the earliest value when none is that early.
        before = [v for s, v in train if s <= step and math.isfinite(v)]
        if before:
            return before[-1]
        after = [v for s, v in train if math.isfinite(v)]
        return after[0] if after else None

    train_best, train_last = train_at(best_step), train_at(pts[-1][0])
    if train_best is None or train_last is None or not train_last < train_best:
        return None
    return {"onset_step": onset[0], "best_step": best_step, "best_test_loss": best_loss,
            "onset_test_loss": onset[1], "last_test_loss": pts[-1][1], "last_eval_step": pts[-1][0],
            "train_loss_at_best": train_best, "train_loss_last": train_last}


class RunAnalyzer:
    """Aggregates one run. Feed records in file order; call ``summary()`` at the end."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.config: dict[str, Any] | None = None
        self.meta: dict[str, Any] | None = None
        self.status: str | None = None
        self.reason: str | None = None
        self.event_counts: dict[str, int] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.train = TrainStepAnalyzer()
        self.last_eval: dict[str, dict[str, Any]] = {}  # split -> {step, metrics}
        self.eval_history: dict[str, _Thinned] = {}  # split -> (step, loss)
        self.audit: dict[str, Any] | None = None
        self.audit_step: int | None = None
        self.alert_groups: dict[tuple[str, str], dict[str, Any]] = {}
        self.alerts_total = 0
        self.logged_recommendations: list[dict[str, Any]] | None = None
        self.summary_extra: dict[str, Any] = {}
        self.guard = GuardAnalyzer()  # guard actions and NaNs hidden by HF's logging filter (monitor/guard.py)
        self.trl = TrlAnalyzer()  # TRL's trainer metrics (monitor/trl.py)

    def feed(self, event: str, step: int | None, data: dict[str, Any], ts: float | None = None) -> None:
        self.event_counts[event] = self.event_counts.get(event, 0) + 1
        if ts is not None:
            if self.first_ts is None:
                self.first_ts = ts
            self.last_ts = ts
        if event == "train_step":
            self.train.feed(step, data)
            self.guard.feed_train_step(step, data)
            if not _plain_train(data):  # fields beyond the Trainer's: maybe TRL's (a C-level test, ~0.2 us)
                self.trl.feed_train(step, data)
        elif event == "eval":
            self._feed_eval(step, data)
        elif event == "metrics":
            if data.get("kind") == "lora_audit" and isinstance(data.get("metrics"), dict):
                self.audit, self.audit_step = data["metrics"], step
            elif data.get("kind") == "guard" and isinstance(data.get("metrics"), dict):
                self.guard.feed_action(step, data["metrics"])
        elif event == "run_start":
            config = data.get("config")
            self.config = config if isinstance(config, dict) else {}
            meta = data.get("meta")
            self.meta = meta if isinstance(meta, dict) else None
            self.guard.feed_start(data)
            self.train.signatures.configure(self.config, self.meta)
        elif event == "run_end":
            status = data.get("status")
            self.status = str(status) if status is not None else None
            reason = data.get("reason")
            self.reason = str(reason) if reason is not None else None
        elif event == "alert":
            self._feed_alert(step, data)
        elif event == "recommendation":
            recs = data.get("recommendations")
            if isinstance(recs, list):
                self.logged_recommendations = [r for r in recs if isinstance(r, dict)]

    def _feed_eval(self, step: int | None, data: dict[str, Any]) -> None:
        split = data.get("split")
        metrics = data.get("metrics")
        if not isinstance(split, str) or not split:
            split = "unknown"
        if not isinstance(metrics, dict):
            # The original tool sometimes put metrics at the top level of the record.
            metrics = {k: v for k, v in data.items() if k not in ("schema", "ts", "run_id", "event", "step",
                                                                  "split")}
        self.last_eval[split] = {"step": step, "metrics": metrics}
        loss = _num(metrics.get("loss"))
        self.train.signatures.feed_eval(step, split, loss)
        self.trl.feed_eval(step, split, metrics)
        if loss is not None:
            hist = self.eval_history.get(split)
            if hist is None:
                hist = self.eval_history[split] = _Thinned()
            hist.add((step if step is not None else len(hist.items), loss))

    def _feed_alert(self, step: int | None, data: dict[str, Any]) -> None:
        self.alerts_total += 1
        severity = str(data.get("severity") or "info")
        code = str(data.get("code") or "alert")
        context = data.get("context")
        if not isinstance(context, dict):
            context = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        key = (severity, code)
        group = self.alert_groups.get(key)
        if group is None:
            if len(self.alert_groups) >= MAX_ALERT_KINDS:
                return
            group = self.alert_groups[key] = {"severity": severity, "code": code, "count": 0,
                                              "first_step": step}
        group["count"] += 1
        group["last_step"] = step
        group["message"] = str(data.get("message") or "")
        group["context"] = context

    # -- summaries -----------------------------------------------------------------------------------
    def signals(self, gap_threshold: float) -> dict[str, Any]:
        train = self.last_eval.get("train")
        test_split = choose_test_split(s for s in self.last_eval if not _is_train_split(s))
        test = self.last_eval.get(test_split) if test_split else None

        def block(split: str | None, ev: dict[str, Any] | None) -> dict[str, Any] | None:
            if ev is None:
                return None
            m = ev["metrics"]
            return {"split": split, "step": ev["step"], "loss": _num(m.get("loss")), "ppl": ppl_from(m),
                    "ppl_derived_from_loss": _num(m.get("ppl", m.get("perplexity"))) is None
                    and _num(m.get("loss")) is not None,
                    "accuracy": accuracy_from(m), "n": _num(m.get("n"))}

        train_b, test_b = block("train", train), block(test_split, test)
        train_ppl = train_b["ppl"] if train_b else None
        test_ppl = test_b["ppl"] if test_b else None
        gap = None
        if _finite(train_ppl) and _finite(test_ppl) and train_ppl and train_ppl > 0:
            assert test_ppl is not None
            gap = test_ppl / train_ppl
        return {
            "train": train_b,
            "test": test_b,
            "test_split": test_split,
            "test_split_fallback": test_split is not None and test_split.lower() != "test",
            "train_ppl": train_ppl,
            "test_ppl": test_ppl,
            "gap": gap,
            "gap_threshold": gap_threshold,
            "train_accuracy": train_b["accuracy"] if train_b else None,
            "test_accuracy": test_b["accuracy"] if test_b else None,
            "eval_splits": sorted(self.last_eval),
        }

    def training(self, test_split: str | None) -> dict[str, Any]:
        out = self.train.summary()
        onset = None
        if test_split is not None and test_split in self.eval_history:
            test_hist = self.eval_history[test_split].items
            if "train" in self.eval_history:
                onset = overfitting_onset(test_hist, self.eval_history["train"].items)
                basis = "train_eval"
            else:
                onset = overfitting_onset(test_hist, self.train.loss_history.items)
                basis = "train_step"
            if onset is not None:
                onset["train_basis"] = basis
                onset["test_split"] = test_split
        out["overfitting_onset"] = onset
        out["status"] = self.status
        out["reason"] = self.reason
        out["event_counts"] = dict(sorted(self.event_counts.items()))
        out["duration_s"] = (self.last_ts - self.first_ts) if self.first_ts is not None and \
            self.last_ts is not None else None
        out["guard"] = self.guard.summary()
        out.update(self.summary_extra)
        return out

    def audit_block(self) -> dict[str, Any] | None:
        if self.audit is None:
            return None
        a = self.audit
        adapter_raw, by_type_raw = a.get("adapter"), a.get("by_type")
        adapter: dict[str, Any] = adapter_raw if isinstance(adapter_raw, dict) else {}
        by_type: dict[str, Any] = by_type_raw if isinstance(by_type_raw, dict) else {}
        keys = ("total_lora_params", "n_layers", "stable_rank_mean", "stable_rank_median", "effective_rank_mean",
                "utilization_mean", "energy_rank_90_p50", "energy_rank_90_p90", "suggested_r_global_median",
                "suggested_r_global_90", "udr_median", "udr_mean", "udr_p90", "sdi_median",
                "fraction_udr_gt_0_3")
        out: dict[str, Any] = {"step": self.audit_step, "r": finite(adapter.get("r"))}
        for k in keys:
            out[k] = a.get(k)
        out["by_type"] = by_type
        out["adapter"] = adapter
        # Suggested ranks with their parameter cost: the audit's own figures (``global_rank_suggestions``)
        # when present, else derived - LoRA params scale linearly with r, so params at a smaller uniform rank
        # are total * r_new / r.
        r = out["r"]
        # finite(): a logged audit is input like any other; an infinite or NaN count is no count at all
        total = finite(a.get("total_lora_params"))
        given_raw = a.get("global_rank_suggestions")
        given: dict[str, Any] = given_raw if isinstance(given_raw, dict) else {}
        suggested: dict[str, Any] = {}
        for label, key in (("median", "suggested_r_global_median"), ("p90", "suggested_r_global_90")):
            r_new = finite(a.get(key))
            if r_new is None:
                continue
            item_raw = given.get(label)
            item: dict[str, Any] = item_raw if isinstance(item_raw, dict) else {}
            params = finite(item.get("params_at_suggested"))
            if params is None and total is not None and r:
                params = finite(total * r_new / r)
            ratio = _num(item.get("reduction_ratio"))
            if ratio is None and params is not None and total:
                ratio = 1.0 - params / total
            suggested[label] = {"r": int(r_new), "params": None if params is None else round(params),
                                "params_saved": None if params is None or total is None
                                else round(total - params),
                                "reduction_ratio": ratio}
        out["suggested"] = suggested
        return out

    def alerts(self) -> dict[str, Any]:
        groups = sorted(self.alert_groups.values(),
                        key=lambda g: (-_SEVERITY_ORDER.get(g["severity"], 0), g["code"]))
        return {"total": self.alerts_total, "groups": groups}


_SEVERITY_ORDER = {"critical": 3, "error": 2, "warning": 1, "info": 0}
