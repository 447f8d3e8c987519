"""The reference tool's bench YAML keys, mapped onto ours (issue 17 item 4).

Why a table: johntnanney/gradience's bench (``gradience/bench/protocol.py`` and ``task_profiles/*.py``)
reads keys under other names (``train.learning_rate``, ``train.train_samples``, ``task.eval_max_samples``,
``compression.variants_to_test`` ...). A user switching tools keeps their YAML: every key that code reads is
accepted here *with the same meaning*, and every key it never reads (``run_type``, ``metadata``,
``hypothesis``, ``env``, ``output`` ...) is dropped with one warning line — silently ignoring it would
pretend it did something, refusing it would break configs the reference runs. Anything else is still an
unknown key (a typo), refused with the closest known key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradience.bench.config_values import show
from gradience.errors import InputError

# Where each reference alias goes in our schema: (section, key) -> (section, key); "" is the top level.
# Source: protocol.py (run_bench_protocol, load/prepare functions) and task_profiles/{seqcls_glue,gsm8k_causal_lm}.py.
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("", "seed"): ("train", "seed"),                          # top level, beside train.seed in its configs
    ("train", "learning_rate"): ("train", "lr"),              # gsm8k_causal_lm.py: learning_rate
    ("train", "train_samples"): ("task", "max_train_samples"),  # both profiles: select(range(train_samples))
    ("train", "eval_samples"): ("task", "max_eval_samples"),    # seqcls_glue.py: validation subset
    ("task", "eval_max_samples"): ("task", "max_eval_samples"),  # gsm8k_causal_lm.py: eval subset
    ("train", "torch_dtype"): ("model", "torch_dtype"),       # gsm8k_causal_lm.py: bf16 training
    ("compression", "seeds"): ("", "seeds"),                  # protocol.py: multi-seed bench
    ("compression", "variants_to_test"): ("", "arms"),        # protocol.py: the variants run
}

# The reference's variants are all retrained (protocol.py generate_compression_configs); ours by name.
VARIANTS: dict[str, str | None] = {"uniform_median": "retrain_median", "uniform_p90": "retrain_p90",
                                   "per_layer": "retrain_per_layer", "per_layer_shuffled": "retrain_shuffled",
                                   "probe": None}  # the probe always runs

# model.type / task.profile (task_profiles/registry.py) -> our task type (and what the profile implies).
MODEL_TYPES = {"seqcls": "classification", "classification": "classification", "causal_lm": "causal_lm"}
PROFILES: dict[str, dict[str, Any]] = {
    "seqcls_glue": {"type": "classification"},
    "gsm8k_causal_lm": {"type": "causal_lm", "exact_match": True, "text_column": "question",
                        "answer_column": "answer"},
}

# Keys the reference's code never reads: accepted with a warning (its own configs carry them).
IGNORED: dict[str, tuple[str, ...] | None] = {
    "run_type": None, "metadata": None, "hypothesis": None, "env": None, "output": None, "bench": None,
    "multi_seed": None, "limitations": None, "next_steps": None, "usage_notes": None,
    "train": ("batch_size", "num_epochs", "max_length", "warmup_steps", "seeds", "report_to"),
    "model": ("device",),
    "compression": ("variants",),
}


def reference_keys(section: str) -> tuple[str, ...]:
    """The reference's own names in ``section`` ("" for the top level): offered as "did you mean" too."""
    names = [key for (sec, key) in ALIASES if sec == section]
    if section == "":
        names += [key for key, sub in IGNORED.items() if sub is None]
    else:
        names += list(IGNORED.get(section) or ())
        names += {"model": ["type"], "task": ["profile"]}.get(section, [])
    return tuple(names)


def _conflict(source: str, a: str, b: str, va: Any, vb: Any) -> InputError:
    return InputError(f"{a} ({show(va)}) and {b} ({show(vb)}) say different things; keep one", path=source)


def translate(data: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The config with reference aliases moved to our keys and ignored keys removed; returns (config, ignored)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    ignored: list[str] = []
    for key, sub in IGNORED.items():
        if key not in out:
            continue
        if sub is None:
            out.pop(key)
            ignored.append(key)
        elif isinstance(out[key], dict):
            for subkey in sub:
                if subkey in out[key]:
                    out[key].pop(subkey)
                    ignored.append(f"{key}.{subkey}")
    for (sec, key), (to_sec, to_key) in ALIASES.items():
        holder = out if not sec else out.get(sec)
        if not isinstance(holder, dict) or key not in holder:
            continue
        value = holder.pop(key)
        if sec == "compression" and key == "variants_to_test":
            value = _variants(value, source)
        target = out if not to_sec else out.setdefault(to_sec, {})
        if target is None:
            target = out[to_sec] = {}
        if not isinstance(target, dict):
            continue  # the section's own type error is reported by the strict check
        name_from = f"{sec}.{key}" if sec else key
        name_to = f"{to_sec}.{to_key}" if to_sec else to_key
        if to_key in target and target[to_key] is not None and value is not None and target[to_key] != value:
            raise _conflict(source, name_from, name_to, value, target[to_key])
        if value is not None:
            target[to_key] = value
    _task_type(out, source)
    return out, ignored


def _variants(value: Any, source: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 64:
        raise InputError("compression.variants_to_test: expected a list of variant names", path=source)
    arms: list[str] = []
    for item in items:
        if not isinstance(item, str) or item not in VARIANTS:
            raise InputError(f"compression.variants_to_test: unknown variant {show(item)} (the reference's "
                             f"variants: {', '.join(VARIANTS)})", path=source)
        arm = VARIANTS[item]
        if arm is not None and arm not in arms:
            arms.append(arm)
    if not arms:
        raise InputError("compression.variants_to_test: names no variant besides the probe", path=source)
    return arms


def _task_type(out: dict[str, Any], source: str) -> None:
    """``model.type`` and ``task.profile`` decide the task type (and, for gsm8k, exact match on question/answer)."""
    model, task = out.get("model"), out.get("task")
    implied: dict[str, Any] = {}
    mtype: Any = None
    if isinstance(model, dict) and "type" in model:
        mtype = model.pop("type")
        if not isinstance(mtype, str) or mtype not in MODEL_TYPES:
            raise InputError(f"model.type: {show(mtype)}: choose from {', '.join(MODEL_TYPES)}", path=source)
        implied["type"] = MODEL_TYPES[mtype]
    if isinstance(task, dict) and "profile" in task:
        profile = task.pop("profile")
        if not isinstance(profile, str) or profile not in PROFILES:
            raise InputError(f"task.profile: {show(profile)}: choose from {', '.join(PROFILES)}", path=source)
        for key, value in PROFILES[profile].items():
            if key in implied and implied[key] != value:
                raise _conflict(source, "task.profile", "model.type", profile, mtype)
            implied[key] = value
    if not implied:
        return
    task = out.setdefault("task", {}) if out.get("task") is None else out["task"]
    if task is None or not isinstance(task, dict):
        return
    out["task"] = task
    for key, value in implied.items():
        if key in task and task[key] is not None and task[key] != value:
            raise _conflict(source, f"task.{key}", "model.type / task.profile", task[key], value)
        task.setdefault(key, value)
