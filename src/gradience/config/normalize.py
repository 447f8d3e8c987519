"""Normalizing one config source (canonical, flat/alias, PEFT ``adapter_config.json``, HF ``training_args``)
into a partial ``ConfigSnapshot`` (None = not given), and merging several sources.

One alias table serves every non-canonical form, because in practice they overlap (a flat YAML config
mixes HF and PEFT key names). What differs per form is only where unknown keys are kept: top-level
``extras`` for flat/canonical, ``lora.extras`` for PEFT, ``training.extras`` for training_args.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gradience.config.coerce import (
    Where,
    plain,
    to_betas,
    to_bool,
    to_float,
    to_int,
    to_rank,
    to_str,
    to_targets,
)
from gradience.config.redact import redact_secrets
from gradience.telemetry.types import (
    TASK_PROFILES,
    ConfigSnapshot,
    LoraConfig,
    OptimizerConfig,
    TrainingConfig,
)

ConfigForm = Literal["canonical", "flat", "peft", "training_args"]
CONFIG_FORMS: tuple[str, ...] = ("canonical", "flat", "peft", "training_args")
SECTIONS = ("optimizer", "lora", "training")

_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "float": "float32", "float32": "float32", "tf32": "tf32", "auto": "auto",
    "fp64": "float64", "double": "float64", "float64": "float64", "int8": "int8", "int4": "int4",
}


def _to_dtype(value: Any, key: str, where: Where) -> str | None:
    text = to_str(value, key, where)
    if text is None:
        return None
    lowered = text.lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(lowered, text)


def _to_profile(value: Any, key: str, where: Where) -> str | None:
    if isinstance(value, Mapping):  # the {"name": ..., "inferred": ...} shape check --json writes
        value = value.get("name")
    text = to_str(value, key, where)
    if text is None:
        return None
    name = text.strip().lower().replace("-", "_").replace(" ", "_")
    if name not in TASK_PROFILES:
        raise where.error(key, f"unknown task profile {text!r} (expected one of: {', '.join(TASK_PROFILES)})")
    return name


def _to_max_steps(value: Any, key: str, where: Where) -> int | None:
    """HF semantics: only a positive max_steps overrides the epoch count (-1 is the 'unset' default)."""
    steps = to_int(value, key, where)
    return steps if steps is not None and steps > 0 else None


Coercer = Callable[[Any, str, Where], Any]


@dataclass(frozen=True)
class _Field:
    section: str | None          # None: a top-level ConfigSnapshot field; "_" prefix in name: helper value
    name: str
    coerce: Coercer
    aliases: tuple[str, ...]     # keys accepted in flat / PEFT / HF dicts, first present wins
    in_section: tuple[str, ...] = ()  # further keys accepted only inside the canonical section


FIELDS: tuple[_Field, ...] = (
    _Field(None, "model_name", to_str,
           ("model_name", "model_name_or_path", "base_model_name_or_path", "model", "base_model")),
    _Field(None, "dataset_name", to_str, ("dataset_name", "dataset", "task_name", "task")),
    _Field(None, "task_profile", _to_profile, ("task_profile", "profile")),
    _Field(None, "notes", to_str, ("notes",)),
    _Field("optimizer", "name", to_str, ("optimizer", "optim", "optimizer_name", "optimizer_type"),
           ("name", "type")),
    _Field("optimizer", "lr", to_float, ("lr", "learning_rate")),
    _Field("optimizer", "weight_decay", to_float, ("weight_decay", "wd")),
    _Field("optimizer", "betas", to_betas, ("betas", "adam_betas")),
    _Field("optimizer", "_beta1", to_float, ("adam_beta1", "beta1")),
    _Field("optimizer", "_beta2", to_float, ("adam_beta2", "beta2")),
    _Field("optimizer", "eps", to_float, ("adam_epsilon", "adam_eps", "eps", "epsilon")),
    _Field("lora", "r", to_rank, ("r", "rank", "lora_r", "lora_rank")),
    _Field("lora", "alpha", to_float, ("lora_alpha", "alpha")),
    _Field("lora", "alpha_over_r", to_float, ("alpha_over_r",)),
    _Field("lora", "target_modules", to_targets,
           ("target_modules", "targets", "lora_target_modules", "lora_targets")),
    _Field("lora", "dropout", to_float, ("lora_dropout",), ("dropout",)),
    _Field("lora", "bias", to_str, ("bias",)),
    _Field("lora", "use_rslora", to_bool, ("use_rslora", "rslora")),
    _Field("training", "seed", to_int, ("seed",)),
    _Field("training", "batch_size", to_int,
           ("per_device_train_batch_size", "batch_size", "train_batch_size", "micro_batch_size")),
    _Field("training", "gradient_accumulation", to_int,
           ("gradient_accumulation_steps", "gradient_accumulation", "grad_accum")),
    _Field("training", "max_steps", _to_max_steps, ("max_steps",)),
    _Field("training", "epochs", to_float, ("num_train_epochs", "epochs", "num_epochs")),
    _Field("training", "dtype", _to_dtype, ("torch_dtype", "dtype")),
    _Field("training", "_bf16", to_bool, ("bf16",)),
    _Field("training", "_fp16", to_bool, ("fp16",)),
)

# Keys that mark an HF TrainingArguments dump (besides output_dir, which it always has).
_TRAINING_ARGS_MARKERS = frozenset({
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "num_train_epochs", "lr_scheduler_type", "logging_steps", "save_strategy", "eval_strategy",
    "evaluation_strategy", "optim", "warmup_steps", "warmup_ratio", "max_grad_norm", "logging_dir",
})
_UNKNOWN_DESTINATION: dict[str, str | None] = {
    "canonical": None, "flat": None, "peft": "lora", "training_args": "training",
}


def detect_form(data: Mapping[str, Any]) -> ConfigForm:
    """Which of the accepted shapes a decoded config mapping has."""
    if any(isinstance(data.get(section), Mapping) for section in SECTIONS):
        return "canonical"
    if "peft_type" in data:
        return "peft"
    if "output_dir" in data and len(_TRAINING_ARGS_MARKERS.intersection(data)) >= 2:
        return "training_args"
    return "flat"


def unwrap(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A ``gradience check --json`` output (or anything with a ``config`` snapshot and a gradience schema)
    can be fed back in: use its ``config``."""
    schema = data.get("schema")
    if isinstance(schema, str) and schema.startswith("gradience.") and isinstance(data.get("config"), Mapping):
        return data["config"]
    return data


