"""QA findings on ``monitor`` over other tools' logs (issue 22, fix B): lost records shown by default (Mo1), run
ids of a ``.`` directory and of an HF output directory (Mo2), weights files named as such (Mo3), the source chosen
in an output directory with two logs (Mo4), the top-level help (R1). Files written by the real writers."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from support.logs_runs import scripted_run


def _write_tb(log_dir: Path, n: int = 30) -> Path:
    """The Trainer's tags, one add_scalar per value (torch's SummaryWriter)."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for event, step, data in scripted_run(n):
        if event == "train_step":
            for key, value in data.items():
                writer.add_scalar("train/" + {"lr": "learning_rate"}.get(key, key), value, step)
        else:
            for key, value in data["metrics"].items():
                writer.add_scalar(f"eval/{key}", value, step)
    writer.close()
    (path,) = log_dir.glob("*tfevents*")
    return path


def _record_offsets(data: bytes) -> list[int]:
    """Where each TFRecord starts (u64 length, 4-byte CRC, data, 4-byte CRC), to aim the damage."""
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    return out


def _monitor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["monitor", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = _monitor(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


# -- Mo1: lost records are a warning, shown without --verbose ---------------------------------------------------
@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tb(tmp_path_factory.mktemp("tb") / "runs" / "Dec06_12-00-00_host")


def test_clean_event_file_has_no_data_loss_finding(tb_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, str(tb_run))
    assert [f for f in doc["status"]["findings"] if f["source"] == "telemetry"] == []
    rc, out, _ = _monitor(capsys, str(tb_run))
    assert rc == 0 and "truncated_record" not in out and "crc_error" not in out


@pytest.mark.parametrize("damage", ["truncated", "data_crc", "length_crc"])
def test_damaged_event_file_is_a_visible_warning(damage: str, tb_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(tb_run.read_bytes())
    starts = _record_offsets(bytes(data))
    at = starts[len(starts) // 2]
    code = "crc_error"
    if damage == "truncated":
        data = data[:at + 5]  # cut inside a record's header
        code = "truncated_record"
    elif damage == "data_crc":
        data[at + 14] ^= 0xFF  # a payload byte: that record is skipped
    else:
        data[at] ^= 0x01  # the length: the rest of the file cannot be framed
    bad = tmp_path / tb_run.name
    bad.write_bytes(bytes(data))

    doc = _json(capsys, str(bad))
    lost = [i for i in doc["telemetry_issues"] if i["code"] == code]
    assert len(lost) == 1 and lost[0]["severity"] == "warning" and lost[0]["offset"] == at
    # a cut or a bad length ends the file before the NaN loss of step 23: the lost data alone makes the warning;
    # a skipped record leaves the NaN loss read (an error)
    assert doc["status"]["overall"] == ("error" if damage == "data_crc" else "warning")
    assert {"source": "telemetry", "code": code, "severity": "warning", "count": 1} in doc["status"]["findings"]

    rc, out, _ = _monitor(capsys, str(bad))  # no --verbose
    assert rc == 0
    assert re.search(rf"^  Status: {doc['status']['overall']}; found: .*{code} \(warning\)", out, re.M), out
    assert re.search(rf"^  \[warning\] {code}: .*byte {at}\b", out, re.M), out
    # the CI gate on telemetry issues (warning or error) still catches the lost data
    rc, _, err = _monitor(capsys, str(bad), "--fail-on", "issues")
    assert rc == 1 and "telemetry issue" in err


@pytest.mark.slow
def test_wandb_corrupt_record_is_a_visible_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("wandb.sdk.internal.datastore")
    from test_logs_wandb import write_wandb_run

    run_dir = write_wandb_run(tmp_path, scripted_run(), pad=3000)
    log = next(run_dir.glob("run-*.wandb"))
    data = bytearray(log.read_bytes())
    data[32768 + 100] ^= 0xFF  # inside the second 32 KiB block
    log.write_bytes(bytes(data))
    doc = _json(capsys, str(run_dir))
    corrupt = [i for i in doc["telemetry_issues"] if i["code"] == "corrupt_record"]
    assert len(corrupt) == 1 and corrupt[0]["severity"] == "warning"
    # the blocks after it are read (the NaN loss of step 23 too: an error), the lost record is a finding
    assert doc["status"]["overall"] == "error"
    assert {"source": "telemetry", "code": "corrupt_record", "severity": "warning", "count": 1} in \
        doc["status"]["findings"]
    rc, out, _ = _monitor(capsys, str(run_dir))
    assert rc == 0 and "[warning] corrupt_record:" in out and "corrupt_record (warning)" in out


# -- Mo2: run ids ------------------------------------------------------------------------------------------------
def test_tensorboard_dot_directory_is_named_by_the_directory(tb_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tb_run.parent)
    doc = _json(capsys, ".")
    assert doc["run_id"] == "Dec06_12-00-00_host" and doc["runs"] == ["Dec06_12-00-00_host"]
    # the same names as the parent directory gives, and as the event file itself
    assert _json(capsys, str(tb_run.parent.parent))["runs"] == ["Dec06_12-00-00_host"]
    assert _json(capsys, tb_run.name)["run_id"] == "Dec06_12-00-00_host"
    # --run-id takes the name, and still "."
    for rid in ("Dec06_12-00-00_host", "."):
        assert _json(capsys, ".", "--run-id", rid)["run_id"] == "Dec06_12-00-00_host"
    rc, _, err = _monitor(capsys, ".", "--run-id", "nope")
    assert rc == 2 and err.count("\n") == 1 and "runs here: Dec06_12-00-00_host" in err


def _trainer_state(path: Path, steps: int) -> Path:
    """A trainer_state.json written by transformers' own TrainerState."""
    from transformers import TrainerState

    history: list[dict[str, Any]] = [{"step": s, "loss": 2.0 - s / 10, "learning_rate": 1e-3, "grad_norm": 0.5,
                                      "epoch": s / steps} for s in range(1, steps + 1)]
    history.append({"step": steps, "eval_loss": 1.5, "epoch": 1.0})
    state = TrainerState(global_step=steps, max_steps=steps, log_history=history)
    path.mkdir(parents=True)
    state.save_to_json(str(path / "trainer_state.json"))
    return path / "trainer_state.json"


def test_hf_output_dir_run_id_is_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "my-lora-run"
    _trainer_state(out / "checkpoint-4", 4)
    state = _trainer_state(out / "checkpoint-8", 8)
    monkeypatch.chdir(out)
    for arg in (".", "checkpoint-8", str(state)):
        doc = _json(capsys, arg)
        assert doc["source"] == "trainer_state" and doc["training"]["last_step"] == 8
        assert doc["run_id"] == "my-lora-run" and doc["runs"] == []  # runs: the ids --run-id takes; none here


def test_llamafactory_run_id_is_its_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lf-out"
    out.mkdir()
    lines = [{"current_steps": s, "total_steps": 5, "loss": 1.0 / s, "lr": 1e-4, "epoch": s / 5, "percentage": 20 * s}
             for s in range(1, 6)]
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    doc = _json(capsys, str(out))
    assert doc["source"] == "llamafactory" and doc["run_id"] == "lf-out" and doc["runs"] == []


# -- Mo3: weights files ------------------------------------------------------------------------------------------
def test_weights_files_are_named_not_read_as_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    st = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.q_proj.lora_A.weight": np.zeros((4, 16), np.float32)}, str(st))
    import gguf

    gg = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(gg), "llama")
    writer.add_tensor("t", np.zeros(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path, what in ((st, "a safetensors weights file"), (gg, "a GGUF model file")):
        rc, out, err = _monitor(capsys, str(path))
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"gradience monitor: error: {path}: this is {what}, not a training log")
        assert "TensorBoard" in err and "trainer_state.json" in err and "UTF-8" not in err
    # the adapter's directory: what it holds and the command that reads it
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    gg.unlink()
    rc, _, err = _monitor(capsys, str(tmp_path))
    assert rc == 2 and err.count("\n") == 1 and "holds an adapter" in err and f"gradience audit --peft-dir {tmp_path}" in err


def test_a_text_log_starting_like_a_length_is_not_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Eight bytes then '{' read as a u64 far past the file's size: not a safetensors header."""
    p = tmp_path / "odd.jsonl"
    p.write_text('        {"schema": "gradience.vnext.telemetry/v1"}\n')
    _rc, _out, err = _monitor(capsys, str(p))
    assert "weights" not in err


# -- Mo4: an output directory with checkpoints and a TensorBoard log ----------------------------------------------
def test_output_dir_says_which_log_it_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _trainer_state(out / "checkpoint-8", 8)
    doc = _json(capsys, str(out))
    assert not [i for i in doc["telemetry_issues"] if i["code"] == "source_choice"]  # one log: nothing to say
    _write_tb(out / "runs" / "Dec06_12-00-00_host")
    doc = _json(capsys, str(out))
    notes = [i for i in doc["telemetry_issues"] if i["code"] == "source_choice"]
    assert doc["source"] == "trainer_state" and len(notes) == 1 and notes[0]["severity"] == "info"
    command = f"gradience monitor {out / 'runs'}"
    assert "checkpoint-8/trainer_state.json" in notes[0]["message"] and notes[0]["message"].endswith(command)
    rc, text, _ = _monitor(capsys, str(out))
    assert rc == 0 and re.search(r"^Note: read checkpoint-8/trainer_state\.json .*" + re.escape(command) + "$", text,
                                 re.M)
    # the path it names reads the other log
    other = _json(capsys, command.split(" ", 2)[2])
    assert other["source"] == "tensorboard" and other["training"]["last_step"] == 30
    # trainer.save_state()'s trainer_state.json in the output directory itself: the same note
    (out / "trainer_state.json").write_bytes((out / "checkpoint-8" / "trainer_state.json").read_bytes())
    notes = [i for i in _json(capsys, str(out))["telemetry_issues"] if i["code"] == "source_choice"]
    assert len(notes) == 1 and notes[0]["message"].startswith("read trainer_state.json; ")
    assert notes[0]["message"].endswith(command)


# -- R1: the top-level help ----------------------------------------------------------------------------------------
def test_top_level_help_names_the_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    lines = {m.group(1): " ".join(m.group(2).split())
             for m in re.finditer(r"^    (\w+) +(.*(?:\n {14}.*)*)", text, re.M)}
    assert all(w in lines["monitor"] for w in ("TensorBoard", "W&B", "LLaMA-Factory", "trainer_state.json"))
    assert "checkpoint series" in lines["report"] and "merge" in lines["report"]
