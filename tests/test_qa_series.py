"""QA pass over ``gradience series`` (issue 22): what a new user sees when the base model or the metric is wrong.

Before: a ``--base-model`` that did not resolve, or one of another size, left the UDR columns as '-' with no word
why (the audit's warnings were in the JSON only); a ``--metric`` no checkpoint logged said only "no checkpoint has a
finite eval_acc"; a series without trainer_state.json had a column headed '-'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradience.cli.main import main
from support import verify_triples as vt


def _run_dir(tmp_path: Path) -> Path:
    """out/checkpoint-{2,4}: the same constructed adapter, each with the Trainer's trainer_state.json."""
    vt.make_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    history: list[dict[str, float]] = []
    for step, eval_loss in ((2, 1.5), (4, 1.25)):
        ckpt = out / f"checkpoint-{step}"
        shutil.copytree(tmp_path / "adapter", ckpt)
        history += [{"step": step, "loss": 2.0, "epoch": step / 4},
                    {"step": step, "eval_loss": eval_loss, "eval_runtime": 0.5, "epoch": step / 4}]
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    return out


def test_unresolved_base_model_is_explained_in_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_dir(tmp_path)
    assert main(["series", str(out), "--base-model", str(tmp_path / "no-such-base")]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("warning: base_model_unresolved")]
    assert len(lines) == 1, text                                   # once, not once per checkpoint
    assert "no-such-base" in lines[0] and "[checkpoint-2, checkpoint-4]" in lines[0]


def test_base_of_another_size_is_explained_in_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_dir(tmp_path)
    vt.make_base(tmp_path / "base", weights={
        name + ".weight": np.zeros((2 * vt.TARGETS[name.rsplit(".", 1)[-1]][0],
                                    2 * vt.TARGETS[name.rsplit(".", 1)[-1]][1]), np.float32)
        for name in vt.module_names()})
    assert main(["series", str(out), "--base-model", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert any(line.startswith("warning: base_shape_mismatch") for line in text.splitlines()), text
    # and with the right base, no warning and the UDR columns are filled
    vt.make_base(tmp_path / "good")
    assert main(["series", str(out), "--base-model", str(tmp_path / "good"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for c in doc["checkpoints"]:
        codes = {i["code"] for i in c["audit"]["issues"]}
        assert c["audit"]["udr_median"] is not None and not codes & {"base_shape_mismatch", "udr_unavailable"}


def test_a_metric_nobody_logged_lists_the_logged_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_dir(tmp_path)
    assert main(["series", str(out), "--no-udr", "--metric", "eval_acc"]) == 0
    text = capsys.readouterr().out
    assert "Suggested: no checkpoint has a finite eval_acc (logged: eval_loss, eval_runtime)" in text
    assert main(["series", str(out), "--no-udr"]) == 0            # the default metric still picks the best
    assert "Suggested: checkpoint-4 has the best eval_loss (1.25" in capsys.readouterr().out


def test_no_trainer_state_has_a_named_metric_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vt.make_adapter(tmp_path / "adapter")
    assert main(["series", str(tmp_path / "adapter"), "--no-udr"]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("checkpoint"))
    assert header.split()[:3] == ["checkpoint", "step", "eval"]
    assert "note: adapter: no trainer_state.json" in text


def test_one_unreadable_checkpoint_does_not_hide_the_others(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a run killed while saving its last checkpoint made the whole series one error line.
    out = _run_dir(tmp_path)
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert main(["series", str(out), "--no-udr", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["checkpoint"]: r for r in doc["checkpoints"]}
    assert rows["checkpoint-2"]["audit"]["utilization_mean"] is not None and "error" not in rows["checkpoint-2"]
    assert rows["checkpoint-4"]["audit"] == {} and "truncated" in rows["checkpoint-4"]["error"]
    assert rows["checkpoint-4"]["eval"]["eval_loss"] == 1.25               # its logged eval still joins
    assert any(n.startswith("checkpoint-4: not audited: ") for n in doc["notes"])
    (tmp_path / "s.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "s.json")]) == 0
    capsys.readouterr()
    assert "checkpoint-4: not audited" in (tmp_path / "s.html").read_text()
    # every checkpoint unreadable: still the one-line error, exit 2
    weights2 = out / "checkpoint-2" / "adapter_model.safetensors"
    weights2.write_bytes(weights2.read_bytes()[:500])
    assert main(["series", str(out), "--no-udr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradience series: error: ") and err.count("\n") == 1


def test_an_unreadable_checkpoint_is_not_suggested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the checkpoint with the best logged eval was suggested even when its adapter could not be read.
    Now the best readable one is, and the text and JSON name the better but unreadable one."""
    out = _run_dir(tmp_path)                                # eval_loss 1.5 at step 2, 1.25 at step 4
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert main(["series", str(out), "--no-udr", "--json"]) == 0
    suggestion = json.loads(capsys.readouterr().out)["suggestion"]
    assert suggestion["checkpoint"] == "checkpoint-2" and suggestion["value"] == 1.5
    assert suggestion["better_but_unreadable"] == "checkpoint-4"
    assert "checkpoint-4 logged a better eval_loss, 1.25, but its adapter could not be read" in suggestion["text"]


def test_report_of_a_series_shows_the_audit_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_dir(tmp_path)
    assert main(["series", str(out), "--base-model", str(tmp_path / "no-such-base"), "--json"]) == 0
    (tmp_path / "s.json").write_text(capsys.readouterr().out)
    assert main(["report", str(tmp_path / "s.json")]) == 0
    capsys.readouterr()
    html = (tmp_path / "s.html").read_text()
    assert html.count("base_model_unresolved") == 1 and "no-such-base" in html
