"""QA pass over ``gradience report`` inputs (issues 20-23 added series / merge views).

Before: a JSON input in UTF-16 or Latin-1 was "not valid JSON (line 1 column 1: Expecting value)" (``json.loads``
on bytes guesses UTF-16/32), and "not a report input" listed only audit / compare JSON although series, merge and
bench documents are report inputs too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gradience.cli.main import main
from gradience.report.views import DOCUMENT_VIEWS


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("gradience report: error: ")
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("raw", [b"\xff\xfe{\x00}\x00", '{"schema": "gradience.series/v1", "x": "\xe9"}'.encode("latin-1")])
def test_non_utf8_json_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    bad = tmp_path / "doc.json"
    bad.write_bytes(raw)
    assert main(["report", str(bad)]) == 2
    assert f"{bad}: JSON input is not UTF-8 text (byte " in _error(capsys)
    assert not (tmp_path / "doc.html").exists()


def test_utf8_bom_json_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.json"   # a BOM (Windows editors) is not a reason to refuse; the shape check runs next
    doc.write_bytes(b'\xef\xbb\xbf{"schema": "gradience.series/v1"}')
    assert main(["report", str(doc)]) == 2
    assert "has no 'checkpoints'" in _error(capsys)


def test_not_a_report_input_names_every_json_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "export.json"
    other.write_text('{"schema": "gradience.export/v1"}')
    binary = tmp_path / "adapter.gguf"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00")
    for path in (other, binary):
        assert main(["report", str(path)]) == 2
        err = _error(capsys)
        assert "not a report input" in err and "gradience audit" in err
        assert all(kind in err for kind in DOCUMENT_VIEWS), err
