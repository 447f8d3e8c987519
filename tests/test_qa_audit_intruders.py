"""QA pass over ``gradience audit --intruders`` flags (issue 23).

Before: ``--intruder-cache`` naming an existing file was accepted, the audit ran, and one identical
"cannot write the base spectra cache" warning was printed per layer. Now it is one line, exit 2, before any work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gradience.cli.main import main
from support import verify_triples as vt


@pytest.mark.parametrize("kind", ["file", "symlink_loop"])
def test_intruder_cache_that_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a directory\n")
    else:
        cache.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(cache)
    rc = main(["audit", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"), "--intruders",
               "--intruder-cache", str(cache)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err == (f"gradience audit: error: {cache}: --intruder-cache must be a directory (it is created "
                            "when missing); this path exists and is not one\n")


def test_intruder_cache_in_a_missing_directory_is_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    cache = tmp_path / "a" / "b" / "cache"
    rc = main(["audit", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"), "--intruders",
               "--intruder-cache", str(cache), "--json"])
    assert rc == 0
    assert "intruder_cache_unwritable" not in capsys.readouterr().out
    assert cache.is_dir() and any(cache.iterdir())
