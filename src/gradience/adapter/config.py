"""Reading ``adapter_config.json`` and deriving each module's rank and scale exactly as PEFT does.

PEFT builds a module's LoRA layer from its *pattern* values: ``rank_pattern`` / ``alpha_pattern`` are looked up
with the module's path in the base model (``model.layers.0.self_attn.q_proj``); a pattern key matches when the
whole path matches the regular expression ``(.*\\.)?(<key>)$`` (so ``q_proj`` matches every q_proj and
``layers.0.self_attn.q_proj`` only that one), and the first matching key in the mapping's order wins. The scale
is then ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). This module reproduces those semantics so that
audit magnitudes, rank suggestions and compressed adapters agree with what PEFT will actually run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from gradience.errors import InputError
from gradience.issues import Issue

CONFIG_FILENAME = "adapter_config.json"
# A PEFT adapter config is a few KB; anything this large is not one (and must not be read into memory).
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse an ``adapter_config.json``; unreadable, oversized or non-JSON-object files raise ``InputError``."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"adapter config is {size} bytes, too large to be a PEFT adapter_config.json", path)
        with open(path, "rb") as fh:
            raw = fh.read()
    except IsADirectoryError:
        raise InputError("adapter config is a directory, not a JSON file", path) from None
    except FileNotFoundError:
        raise InputError("adapter config not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read adapter config: {exc.strerror or exc}", path) from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"adapter config is not valid JSON ({exc})", path) from None
    if not isinstance(config, dict):
        raise InputError(f"adapter config is not a JSON object (found {type(config).__name__})", path)
    return config


@lru_cache(maxsize=1024)
def _compiled(key: str) -> re.Pattern[str] | None:
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return None


def _literal_match(key: str, module_name: str) -> bool:
    return module_name == key or module_name.endswith("." + key)


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first key of a ``rank_pattern``/``alpha_pattern`` that PEFT would apply to ``module_name``, or None.

    A key that is not a valid regular expression (PEFT itself would crash on it) is compared literally.
    """
    for key in pattern_keys:
        rx = _compiled(key)
        if (rx.match(module_name) is not None) if rx is not None else _literal_match(key, module_name):
            return key
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern(config: Mapping[str, Any], field_name: str, issues: list[Issue], module_name: str) -> dict[str, Any]:
    value = config.get(field_name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        issues.append(Issue("invalid_config", f"adapter config field '{field_name}' is not an object; ignored",
                            modules=[module_name]))
        return {}
    bad = [k for k in value if _compiled(str(k)) is None]
    if bad:
        issues.append(Issue("invalid_pattern",
                            f"{field_name} keys that are not valid regular expressions are matched literally: "
                            + ", ".join(map(str, bad)), modules=[module_name]))
    return {str(k): v for k, v in value.items()}


def module_rank(config: Mapping[str, Any], module_name: str) -> int | None:
    """The rank the config assigns to ``module_name`` (``rank_pattern`` first, then ``r``); None when unknown."""
    rank_pattern = _pattern(config, "rank_pattern", [], module_name)
    key = pattern_key(rank_pattern, module_name)
    value = rank_pattern[key] if key is not None else config.get("r")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def module_scale(config: Mapping[str, Any], module_name: str, r: int) -> tuple[float | None, float, list[Issue]]:
    """(alpha, scale, issues) for one module whose factors have rank ``r``, with PEFT's semantics.

    ``alpha`` comes from the first matching ``alpha_pattern`` key, else ``lora_alpha``. ``r`` is the rank of the
    stored factors (the shapes win over the config; equal to PEFT's pattern rank for a consistent adapter). When no
    alpha is known the scale is 1 and an ``unscaled`` issue says that magnitudes are unscaled. Issues carry
    ``modules=[module_name]`` and module-independent messages, so callers can merge them across modules.
    """
    if r <= 0:
        raise ValueError(f"rank must be positive, got {r}")
    issues: list[Issue] = []
    alpha_pattern = _pattern(config, "alpha_pattern", issues, module_name)
    key = pattern_key(alpha_pattern, module_name)
    source = f"alpha_pattern[{key!r}]" if key is not None else "lora_alpha"
    raw_alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha")
    if raw_alpha is None:
        reason = "the adapter config has no lora_alpha" if config else "no adapter_config.json"
        issues.append(Issue("unscaled", f"LoRA alpha is unknown ({reason}); magnitudes are unscaled (scale = 1)",
                            modules=[module_name]))
        return None, 1.0, issues
    if not _is_number(raw_alpha):
        issues.append(Issue("unscaled", f"{source} is not a finite number ({raw_alpha!r}); magnitudes are unscaled "
                                        "(scale = 1)", modules=[module_name]))
        return None, 1.0, issues
    alpha = float(raw_alpha)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        issues.append(Issue("invalid_config", f"use_rslora is not a boolean ({use_rslora!r}); treated as "
                                              f"{bool(use_rslora)}", modules=[module_name]))
        use_rslora = bool(use_rslora)
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    return alpha, scale, issues


def merge_issues(issues: Iterable[Issue]) -> list[Issue]:
    """Fold issues that share code and message into one whose ``modules`` lists every module (first-seen order)."""
    merged: dict[tuple[str, str], Issue] = {}
    for issue in issues:
        slot = (issue.code, issue.message)
        seen = merged.get(slot)
        if seen is None:
            merged[slot] = Issue(issue.code, issue.message, issue.severity,
                                 None if issue.modules is None else list(issue.modules), issue.line,
                                 dict(issue.extra))
            continue
        if issue.modules:
            known = set(seen.modules or [])
            seen.modules = (seen.modules or []) + [m for m in issue.modules if m not in known]
    return list(merged.values())


# ``init_lora_weights`` values whose initialisation rewrites the base weight (W ← W − s·B₀A₀, or a quantized W
# for LoftQ), so the saved factors hold components of W itself, not a change to it. ``pissa`` also comes as
# ``pissa_niter_<n>``. ``eva``, ``gaussian``, ``orthogonal``, ``mica`` and booleans leave the base untouched.
_MUTATED_BASE_INITS = ("olora", "corda", "loftq", "lora_ga")
_MUTATED_BASE_PREFIXES = ("pissa",)


def mutated_base_init(config: Mapping[str, Any]) -> str | None:
    """The ``init_lora_weights`` value when the adapter was initialised by mutating the base (PiSSA, OLoRA, CorDA,
    LoftQ, LoRA-GA) and saved without conversion, else None.

    Why it matters: such an adapter only reproduces the fine-tuned model on top of the *mutated* base, so s·B·A is
    not a delta from the published base and UDR / compression on it would be meaningless. PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` converts it into a plain LoRA (rank 2r) and
    records ``init_lora_weights: true``, so a converted adapter is not reported.
    """
    init = config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    value = init.strip().lower()
    if value in _MUTATED_BASE_INITS or value.startswith(_MUTATED_BASE_PREFIXES):
        return init
    return None