def _collect(data: Mapping[str, Any], fields: list[tuple[_Field, tuple[str, ...]]], where: Where,
             key_prefix: str) -> tuple[dict[tuple[str | None, str], Any], dict[str, Any]]:
    """Read the fields present in ``data`` (first alias present wins); return them and the unknown keys."""
    by_lower: dict[str, str] = {}
    for key in data:
        by_lower.setdefault(str(key).strip().lower(), key)
    consumed: set[str] = set()
    values: dict[tuple[str | None, str], Any] = {}
    for fld, keys in fields:
        for alias in keys:
            original = by_lower.get(alias)
            if original is None or (fld.section, fld.name) in values:
                continue  # a lower-priority alias of a field already read stays in extras
            consumed.add(original)
            value = fld.coerce(data[original], f"{key_prefix}{original}", where)
            if value is not None:
                values[(fld.section, fld.name)] = value
    unknown = {str(k): data[k] for k in data if k not in consumed}
    return values, unknown


_FLAT_FIELDS = [(f, f.aliases) for f in FIELDS]


def _section_fields(section: str) -> list[tuple[_Field, tuple[str, ...]]]:
    out = []
    for f in FIELDS:
        if f.section != section:
            continue
        keys = f.aliases + f.in_section
        if not f.name.startswith("_") and f.name not in keys:
            keys = (f.name, *keys)
        out.append((f, keys))
    return out


