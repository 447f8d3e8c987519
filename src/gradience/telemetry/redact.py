"""Privacy filter for telemetry payloads (SPEC §5).

A run log is meant to be pasted into issues and shared, so the writer scrubs payload strings before they
reach disk:

- secrets (Hugging Face ``hf_…``, OpenAI ``sk-…``, GitHub ``ghp_…`` / ``github_pat_…``, AWS ``AKIA…`` key ids
  and 40-character secret keys, ``Authorization:`` / ``Cookie:`` / ``Bearer …`` values, also inside JSON text or
  a repr, URL userinfo ``https://user:pw@host``) are replaced wherever they appear, whatever the string's
  length, in values and in dict keys; a value stored under a key named like a credential (``token``,
  ``password``, ``pass``, ``secret``, ``api_key`` …) is replaced whole, whatever its type (number, dict, list);
- strings longer than ``max_str_len`` become ``"[REDACTED len=N]"`` (raw text such as prompts or samples
  stays out of logs unless ``allow_text=True``, which lifts this length rule only);
- the user's home directory prefix becomes ``~`` so that paths do not leak the username.

The envelope (schema, ts, run_id, event, step) is never passed through here.
"""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from typing import Any

from gradience.jsonio import to_jsonable

SECRET_PLACEHOLDER = "[REDACTED secret]"

# Each pattern matches the secret itself; the surrounding text is kept. Token prefixes are anchored on "not
# preceded by a letter or digit" rather than \b, so ``_hf_…`` / ``MY_hf_…`` (an underscore is a word character)
# are caught too.
_QUOTED_OR_REST = r"""(?:"[^"]*"?|'[^']*'?|\S.*)"""
_SECRET_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"),                 # Hugging Face user/org tokens
    re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"),  # OpenAI / Anthropic style keys
    re.compile(r"(?<![A-Za-z0-9])github_pat_[A-Za-z0-9_]{20,}"),        # GitHub fine-grained tokens
    re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}"),          # GitHub tokens
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                       # AWS access key ids
    # Authorization / Cookie values, also inside JSON text or a Python repr ("Authorization": "…").
    re.compile(r"(?i)(?<=authorization)([\"']?\s*[:=]\s*)" + _QUOTED_OR_REST),
    re.compile(r"(?i)(?<=cookie)([\"']?\s*[:=]\s*)" + _QUOTED_OR_REST),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]+"),                 # Bearer <token>
    re.compile(r"(?i)(?<=aws_secret_access_key)([\"']?\s*[:=]\s*)\S+"),
    re.compile(r"(?<=://)[^/\s:@'\"]+:[^/\s@'\"]+(?=@)"),                # URL userinfo: https://user:pw@host
)
# An AWS secret access key on its own: 40 base64-ish characters with mixed case and a digit (a hex digest,
# which is single-case, does not qualify).
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_KEY_WORDS = ("password", "passwd", "secret", "api_key", "apikey", "access_key", "private_key",
              "credential", "authorization", "auth_token", "access_token", "hf_token", "cookie", "passphrase")
# Whole words of a key (split at non-alphanumerics) that name a credential on their own: ``pass``, ``pwd``.
_KEY_TOKENS = frozenset({"pass", "pwd", "pw", "passwd", "cookies", "sessionid"})
# Tokenizer settings named ``*_token`` are not credentials.
_TOKENIZER_KEYS = frozenset({"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token",
                             "mask_token"})
# Cheap pre-filter: none of the patterns can match a string without one of these substrings.
_TRIGGERS = ("hf_", "sk-", "gh", "github_pat_", "AKIA", "ASIA", "uthorization", "UTHORIZATION", "earer", "EARER",
             "aws_secret", "ookie", "OOKIE", "://")


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """True for payload keys whose value is a credential by name (``hf_token``, ``db_password``, ``pass`` …)."""
    k = key.lower().replace("-", "_")
    if k in _TOKENIZER_KEYS:
        return False
    if k == "token" or k.endswith("_token"):
        return True
    if any(word in k for word in _KEY_WORDS):
        return True
    return any(part in _KEY_TOKENS for part in re.split(r"[^a-z0-9]+", k))


def _looks_like_aws_secret(candidate: str) -> bool:
    return (any(c.isupper() for c in candidate) and any(c.islower() for c in candidate)
            and any(c.isdigit() for c in candidate))


def scrub_secrets(text: str) -> str:
    """Replace every secret-looking substring of ``text`` by a placeholder."""
    if any(t in text for t in _TRIGGERS):
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(_placeholder_keep_separator, text)
    if len(text) >= 40:
        text = _AWS_SECRET.sub(
            lambda m: SECRET_PLACEHOLDER if _looks_like_aws_secret(m.group(0)) else m.group(0), text)
    return text


def _placeholder_keep_separator(match: re.Match[str]) -> str:
    # For the look-behind patterns group 1 is the ": " separator, kept for readability.
    if match.re.groups and match.group(1) is not None:
        return match.group(1) + SECRET_PLACEHOLDER
    return SECRET_PLACEHOLDER


class Redactor:
    """Applies the privacy rules to a payload; one instance per writer (it caches the home prefix)."""

    def __init__(self, *, max_str_len: int = 256, allow_text: bool = False, home: str | None = None) -> None:
        if max_str_len < 0:
            raise ValueError("max_str_len must be >= 0")
        self.max_str_len = max_str_len
        self.allow_text = allow_text
        home = os.path.expanduser("~") if home is None else home
        home = home.rstrip("/\\")
        # "/" or "" as home (some containers) would turn every path into "~…"; skip those.
        self._home = home if len(home) > 1 else None

    @staticmethod
    def _key(key: Any) -> str:
        """A dict key as written: a key that is itself a secret (``{"hf_…": 1}``) becomes the placeholder."""
        k = key if type(key) is str else str(key)
        return SECRET_PLACEHOLDER if scrub_secrets(k) != k else k

    def redact_str(self, text: str) -> str:
        text = scrub_secrets(text)
        if self._home and self._home in text:
            text = re.sub(re.escape(self._home) + r"(?=[/\\]|$|[\s\"'])", "~", text)
        if not self.allow_text and len(text) > self.max_str_len:
            return f"[REDACTED len={len(text)}]"
        return text

    def clean(self, value: Any, key: str | None = None) -> Any:
        """Return a JSON-ready copy of ``value``: redacted strings, non-finite floats as strings.

        Under a credential-named key, any value but None and booleans (a numeric PIN, a dict of credentials,
        a list of keys) is replaced whole; dict keys that are themselves secrets are replaced too."""
        if value is None or value is True or value is False:
            return value
        if key is not None and is_secret_key(key) and value != "":
            return SECRET_PLACEHOLDER
        tp = type(value)
        if tp is float:
            if value - value == 0.0:  # finite (fast path; NaN and inf give NaN)
                return value
            if math.isnan(value):
                return "NaN"
            return "Infinity" if value > 0 else "-Infinity"
        if tp is int:
            return value
        if tp is str:
            return self.redact_str(value)
        if tp is dict:
            return {self._key(k): self.clean(v, k if type(k) is str else str(k)) for k, v in value.items()}
        if tp is list or tp is tuple:
            return [self.clean(v, key) for v in value]
        # Subclasses of the plain types (np.float64, torch's version string, IntEnum ...) become the plain type;
        # converting them through to_jsonable would hand back the same subclass and never terminate.
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, float):
            return self.clean(float(value), key)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, str):
            return self.clean(str(value), key)
        # dataclasses, numpy scalars, paths …: convert, then clean the plain result.
        return self.clean(to_jsonable(value, nonfinite="string"), key)
