"""Secrets that leaked through telemetry redaction (issue 9 item 4), each written through the real writer and
read back from disk: the secret must not appear anywhere in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradience.telemetry import TelemetryWriter
from gradience.telemetry.redact import SECRET_PLACEHOLDER, Redactor, is_secret_key

HF = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"
PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP"
PW = "hunter2-Sup3r"

CASES: list[tuple[str, Any, str]] = [
    ("authorization_in_json", {"headers": '{"Authorization": "Basic dXNlcjpwYXNz", "x": 1}'}, "dXNlcjpwYXNz"),
    ("authorization_in_repr", {"req": "{'Authorization': 'token abc123secret'}"}, "abc123secret"),
    ("github_pat", {"cmd": f"git push https://{PAT}@github.com/x"}, PAT),
    ("secret_as_dict_key", {"tokens": {HF: "me"}}, HF),
    ("numeric_password", {"password": 918273645}, "918273645"),
    ("numeric_api_key", {"api_key": 1234567.0}, "1234567"),
    ("pass_key", {"pass": PW}, PW),
    ("whole_dict_under_secret_key", {"credentials": {"user": "alice", "pw": PW}}, PW),
    ("list_under_secret_key", {"api_keys": [PW]}, PW),
    ("url_userinfo", {"remote": f"https://alice:{PW}@example.com/repo"}, PW),
    ("cookie_header", {"h": f"Cookie: session={PW}; theme=dark"}, PW),
    ("set_cookie", {"h": f"Set-Cookie: sid={PW}"}, PW),
    ("cookie_key", {"session_cookie": PW}, PW),
    ("underscore_hf", {"env": f"MY_{HF}"}, HF),
    ("leading_underscore_hf", {"v": f"_{HF}"}, HF),
]


@pytest.mark.parametrize("name,payload,secret", CASES, ids=[c[0] for c in CASES])
def test_secret_never_reaches_the_file(tmp_path: Path, name: str, payload: dict[str, Any], secret: str) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, run_id="r") as writer:
        writer.metrics("custom", payload)
        writer.log("custom_event", payload)
    text = path.read_text()
    assert secret not in text
    assert SECRET_PLACEHOLDER in text


def test_what_is_kept() -> None:
    r = Redactor()
    out = r.clean({"headers": '{"Authorization": "Basic abc", "x": 1}', "url": "https://example.com/a@b",
                   "num_passes": 3, "keyword": "x", "use_auth_token": True, "hub_token": None, "lr": 1e-4})
    assert out["headers"].endswith(', "x": 1}') and out["url"] == "https://example.com/a@b"
    assert out["num_passes"] == 3 and out["keyword"] == "x" and out["use_auth_token"] is True
    assert out["hub_token"] is None and out["lr"] == 1e-4
    assert is_secret_key("pass") and is_secret_key("db-pwd") and not is_secret_key("bypass_cache")


# issue 17: a fine-grained PAT whose body holds no "gh" slipped past the redactor's cheap pre-filter.
PAT_PLAIN = "github_pat_" + "11AAAAAAA0" + "B" * 12 + "_" + "c" * 59


def test_github_fine_grained_token_without_gh_in_its_body(tmp_path: Path) -> None:
    assert "gh" not in PAT_PLAIN[len("github_pat_"):]
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, run_id="rd") as writer:
        writer.metrics("custom", {"cmd": PAT_PLAIN, "url": f"https://x:{PAT_PLAIN}@github.com"})
        writer.log("custom_event", {"v": [PAT_PLAIN], PAT_PLAIN: 1})
    assert PAT_PLAIN not in path.read_text()


@pytest.mark.slow
def test_check_redacts_secrets_nested_in_extras(tmp_path: Path) -> None:
    """y_secret_nested: an hf token inside lists and dicts of a config's unknown keys reached check's output."""
    import json

    from support.hostile import run_subprocess

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"r: 8\nextras:\n  tokens: [{HF}]\n  nested: {{a: {{b: 'x {HF}'}}}}\nmy_list:\n"
                   f"  - {{note: {HF}}}\nlora:\n  r: 8\n  extras: {{deep: [[{HF}]], hub_token: plain}}\n")
    for fmt in ([], ["--json"], ["--verbose"]):
        proc = run_subprocess(["check", str(cfg), *fmt])
        assert proc.returncode in (0, 1), proc.stderr
        assert HF not in proc.stdout + proc.stderr and "plain" not in proc.stdout
    doc = json.loads(run_subprocess(["check", str(cfg), "--json"]).stdout)
    assert "[REDACTED]" in json.dumps(doc) and SECRET_PLACEHOLDER in json.dumps(doc)
