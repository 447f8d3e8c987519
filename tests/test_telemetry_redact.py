"""Privacy rules of the telemetry writer: secrets, long text, home paths; the envelope is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradience.telemetry import TelemetryWriter
from gradience.telemetry.redact import SECRET_PLACEHOLDER, Redactor, is_secret_key, scrub_secrets

HF = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"       # 34 chars after the prefix, like real HF tokens
OPENAI = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0"
OPENAI_PROJ = "sk-proj-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"    # AWS documentation example, 40 chars
GITHUB = "ghp_" + "0123456789abcdefghijABCDEFGHIJ012345"


@pytest.mark.parametrize("secret", [HF, OPENAI, OPENAI_PROJ, AWS_ID, AWS_SECRET, GITHUB])
def test_bare_secrets_are_redacted_whatever_the_length_and_allow_text(secret: str) -> None:
    for redactor in (Redactor(), Redactor(allow_text=True), Redactor(max_str_len=10_000)):
        assert redactor.clean(secret) == SECRET_PLACEHOLDER
        assert secret not in redactor.clean({"note": f"use {secret} here"})["note"]


def test_secret_inside_text_keeps_the_surrounding_text() -> None:
    out = scrub_secrets(f"python train.py --hub-token {HF} --lr 5e-5")
    assert out == f"python train.py --hub-token {SECRET_PLACEHOLDER} --lr 5e-5"


@pytest.mark.parametrize("text,kept", [
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: "),
    ("authorization=token123abc", "authorization="),
    ("curl -H 'Bearer abc.DEF-ghi_jkl~1'", "curl -H '"),
    ("aws_secret_access_key = abcdEFGH1234", "aws_secret_access_key = "),
])
def test_authorization_and_bearer_values(text: str, kept: str) -> None:
    out = scrub_secrets(text)
    assert out.startswith(kept) and SECRET_PLACEHOLDER in out
    secret_part = text[len(kept):].strip("'")
    assert secret_part.split()[-1].strip("'") not in out


@pytest.mark.parametrize("key", ["token", "hf_token", "HF-TOKEN", "access_token", "password", "db_password",
                                 "secret", "client_secret", "api_key", "OPENAI_API_KEY", "apikey",
                                 "Authorization", "aws_secret_access_key", "private_key", "credentials"])
def test_values_under_credential_keys_are_redacted_even_when_short(key: str) -> None:
    assert is_secret_key(key)
    assert Redactor(allow_text=True).clean({key: "x1"}) == {key: SECRET_PLACEHOLDER}


@pytest.mark.parametrize("key", ["tokens", "num_tokens", "max_new_tokens", "pad_token", "eos_token",
                                 "tokenizer", "token_count", "loss", "split", "model_name", "keyword"])
def test_ordinary_keys_are_not_credentials(key: str) -> None:
    assert not is_secret_key(key)
    assert Redactor().clean({key: "</s>"}) == {key: "</s>"}


def test_lookalikes_are_kept() -> None:
    r = Redactor()
    sha = "3f786850e387550fdab836ed7e6dc881de23001b"  # 40 hex chars (a git commit), single case
    assert r.clean(sha) == sha
    assert r.clean("sk-learn") == "sk-learn" and r.clean("hf_hub") == "hf_hub"
    assert r.clean("bearer") == "bearer"
    assert r.clean({"tokens": 4096, "token_ids": [1, 2]}) == {"tokens": 4096, "token_ids": [1, 2]}


def test_length_rule_and_allow_text() -> None:
    r = Redactor()
    assert r.clean("a" * 256) == "a" * 256
    assert r.clean("a" * 257) == "[REDACTED len=257]"
    assert r.clean("é" * 300) == "[REDACTED len=300]"  # characters, not bytes
    assert Redactor(allow_text=True).clean("a" * 5000) == "a" * 5000
    assert Redactor(max_str_len=4).clean("abcde") == "[REDACTED len=5]"
    # nested containers are walked; numbers and bools are untouched
    nested = r.clean({"samples": ["ok", "b" * 300, {"prompt": "c" * 400}], "n": 3, "flag": True})
    assert nested == {"samples": ["ok", "[REDACTED len=300]", {"prompt": "[REDACTED len=400]"}], "n": 3,
                      "flag": True}


def test_home_directory_prefix_becomes_tilde() -> None:
    r = Redactor(home="/home/alice")
    assert r.clean("/home/alice/runs/x/run.jsonl") == "~/runs/x/run.jsonl"
    assert r.clean("/home/alice") == "~"
    assert r.clean("cd /home/alice && ls") == "cd ~ && ls"
    assert r.clean("/home/alice2/data") == "/home/alice2/data"  # another user's prefix is not ours
    assert Redactor(home="/").clean("/data/x") == "/data/x"      # a root home never eats paths


def test_writer_redacts_payload_but_never_the_envelope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/bob")
    path = tmp_path / "run.jsonl"
    run_id = HF + "-" + "r" * 300  # a run id that looks like a secret and is long: still written verbatim
    with TelemetryWriter(path, run_id=run_id) as tw:
        tw.run_start({"model_name": "/home/bob/models/llama", "notes": "x" * 300},
                     {"hf_token": "hf_short", "cmd": f"train --token {HF}"})
        tw.log(event="custom_event", payload={"text": "y" * 300})
    start, custom, _end = (json.loads(line) for line in path.read_text().splitlines())
    assert start["run_id"] == run_id and custom["run_id"] == run_id and custom["event"] == "custom_event"
    assert start["config"]["model_name"] == "~/models/llama"
    assert start["config"]["notes"] == "[REDACTED len=300]"
    assert start["meta"]["hf_token"] == SECRET_PLACEHOLDER
    assert start["meta"]["cmd"] == f"train --token {SECRET_PLACEHOLDER}"
    assert custom["text"] == "[REDACTED len=300]"
    assert "/home/bob" not in path.read_text() and HF not in path.read_text().replace(run_id, "")


def test_writer_allow_text_and_max_str_len(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, allow_text=True) as tw:
        tw.metrics("samples", {"prompt": "p" * 1000, "key": OPENAI})
    with TelemetryWriter(path, max_str_len=8) as tw:
        tw.metrics("samples", {"prompt": "p" * 9})
    a, b = (json.loads(line) for line in path.read_text().splitlines())
    assert a["metrics"] == {"prompt": "p" * 1000, "key": SECRET_PLACEHOLDER}
    assert b["metrics"] == {"prompt": "[REDACTED len=9]"}


def test_subclasses_of_plain_types_are_cleaned_not_looped() -> None:
    """np.float64 and str subclasses (torch's version string) once recursed forever."""
    import enum

    import numpy as np

    from gradience.telemetry.redact import Redactor

    class Version(str):
        pass

    class Level(enum.IntEnum):
        HIGH = 3

    out = Redactor(max_str_len=256, allow_text=False).clean(
        {"v": Version("2.13.0"), "x": np.float64(1.5), "n": np.float64("nan"), "lvl": Level.HIGH, "b": np.bool_(True)})
    assert out == {"v": "2.13.0", "x": 1.5, "n": "NaN", "lvl": 3, "b": True}
    assert type(out["v"]) is str and type(out["x"]) is float and type(out["lvl"]) is int
