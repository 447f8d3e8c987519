"""Reading ``adapter_config.json`` and deriving each module's rank and scale exactly as PEFT does.

PEFT builds a module's LoRA layer from its *pattern* values: ``rank_pattern`` / ``alpha_pattern`` are looked up
with the module's path in the base model (``model.layers.0.self_attn.q_proj``); a pattern key matches when the
whole path matches the regular expression ``(.*\\.)?(<key>)$`` (so ``q_proj`` matches every q_proj and
``layers.0.self_attn.q_proj`` only that one), and the first matching key in the mapping's order wins. The scale
is then ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). This module reproduces those semantics so that
audit magnitudes, rank suggestions and compressed adapters agree with what PEFT will actually run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from gradience.errors import InputError
from gradience.io.textfile import read_json_file
from gradience.issues import Issue
from gradience.textfmt import safe_text

try:  # the parser behind ``re.compile`` (renamed in 3.11; the old name warns)
    import re._parser as _sre_parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parser

CONFIG_FILENAME = "adapter_config.json"
# A PEFT adapter config is a few KB; anything this large is not one (and must not be read into memory).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Bounds that keep rank_pattern/alpha_pattern matching linear (see ``pathological_pattern``).
MAX_PATTERN_CHARS = 1000
MAX_PATTERN_UNBOUNDED = 2
MAX_MATCHED_NAME_CHARS = 256
# PEFT writes at most one rank_pattern/alpha_pattern entry per adapted module; every module is matched against
# every key, so a forged config with 100k keys would take minutes per command (issue 17, cx_rank_pattern_100k).
MAX_PATTERN_ENTRIES = 8192


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse an ``adapter_config.json``; unreadable, oversized or non-JSON-object files raise ``InputError``."""
    config = read_json_file(path, what="adapter config", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InputError(f"adapter config is not a JSON object (found {type(config).__name__})", path)
    for field_name in ("rank_pattern", "alpha_pattern"):
        value = config.get(field_name)
        if isinstance(value, dict) and len(value) > MAX_PATTERN_ENTRIES:
            raise InputError(f"{field_name} has {len(value)} entries; at most {MAX_PATTERN_ENTRIES} are supported "
                             "(PEFT writes one per adapted module)", path)
    return config


def pathological_pattern(key: str) -> str | None:
    """Why a ``rank_pattern``/``alpha_pattern`` key cannot be matched safely, or None when it can.

    Python's ``re`` has no time limit and backtracks exponentially on nested quantifiers (``(a+)+b``) or a
    repeated alternation (``(a|aa)+``), and polynomially on many ``.*`` in a row, so such keys are refused
    (reported as an issue, never applied) instead of hanging the audit. Every key PEFT users write
    (``q_proj``, ``layers\\.0\\..*``, ``.*(q|v)_proj``) passes.
    """
    if len(key) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        parsed = _sre_parser.parse(key)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None  # not a regular expression at all: matched literally, which is always safe
    unbounded = 0

    def walk(items: Any, inside_repeat: bool) -> str | None:
        nonlocal unbounded
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _low, high, body = arg
                repeats = high is _sre_parser.MAXREPEAT or high > 1
                if repeats:
                    if inside_repeat:
                        return "nested quantifiers (catastrophic backtracking)"
                    if high is _sre_parser.MAXREPEAT:
                        unbounded += 1
                    if _has_branch(body):
                        return "a quantified alternation (catastrophic backtracking)"
                found = walk(body, inside_repeat or repeats)
                if found:
                    return found
            elif name == "SUBPATTERN":
                found = walk(arg[-1], inside_repeat)
                if found:
                    return found
            elif name == "BRANCH":
                for branch in arg[1]:
                    found = walk(branch, inside_repeat)
                    if found:
                        return found
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(arg[1], inside_repeat)
                if found:
                    return found
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "a back-reference"
        return None

    reason = walk(parsed, False)
    if reason is None and unbounded > MAX_PATTERN_UNBOUNDED:
        reason = f"more than {MAX_PATTERN_UNBOUNDED} unbounded quantifiers"
    return reason


def _has_branch(items: Any) -> bool:
    for op, arg in items:
        name = str(op)
        if name == "BRANCH":
            return True
        if name == "SUBPATTERN" and _has_branch(arg[-1]):
            return True
    return False


@lru_cache(maxsize=65536)
def _compiled(key: str) -> re.Pattern[str] | None:
    """The key compiled once in PEFT's wrapping, or None when it is not a valid (or not a safe) expression."""
    if pathological_pattern(key) is not None:
        return None
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except (re.error, RecursionError, OverflowError, ValueError):
        return None


def _literal_match(key: str, module_name: str) -> bool:
    return module_name == key or module_name.endswith("." + key)


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first key of a ``rank_pattern``/``alpha_pattern`` that PEFT would apply to ``module_name``, or None.

    A key that is not a valid regular expression (PEFT itself would crash on it) is compared literally; a
    pathological one (see ``pathological_pattern``) is never applied. Module names longer than
    ``MAX_MATCHED_NAME_CHARS`` (only forged files have them) are compared literally too, because even the
    ``(.*\\.)?`` prefix of PEFT's wrapping backtracks quadratically over a megabyte of dots.
    """
    long_name = len(module_name) > MAX_MATCHED_NAME_CHARS
    for key in pattern_keys:
        if pathological_pattern(key) is not None:
            continue
        rx = None if long_name else _compiled(key)
        if (rx.match(module_name) is not None) if rx is not None else _literal_match(key, module_name):
            return key
    return None


def _is_number(value: Any) -> bool:
    """A finite real number that fits a float (a 400-digit int would raise OverflowError in ``float()``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _pattern(config: Mapping[str, Any], field_name: str, issues: list[Issue], module_name: str) -> dict[str, Any]:
    value = config.get(field_name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        issues.append(Issue("invalid_config", f"adapter config field '{field_name}' is not an object; ignored",
                            modules=[module_name]))
        return {}
    unsafe = {str(k): why for k in value if (why := pathological_pattern(str(k))) is not None}
    bad = [str(k) for k in value if str(k) not in unsafe and _compiled(str(k)) is None]
    if bad:
        issues.append(Issue("invalid_pattern",
                            f"{field_name} keys that are not valid regular expressions are matched literally: "
                            + ", ".join(safe_text(k, max_len=100) for k in bad), modules=[module_name]))
    for key, why in unsafe.items():
        issues.append(Issue("invalid_pattern",
                            f"{field_name} key {safe_text(key, max_len=100)!r} is not applied: {why}",
                            modules=[module_name]))
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
    _pattern(config, "rank_pattern", issues, module_name)  # only for its issues: module_rank applied it
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
    if alpha == 0.0:
        issues.append(Issue("zero_alpha", f"{source} is 0: PEFT scales this update to nothing (ΔW = 0 whatever "
                                          "the factors hold); magnitudes are reported as 0", modules=[module_name]))
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        issues.append(Issue("invalid_config", f"use_rslora is not a boolean ({use_rslora!r}); treated as "
                                              f"{bool(use_rslora)}", modules=[module_name]))
        use_rslora = bool(use_rslora)
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    if not math.isfinite(scale):  # cannot happen for a finite alpha and r >= 1, kept as a guard
        issues.append(Issue("unscaled", f"{source} gives a non-finite scale; magnitudes are unscaled (scale = 1)",
                            modules=[module_name]))
        return None, 1.0, issues
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
