"""gradience series on synthetic checkpoints (fast): the eval join, the suggestion, the audit numbers against
numpy, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.series import SeriesOptions, run_series
from support.hostile import adapter_with_tensors

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def _checkpoint(root: Path, step: int, spread: float) -> tuple[Path, float]:
    """A one-module r=4 adapter whose update has singular values 1, spread, spread², spread³; returns the
    utilization numpy computes (stable rank / r)."""
    rng = np.random.default_rng(step)
    u, _ = np.linalg.qr(rng.standard_normal((16, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 4)))
    sigma = np.array([spread**i for i in range(4)])
    b = (u * sigma).astype(np.float32)
    a = v.T.astype(np.float32)
    d = adapter_with_tensors(root / f"checkpoint-{step}", {f"{PREFIX}.lora_A.weight": a,
                                                           f"{PREFIX}.lora_B.weight": b})
    s = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)
    return d, float((s**2).sum() / s[0] ** 2 / 4)


def _state(path: Path, evals: dict[int, float]) -> None:
    history = [{"loss": 2.0, "learning_rate": 1e-4, "step": s} for s in range(5, 31, 5)]
    history += [{"eval_loss": v, "eval_accuracy": 1 - v / 2, "step": s, "epoch": s / 30} for s, v in evals.items()]
    path.write_text(json.dumps({"global_step": 30, "log_history": sorted(history, key=lambda e: e["step"])}))


def test_join_suggestion_and_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    utils = {}
    for step, spread in ((10, 0.1), (20, 0.5), (25, 0.7), (30, 0.9)):
        _, utils[step] = _checkpoint(tmp_path, step, spread)
    evals = {10: 1.0, 15: 0.7, 20: 0.8, 30: 0.9}
    _state(tmp_path / "checkpoint-30" / "trainer_state.json", evals)  # the newest holds the whole history
    doc = run_series([tmp_path], SeriesOptions(udr=False))
    rows = doc["checkpoints"]
    assert [r["step"] for r in rows] == [10, 20, 25, 30]
    # as-of join: the latest eval at or before the checkpoint's step (25 -> 20; 15 has no checkpoint)
    assert [r["eval_step"] for r in rows] == [10, 20, 20, 30]
    assert [r["eval"]["eval_loss"] for r in rows] == [1.0, 0.8, 0.8, 0.9]
    for r in rows:
        assert r["audit"]["utilization_mean"] == pytest.approx(utils[r["step"]], rel=1e-5)
        assert r["audit"]["udr_median"] is None
    s = doc["suggestion"]
    assert s["checkpoint"] == "checkpoint-20" and s["value"] == 0.8  # the first of equal values
    assert s["moved"]["utilization_mean"]["from"] == pytest.approx(utils[10], rel=1e-5)
    assert s["moved"]["utilization_mean"]["to"] == pytest.approx(utils[20], rel=1e-5)
    assert len(doc["notes"]) == 3 and all("no trainer_state.json" in n for n in doc["notes"])
    # a higher-is-better metric
    acc = run_series([tmp_path], SeriesOptions(udr=False, metric="eval_accuracy"))
    assert acc["mode"] == "max" and acc["suggestion"]["checkpoint"] == "checkpoint-20"
    # CLI: one line per checkpoint and the suggestion
    assert main(["series", *(str(tmp_path / f"checkpoint-{s}") for s in (30, 10)), "--no-udr"]) == 0
    out = capsys.readouterr().out
    assert out.index("checkpoint-10") < out.index("checkpoint-30") and "Suggested: checkpoint-30" in out


def test_no_eval_metrics(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 5, 0.5)
    doc = run_series([tmp_path / "checkpoint-5"], SeriesOptions(udr=False))
    assert doc["suggestion"]["checkpoint"] is None and "no checkpoint has an eval metric" in doc["suggestion"]["reason"]


def test_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    assert main(["series", str(tmp_path / "checkpoint-3"), "--no-udr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradience series: error: ")
    _checkpoint(tmp_path, 5, 0.5)
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse's one line, exit 2
        main(["series", str(tmp_path / "checkpoint-5"), "--no-udr", "--mode", "median"])
    assert exc.value.code == 2
    capsys.readouterr()