def normalize_source(data: Mapping[str, Any], *, form: ConfigForm | None = None, origin: str | None = None,
                     label: str = "config") -> tuple[ConfigForm, ConfigSnapshot]:
    """One source -> (its form, a partial ConfigSnapshot). ``origin`` (a file path) and ``label`` name the
    source in error messages."""
    where = Where(origin, label)
    if not isinstance(data, Mapping):
        raise where.error("<top level>", f"expected a mapping of keys to values, got {type(data).__name__}")
    data = unwrap(data)
    form = form or detect_form(data)
    extras: dict[str, dict[str, Any]] = {"": {}, "optimizer": {}, "lora": {}, "training": {}}

    top = {k: v for k, v in data.items() if not (k in SECTIONS and isinstance(v, Mapping)) and k != "extras"}
    values, unknown = _collect(top, _FLAT_FIELDS, where, "")
    destination = _UNKNOWN_DESTINATION[form] or ""
    extras[destination].update(unknown)
    if isinstance(data.get("extras"), Mapping):
        extras[""].update(data["extras"])
    if form == "canonical":
        for section in SECTIONS:
            block = data.get(section)
            if not isinstance(block, Mapping):
                continue
            inner = {k: v for k, v in block.items() if k != "extras"}
            section_values, section_unknown = _collect(inner, _section_fields(section), where, f"{section}.")
            values.update(section_values)  # the section is more specific than a top-level alias
            extras[section].update(section_unknown)
            if isinstance(block.get("extras"), Mapping):
                extras[section].update(block["extras"])

    targets = values.get(("lora", "target_modules"))
    if form == "peft" and isinstance(targets, list):
        # PEFT saves target_modules from a set, in an order that changes from process to process: sort it, as
        # the training callback does, so check and monitor show one order for one run.
        values[("lora", "target_modules")] = sorted(targets)
    cleaned = {name: redact_secrets(plain(dict(block), name or "extras", where)) for name, block in extras.items()}
    return form, _build(values, cleaned)


def _gradience_keys() -> frozenset[str]:
    keys = {"extras", "task", *SECTIONS}
    for f in FIELDS:
        keys.update(f.aliases)
        keys.update(f.in_section)
        if not f.name.startswith("_"):
            keys.add(f.name)
    return frozenset(keys)


GRADIENCE_KEYS = _gradience_keys()  # every key a config source may use for a field gradience reads
_MAX_KEYS_SCANNED = 2000            # per extras block: bounded work on hostile input


def misspelt_keys(snapshot: ConfigSnapshot, cutoff: float | None = None) -> list[dict[str, str]]:
    """Unknown keys that look like misspellings of a known one (``learnin_rate`` -> ``learning_rate``).

    Why: an unknown key is kept in ``extras`` and otherwise ignored, so a typo silently drops the value it
    meant to set. Keys a HF TrainingArguments or PEFT LoraConfig dump may hold are not misspellings. Returns
    ``{"where", "key", "closest"}`` per suspect, in block order."""
    import difflib

    from gradience.config.hf_defaults import KNOWN_FOREIGN_KEYS
    from gradience.policy.thresholds import KEY_TYPO_CUTOFF

    cutoff = KEY_TYPO_CUTOFF if cutoff is None else cutoff
    candidates = sorted(GRADIENCE_KEYS | KNOWN_FOREIGN_KEYS)
    blocks = (("extras", snapshot.extras), ("optimizer.extras", snapshot.optimizer.extras),
              ("lora.extras", snapshot.lora.extras), ("training.extras", snapshot.training.extras))
    out: list[dict[str, str]] = []
    for where, block in blocks:
        if not isinstance(block, Mapping):
            continue
        for i, key in enumerate(block):
            if i >= _MAX_KEYS_SCANNED:
                break
            name = str(key).strip().lower()
            if name in GRADIENCE_KEYS or name in KNOWN_FOREIGN_KEYS or len(name) > 64:
                continue
            close = difflib.get_close_matches(name, candidates, n=1, cutoff=cutoff)
            if close:
                out.append({"where": where, "key": str(key), "closest": close[0]})
    return out


_TRAINER_STATE_PLAN = ("train_batch_size", "max_steps", "num_train_epochs")
_TRAINER_STATE_INFO = ("global_step", "epoch", "logging_steps", "eval_steps", "save_steps")


def trainer_state_training(data: Mapping[str, Any]) -> dict[str, Any]:
    """What an HF ``trainer_state.json`` says about the training config, as a canonical config source.

    Why: a Trainer output directory often holds only ``training_args.bin`` (a pickle gradience never opens)
    next to ``trainer_state.json``. The state records the resolved plan (batch size per step, max_steps,
    epochs) and the logging cadence, but not the lr, weight decay or precision; the peak of the logged lr
    is kept as a hint (with warmup it is close to the configured lr), never as the lr itself."""
    out: dict[str, Any] = {}
    for key in _TRAINER_STATE_PLAN:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[key] = value
    info: dict[str, Any] = {}
    for key in _TRAINER_STATE_INFO:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            info[key] = value
    history = data.get("log_history")
    if isinstance(history, list):
        lrs = [e["learning_rate"] for e in history if isinstance(e, Mapping)
               and isinstance(e.get("learning_rate"), (int, float)) and not isinstance(e["learning_rate"], bool)]
        if lrs:
            info["logged_lr_peak"] = max(lrs)
        info["log_entries"] = len(history)
    if info:
        out["trainer_state"] = info
    return {"training": out}  # canonical form: what the state holds lands in training (and training.extras)


