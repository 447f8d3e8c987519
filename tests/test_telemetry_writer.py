"""TelemetryWriter and append_metrics_event: wire format, append semantics, context manager, threads.

Lines are checked with the standard json module (independent of the reader under test) and with a strict
parser that rejects bare NaN/Infinity tokens.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.telemetry import SCHEMA, TelemetryReader, TelemetryWriter, append_metrics_event
from gradience.telemetry.types import (
    ConfigSnapshot,
    LoraConfig,
    OptimizerConfig,
    Recommendation,
    TrainingConfig,
)


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Parse every line with a parser that refuses NaN/Infinity tokens (strict JSON)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-strict JSON token {token}")

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def sample_config() -> ConfigSnapshot:
    return ConfigSnapshot(
        model_name="tiny-llama", dataset_name="glue/sst2", task_profile="easy_classification",
        optimizer=OptimizerConfig(name="adamw_torch_fused", lr=5e-5, weight_decay=0.01, betas=[0.9, 0.999],
                                  eps=1e-8, extras={"fused": True}),
        lora=LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.05, bias="none"),
        training=TrainingConfig(seed=42, batch_size=8, gradient_accumulation=2, max_steps=100, epochs=1.0,
                                dtype="bf16"),
        notes="baseline", extras={"git_sha": "abc123"})


def test_all_event_types_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    config = sample_config()
    rec = Recommendation("warning", "lower_lr", "Lower the lr", rationale="gap", confidence=0.6, scope="optimizer",
                         evidence={"lr": 2e-4})
    before = time.time()
    with TelemetryWriter(path) as tw:
        tw.run_start(config, {"seed_note": "x"})
        tw.train_step(1, loss=2.5, lr=5e-5, grad_norm=1.25, epoch=0.01, tokens=4096, samples=8, wall_time_s=0.3)
        tw.eval(1, "test", {"loss": 0.7, "accuracy": 0.5, "n": 16})
        tw.metrics("lora_audit", {"stable_rank_mean": 1.47, "by_type": {"attn": {"n_layers": 2}}}, step=1)
        tw.alert("warning", "loss_spike", "loss jumped", {"ratio": 4.0}, step=1)
        tw.recommendation([rec, rec.to_dict()], step=1)
        tw.run_end("ok", reason="finished", step=1)
        run_id = tw.run_id
    after = time.time()
    records = strict_lines(path)
    assert [r["event"] for r in records] == ["run_start", "train_step", "eval", "metrics", "alert",
                                             "recommendation", "run_end"]
    assert str(uuid.UUID(run_id)) == run_id and uuid.UUID(run_id).version == 4
    for r in records:
        assert list(r)[:5] == ["schema", "ts", "run_id", "event", "step"]
        assert r["schema"] == SCHEMA and r["run_id"] == run_id
        assert isinstance(r["ts"], float) and before <= r["ts"] <= after
    start, step, ev, met, alert, recs, end = records
    assert start["step"] is None and step["step"] == 1
    assert ConfigSnapshot.from_dict(start["config"]).to_dict() == config.to_dict()
    assert start["config"]["lora"]["alpha_over_r"] == 2.0 and start["config"]["optimizer"]["betas"] == [0.9, 0.999]
    assert start["meta"]["seed_note"] == "x" and "gradience_version" in start["meta"]
    assert step["loss"] == 2.5 and step["tokens"] == 4096 and step["wall_time_s"] == 0.3
    assert ev["split"] == "test" and ev["metrics"]["accuracy"] == 0.5
    assert ev["metrics"]["ppl"] == pytest.approx(math.exp(0.7))
    assert met["kind"] == "lora_audit" and met["metrics"]["by_type"]["attn"]["n_layers"] == 2
    assert alert == {**alert, "severity": "warning", "code": "loss_spike", "message": "loss jumped",
                     "context": {"ratio": 4.0}}
    assert [Recommendation.from_dict(d) for d in recs["recommendations"]] == [rec, rec]
    assert end["status"] == "ok" and end["reason"] == "finished"
    # exactly one run_end: leaving the block after an explicit run_end writes nothing more
    assert sum(r["event"] == "run_end" for r in records) == 1


def test_dict_config_is_normalized_through_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.run_start({"model_name": "m", "lora": {"r": 4, "alpha": 8}, "custom": 1})
    cfg = strict_lines(path)[0]["config"]
    assert cfg["lora"]["r"] == 4 and cfg["lora"]["alpha_over_r"] == 2.0
    assert cfg["extras"] == {"custom": 1} and cfg["optimizer"]["lr"] is None


def test_eval_keeps_given_ppl_and_handles_huge_loss(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.eval(3, "train", {"loss": 1.0, "ppl": 99.0})
        tw.eval(3, "test", {"loss": 1000.0})
        tw.eval(None, "val", {"accuracy": 0.3})
    a, b, c = strict_lines(path)
    assert a["metrics"]["ppl"] == 99.0
    assert b["metrics"]["ppl"] == "Infinity"
    assert "ppl" not in c["metrics"] and c["step"] is None


def test_non_finite_floats_are_strings_on_disk_and_floats_when_read(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.train_step(5, loss=float("nan"), grad_norm=float("inf"), lr=float("-inf"))
        tw.metrics("guard", {"values": [1.0, float("nan")], "nested": {"x": float("inf")}}, step=5)
    raw = strict_lines(path)
    assert raw[0]["loss"] == "NaN" and raw[0]["grad_norm"] == "Infinity" and raw[0]["lr"] == "-Infinity"
    assert raw[1]["metrics"] == {"values": [1.0, "NaN"], "nested": {"x": "Infinity"}}
    back = list(TelemetryReader(path))
    assert math.isnan(back[0].data["loss"]) and back[0].data["grad_norm"] == math.inf
    assert back[0].data["lr"] == -math.inf
    assert math.isnan(back[1].data["metrics"]["values"][1]) and back[1].data["metrics"]["nested"]["x"] == math.inf


def test_numpy_values_and_steps_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.train_step(np.int64(7), loss=np.float32(0.5), tokens=np.int64(3))
        tw.metrics("spectral", {"sv": np.array([3.0, 1.0])}, step=8.0)  # type: ignore[arg-type]
    a, b = strict_lines(path)
    assert a["step"] == 7 and a["loss"] == 0.5 and a["tokens"] == 3
    assert b["step"] == 8 and b["metrics"]["sv"] == [3.0, 1.0]


def test_invalid_calls_raise_and_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    tw = TelemetryWriter(path)
    with pytest.raises(ValueError, match="collide"):
        tw.log("custom", {"run_id": "x"})
    with pytest.raises(ValueError):
        tw.alert("fatal", "c", "m")
    with pytest.raises(ValueError):
        tw.run_end("finished")
    with pytest.raises(TypeError):
        tw.train_step(True, loss=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tw.train_step(1.5, loss=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tw.log("", {})
    tw.close()
    tw.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        tw.train_step(1, loss=1.0)
    assert path.read_bytes() == b""


def test_reopening_appends_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as first:
        first.run_start(ConfigSnapshot())
        first.train_step(1, loss=1.0)
    before = path.read_bytes()
    with TelemetryWriter(path) as second:
        second.run_start(ConfigSnapshot())
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    ids = [r["run_id"] for r in strict_lines(path)]
    assert ids[:3] == [first.run_id] * 3 and set(ids[3:]) == {second.run_id} and first.run_id != second.run_id
    # continuing a run with its id keeps the id
    with TelemetryWriter(path, run_id=first.run_id) as again:
        again.train_step(2, loss=0.9)
    assert strict_lines(path)[-1]["run_id"] == first.run_id


def test_append_false_refuses_non_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"event":"run_start"}\n')
    with pytest.raises(InputError, match="not empty"):
        TelemetryWriter(path, append=False)
    assert path.read_text() == '{"event":"run_start"}\n'
    fresh = tmp_path / "new" / "deep" / "run.jsonl"  # parent directories are created
    with TelemetryWriter(fresh, append=False) as tw:
        tw.train_step(1, loss=1.0)
    assert len(strict_lines(fresh)) == 1


def test_directory_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        TelemetryWriter(tmp_path)


def test_partial_last_line_is_not_glued_to_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"schema":"gradience.vnext.telemetry/v1","event":"train_step","step":1,"loss":1.0}\n'
                     b'{"schema":"gradience.vnext.telemetry/v1","event":"train_st')
    with TelemetryWriter(path) as tw:
        tw.train_step(2, loss=0.5)
    lines = path.read_bytes().split(b"\n")
    assert lines[1].endswith(b"train_st") and json.loads(lines[2])["step"] == 2
    reader = TelemetryReader(path)
    assert [r.step for r in reader] == [1, 2]
    assert [(i.code, i.line) for i in reader.issues] == [("bad_json", 2)]


def test_exception_in_context_writes_run_end_error_and_propagates(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with pytest.raises(RuntimeError, match="boom"), TelemetryWriter(path) as tw:
        tw.run_start(ConfigSnapshot())
        tw.train_step(1, loss=1.0)
        raise RuntimeError("boom")
    assert tw.closed
    last = strict_lines(path)[-1]
    assert last["event"] == "run_end" and last["status"] == "error" and last["reason"] == "RuntimeError: boom"


def test_keyboard_interrupt_is_aborted_and_explicit_end_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with pytest.raises(KeyboardInterrupt), TelemetryWriter(path) as tw:
        raise KeyboardInterrupt
    assert strict_lines(path)[-1]["status"] == "aborted"
    path2 = tmp_path / "run2.jsonl"
    with pytest.raises(ValueError), TelemetryWriter(path2) as tw:
        tw.run_end("ok")
        raise ValueError("after the end")
    assert [r.get("status") for r in strict_lines(path2)] == ["ok"]


def test_clean_exit_after_run_start_writes_run_end_ok_but_not_without_start(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.run_start(ConfigSnapshot())
    assert [r["event"] for r in strict_lines(path)] == ["run_start", "run_end"]
    path2 = tmp_path / "metrics_only.jsonl"
    with TelemetryWriter(path2) as tw:
        tw.metrics("guard", {"x": 1})
    assert [r["event"] for r in strict_lines(path2)] == ["metrics"]


def test_threads_write_whole_lines_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    n_threads, per_thread = 8, 1500
    tw = TelemetryWriter(path)
    barrier = threading.Barrier(n_threads)

    def work(tid: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            tw.train_step(i, loss=float(tid), thread=tid, pad="x" * (tid * 20))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tw.close()
    records = strict_lines(path)
    assert len(records) == n_threads * per_thread
    for tid in range(n_threads):
        mine = [r for r in records if r["thread"] == tid]
        assert sorted(r["step"] for r in mine) == list(range(per_thread))
        assert all(r["loss"] == float(tid) and r["pad"] == "x" * (tid * 20) for r in mine)


# -- append_metrics_event ----------------------------------------------------------------------------------
def test_append_metrics_event_continues_last_run_and_last_integer_step(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as a:
        a.run_start(ConfigSnapshot())
        a.train_step(7, loss=1.0)
    with TelemetryWriter(path) as b:
        b.run_start(ConfigSnapshot())
        b.train_step(2, loss=1.0)
        b.train_step(3, loss=1.0)
        b.eval(None, "test", {"loss": 1.0})
    before = path.read_bytes()
    run_id, step = append_metrics_event(path, "lora_audit", {"stable_rank_mean": 1.5, "sv": [float("nan")]})
    assert (run_id, step) == (b.run_id, 3)
    assert path.read_bytes().startswith(before)
    last = strict_lines(path)[-1]
    assert last["event"] == "metrics" and last["kind"] == "lora_audit" and last["run_id"] == b.run_id
    assert last["step"] == 3 and last["metrics"] == {"stable_rank_mean": 1.5, "sv": ["NaN"]}
    assert strict_lines(path)[-2]["event"] == "run_end"  # no run_start/run_end added by the append


def test_append_metrics_event_creates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.jsonl"
    with pytest.raises(InputError, match="does not exist"):  # a typo never creates a directory and an orphan log
        append_metrics_event(path, "lora_audit", {"x": 1})
    assert not path.parent.exists()
    path.parent.mkdir()
    run_id, step = append_metrics_event(path, "lora_audit", {"x": 1})
    assert step is None and uuid.UUID(run_id).version == 4
    (rec,) = strict_lines(path)
    assert rec["run_id"] == run_id and rec["step"] is None and rec["event"] == "metrics"


def test_append_metrics_event_on_empty_and_on_garbage_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    run_id, _ = append_metrics_event(empty, "lora_audit", {})
    assert strict_lines(empty)[0]["run_id"] == run_id
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(InputError, match="no telemetry records"):
        append_metrics_event(garbage, "lora_audit", {})
    assert garbage.read_bytes() == b"\x89PNG\r\n\x1a\n\x00\x00binary"
    with pytest.raises(InputError, match="not a regular file"):
        append_metrics_event(tmp_path, "lora_audit", {})
