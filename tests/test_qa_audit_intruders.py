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


def _other_size_base(out: Path) -> None:
    """The same module names with weights of another shape: no adapter layer fits."""
    import numpy as np

    vt.make_base(out, weights={name + ".weight": np.full((32, 48), 0.01) for name in vt.module_names()})


def test_every_layer_skipped_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base of another size: no intruder was measured; that is a warning the user sees, not an info line."""
    import json

    _other_size_base(tmp_path / "other")
    vt.make_adapter(tmp_path / "adapter")
    rc = main(["audit", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "other"), "--intruders", "--json"])
    assert rc == 0
    skipped = [i for i in json.loads(capsys.readouterr().out)["issues"] if i["code"] == "intruder_layer_skipped"]
    assert skipped and {i["severity"] for i in skipped} == {"warning"}


def test_scale_intruders_against_a_base_no_layer_fits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 0, "0 of 0 layers changed" and an unchanged copy written. Now one line, exit 2, nothing written."""
    _other_size_base(tmp_path / "other")
    vt.make_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    rc = main(["compress", str(tmp_path / "adapter"), "--out", str(out), "--scale-intruders", "0.5",
               "--base-model", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no layer of the adapter can be checked against" in err
    assert "shape differs" in err and not out.exists()


def test_scale_intruders_text_names_the_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text names how much ΔW changed (the JSON's rel_change), not only the rank-r energy share (≈ 1)."""
    import json

    from support import tiny_models

    base = tiny_models.make_tiny_llama(tmp_path / "base")
    adapter = tiny_models.make_peft_adapter(base, tmp_path / "adapter", arch="llama")
    rc = main(["compress", str(adapter), "--out", str(tmp_path / "o1"), "--scale-intruders", "0.5",
               "--base-model", str(base), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    changed = [row for row in doc["layers"] if row["intruder_count"]]
    assert changed, "the tiny random adapter should hold intruders"
    rc = main(["compress", str(adapter), "--out", str(tmp_path / "o2"), "--scale-intruders", "0.5",
               "--base-model", str(base)])
    out = capsys.readouterr().out
    assert rc == 0
    row = changed[0]
    assert f"{row['name']}: {row['intruder_count']} intruder(s), ΔW changed by {row['rel_change']:.1%}" in out