def _build(values: dict[tuple[str | None, str], Any], extras: dict[str, dict[str, Any]]) -> ConfigSnapshot:
    def get(section: str | None, name: str) -> Any:
        return values.get((section, name))

    betas = get("optimizer", "betas")
    beta1, beta2 = get("optimizer", "_beta1"), get("optimizer", "_beta2")
    if betas is None and (beta1 is not None or beta2 is not None):
        # HF's defaults fill the one that is missing.
        betas = [0.9 if beta1 is None else beta1, 0.999 if beta2 is None else beta2]

    dtype = get("training", "dtype")
    bf16, fp16 = get("training", "_bf16"), get("training", "_fp16")
    if bf16 is not None:
        extras["training"]["bf16"] = bf16
    if fp16 is not None:
        extras["training"]["fp16"] = fp16
    if dtype is None:
        dtype = "bfloat16" if bf16 else "float16" if fp16 else None

    targets = get("lora", "target_modules")
    if isinstance(targets, list):
        targets = list(dict.fromkeys(targets))  # a repeated name targets nothing more; keep the first order

    return ConfigSnapshot(
        model_name=get(None, "model_name"),
        dataset_name=get(None, "dataset_name"),
        task_profile=get(None, "task_profile"),
        notes=get(None, "notes"),
        optimizer=OptimizerConfig(name=get("optimizer", "name"), lr=get("optimizer", "lr"),
                                  weight_decay=get("optimizer", "weight_decay"), betas=betas,
                                  eps=get("optimizer", "eps"), extras=extras["optimizer"]),
        lora=LoraConfig(r=get("lora", "r"), alpha=get("lora", "alpha"),
                        alpha_over_r=get("lora", "alpha_over_r"),
                        target_modules=targets, dropout=get("lora", "dropout"),
                        bias=get("lora", "bias"), use_rslora=get("lora", "use_rslora"),
                        extras=extras["lora"]),
        training=TrainingConfig(seed=get("training", "seed"), batch_size=get("training", "batch_size"),
                                gradient_accumulation=get("training", "gradient_accumulation"),
                                max_steps=get("training", "max_steps"), epochs=get("training", "epochs"),
                                dtype=dtype, extras=extras["training"]),
        extras=extras[""],
    )


_SECTION_FIELDS = {
    "optimizer": ("name", "lr", "weight_decay", "betas", "eps"),
    "lora": ("r", "alpha", "alpha_over_r", "target_modules", "dropout", "bias", "use_rslora"),
    "training": ("seed", "batch_size", "gradient_accumulation", "max_steps", "epochs", "dtype"),
}
_TOP_FIELDS = ("model_name", "dataset_name", "task_profile", "notes")


def merge_snapshots(fill_order: list[ConfigSnapshot], overrides: ConfigSnapshot | None = None) -> ConfigSnapshot:
    """Each value comes from the first snapshot in ``fill_order`` that has it; ``overrides`` win over all.
    Extras merge key by key with the same precedence. ``alpha_over_r`` is recomputed from the result."""
    ordered = ([overrides] if overrides is not None else []) + list(fill_order)
    merged = ConfigSnapshot()

    def first(objects: list[Any], name: str) -> Any:
        for obj in objects:
            value = getattr(obj, name)
            if value is not None:
                return value
        return None

    def merged_extras(objects: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for obj in reversed(objects):
            out.update(obj.extras)
        return out

    for name in _TOP_FIELDS:
        setattr(merged, name, first(ordered, name))
    merged.extras = merged_extras(ordered)
    for section, names in _SECTION_FIELDS.items():
        blocks = [getattr(snap, section) for snap in ordered]
        target = getattr(merged, section)
        for name in names:
            setattr(target, name, first(blocks, name))
        target.extras = merged_extras(blocks)

    lora = merged.lora
    if isinstance(lora.r, (int, float)) and lora.r > 0:
        if lora.alpha is None and lora.alpha_over_r is not None:
            lora.alpha = lora.alpha_over_r * lora.r
        if lora.alpha is not None:
            lora.alpha_over_r = lora.alpha / lora.r
    elif lora.alpha is not None:
        lora.alpha_over_r = None
    return merged
