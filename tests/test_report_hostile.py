"""``gradience report`` on hostile inputs (issue 17, the rp_* cases of the generated corpus): each one ends as a
clean one-line error (exit 2) or as a page that says what it could not show — never "internal error".

Inputs come from ``support.hostile.report_case``; the documents are checked once at the entry
(``gradience.report.validate``), so a wrong shape is one message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from support.hostile import REPORT_CASES, audit_json_doc, good_adapter, report_case

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

# What each case must end as: exit 2 with these words in the one-line error, or a page (exit 0).
EXPECTED: dict[str, tuple[int, tuple[str, ...]]] = {
    "rp_audit_bigint": (2, ("audit.json", "integer of about 401 digits", "total_lora_params")),
    "rp_audit_issues_weird": (2, ("audit.json", "issues[0]", "object")),
    "rp_audit_layers_ints": (2, ("audit.json", "layers[0]", "object")),
    "rp_audit_layers_str": (2, ("audit.json", "'layers'", "list")),
    "rp_audit_nonfinite": (0, ()),
    "rp_bench_wrong_types": (2, ("bench.json", "'task'", "object")),
    "rp_compare_module_types": (2, ("compare.json", "integer of about 401 digits")),
    "rp_compare_wrong_types": (2, ("compare.json", "'a'", "object")),
    "rp_out_long_name": (2, ("rrrr", "name too long")),
    "rp_run_huge_loss": (0, ()),
    "rp_run_step_bigint": (0, ()),
    "rp_run_surrogate": (0, ()),
    "rp_title_surrogate": (0, ()),
}


@pytest.fixture(scope="module")
def good_audit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return audit_json_doc(good_adapter(tmp_path_factory.mktemp("rp_good") / "adapter"))


def test_every_case_has_an_expectation() -> None:
    assert set(EXPECTED) == set(REPORT_CASES)


@pytest.mark.parametrize("case", REPORT_CASES)
def test_hostile_report_input(case: str, tmp_path: Path, good_audit: dict[str, Any],
                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = report_case(case, tmp_path / case, good_audit)
    code = main(["report", *argv])
    _out, err = capsys.readouterr()
    want_code, needles = EXPECTED[case]
    assert "internal error" not in err and "Traceback" not in err, err
    assert code == want_code, err
    if code == 2:
        assert err.startswith("gradience report: error: ") and err.count("\n") == 1, err
        for needle in needles:
            assert needle in err, err
        assert not list((tmp_path / case).glob("*.html")), "no page written on error"
    else:
        page = (tmp_path / case / "out.html").read_bytes().decode("utf-8")  # strict: valid UTF-8
        assert "<html" in page
        if case == "rp_title_surrogate":
            assert "<title>t\\udcff\\ud800itle</title>" in page  # escaped, visible, valid UTF-8
        if case == "rp_run_surrogate":
            assert "m\\ud800x" in page and "lone \\udfff surrogate" in page
