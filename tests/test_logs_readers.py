"""monitor on logs written by other tools (issue 22): TensorBoard, LLaMA-Factory, W&B exports.

Each log is written by the real writer (torch's SummaryWriter; LLaMA-Factory's documented line format; W&B's
export layout) from one scripted run; its ``monitor --json`` must equal (modulo ``source`` and the file
bookkeeping) the monitor of a run.jsonl holding the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.monitor import monitor_run
from gradience.monitor.sources import resolve_run_path
from support.logs_runs import (
    assert_same_but_clipping_default,
    assert_same_run,
    f32,
    reference_jsonl,
    run_json,
    scripted_run,
)


def _tensorboard() -> None:
    """TensorBoard tests skip without the [tensorboard] extra; the LLaMA-Factory / W&B export ones need none."""
    pytest.importorskip("tensorboard")

def write_tensorboard(log_dir: Path, events: list[tuple[str, int, dict[str, Any]]], extra_tag: bool = True) -> Path:
    """The Trainer's tag names (transformers ``rewrite_logs``), one add_scalar per value, as it logs them."""
    _tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    names = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}
    writer = SummaryWriter(str(log_dir))
    for event, step, data in events:
        if event == "train_step":
            for key, value in data.items():
                writer.add_scalar(f"train/{names[key]}", value, step)
            if extra_tag:
                writer.add_scalar("train/rewards/chosen", 0.1, step)  # a TRL metric (monitor's trl block)
                writer.add_scalar("train/my_metric", 0.2, step)  # a metric nothing knows
        else:
            for key, value in data["metrics"].items():
                writer.add_scalar(f"eval/{key}", value, step)
            writer.add_scalar("train/epoch", step / 30, step)  # the Trainer logs the epoch with each eval
    writer.close()
    files = sorted(log_dir.glob("*tfevents*"))
    assert len(files) == 1
    return files[0]


@pytest.fixture(scope="module")
def tb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tensorboard(tmp_path_factory.mktemp("tb") / "runs" / "Dec06_12-00-00_host", scripted_run())


def test_tensorboard_equals_jsonl(tb_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the TRL tag rides in the train_steps (monitor's trl block): the equivalent run.jsonl carries it too
    ref_events = [(e, s, {**d, "rewards/chosen": 0.1} if e == "train_step" else d) for e, s, d in scripted_run()]
    ref = run_json(capsys, reference_jsonl(tmp_path / "run.jsonl", ref_events, f32))
    for path in (tb_file, tb_file.parent, tb_file.parent.parent.parent):  # the file, its run dir, output_dir
        ours = run_json(capsys, path)
        assert ours["source"] == "tensorboard"
        assert_same_run(ours, ref)
    t = ref["training"]
    assert t["steps_logged"] == 30 and t["nonfinite_loss"]["count"] == 1 and t["loss_spikes"]["count"] >= 1
    assert ref["signals"]["eval_splits"] == ["eval"]
    unknown = [i for i in ours["telemetry_issues"] if i["code"] == "unknown_tag"]
    assert unknown and unknown[0]["tags"] == {"train/my_metric": 30}
    known = [i for i in ours["telemetry_issues"] if i["code"] == "known_tag"]
    assert known and known[0]["tags"] == {"train/rewards/chosen": 30}
    # a gate reads the same report
    assert main(["monitor", str(tb_file), "--fail-on", "nan_loss"]) == 1
    capsys.readouterr()


def test_tensorboard_by_content_not_name(tb_file: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "log.jsonl"
    renamed.write_bytes(tb_file.read_bytes())
    assert resolve_run_path(renamed).kind == "tensorboard"
    assert monitor_run(renamed).training["steps_logged"] == 30


def test_tensorboard_several_runs_and_run_id(tmp_path: Path) -> None:
    short = [e for e in scripted_run() if e[1] <= 12]
    write_tensorboard(tmp_path / "runs" / "a_first", short, extra_tag=False)
    write_tensorboard(tmp_path / "runs" / "b_second", scripted_run(), extra_tag=False)
    report = monitor_run(tmp_path / "runs")
    assert report.runs == ["a_first", "b_second"] and report.run_id == "b_second"
    assert report.training["steps_logged"] == 30
    first = monitor_run(tmp_path / "runs", run_id="a_first")
    assert first.training["steps_logged"] == 12 and first.training["last_step"] == 12
    from gradience.errors import InputError

    with pytest.raises(InputError, match="no run with id 'zzz'"):
        monitor_run(tmp_path / "runs", run_id="zzz")


# -- hostile event files --------------------------------------------------------------------------------------
def _records(data: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of each record, from the framing (test-side helper to aim the corruption)."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = np.frombuffer(data[pos:pos + 8], dtype="<u8")
        out.append((pos, 16 + int(n)))
        pos += 16 + int(n)
    return out


def test_truncated_event_file_reports_and_keeps_the_prefix(tb_file: Path, tmp_path: Path) -> None:
    data = tb_file.read_bytes()
    recs = _records(data)
    cut_at = recs[len(recs) // 2][0] + 5  # inside a record's header
    bad = tmp_path / "events.out.tfevents.1.host"
    bad.write_bytes(data[:cut_at])
    full = monitor_run(tb_file)
    report = monitor_run(bad)
    codes = [i.code for i in report.telemetry_issues]
    assert "truncated_record" in codes
    issue = next(i for i in report.telemetry_issues if i.code == "truncated_record")
    assert issue.extra["offset"] == recs[len(recs) // 2][0] and issue.severity == "warning"
    assert 0 < report.training["steps_logged"] < full.training["steps_logged"]
    # cut inside the data of the last record
    bad.write_bytes(data[:-3])
    assert [i.code for i in monitor_run(bad).telemetry_issues if i.code == "truncated_record"]
    # --strict-schema turns it into an input error
    from gradience.errors import InputError

    with pytest.raises(InputError, match="truncated"):
        monitor_run(bad, strict=True)


def test_crc_errors(tb_file: Path, tmp_path: Path) -> None:
    data = bytearray(tb_file.read_bytes())
    recs = _records(bytes(data))
    off, _size = recs[10]
    data[off + 14] ^= 0xFF  # a byte of the record's payload: its data CRC fails, the record is skipped
    bad = tmp_path / "events.out.tfevents.2.host"
    bad.write_bytes(bytes(data))
    report = monitor_run(bad)
    crc = [i for i in report.telemetry_issues if i.code == "crc_error"]
    assert len(crc) == 1 and crc[0].extra["offset"] == off
    full = monitor_run(tb_file)
    # one value lost, everything after it still read
    assert report.training["last_step"] == full.training["last_step"]
    # a corrupt length: its CRC fails and the rest cannot be framed
    data = bytearray(tb_file.read_bytes())
    data[recs[20][0]] ^= 0x01
    bad.write_bytes(bytes(data))
    report = monitor_run(bad)
    crc = [i for i in report.telemetry_issues if i.code == "crc_error"]
    assert crc and "length CRC" in crc[0].message and crc[0].extra["offset"] == recs[20][0]
    assert report.training["last_step"] < full.training["last_step"]


def test_huge_declared_record_is_bounded(tb_file: Path, tmp_path: Path) -> None:
    """A 1 GiB event file (sparse: not written) whose next record declares 1 GiB: refused by its length, in
    bounded memory, with the values before it kept."""
    import tracemalloc

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    length = (1 << 30).to_bytes(8, "little")
    big = tmp_path / "events.out.tfevents.3.host"
    with open(big, "wb") as f:
        f.write(tb_file.read_bytes())
        f.write(length + masked_crc32c(length).to_bytes(4, "little"))
        f.truncate(1 << 30)
    assert big.stat().st_size == 1 << 30
    tracemalloc.start()
    try:
        report = monitor_run(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    assert [i.code for i in report.telemetry_issues].count("record_too_large") == 1
    assert report.training["steps_logged"] == 30


@pytest.mark.slow
def test_large_event_file_memory_is_bounded(tb_file: Path, tmp_path: Path) -> None:
    """~50 MB of real records (the SummaryWriter's bytes, repeated): monitor's peak RSS grows by far less than
    the file (a streaming read), measured in child processes."""
    import subprocess
    import sys

    data = tb_file.read_bytes()
    recs = _records(data)
    body = b"".join(data[o:o + n] for o, n in recs[1:])  # every record but the file_version header
    big = tmp_path / "big" / "events.out.tfevents.4.host"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.write(data[:recs[0][1]])
        while f.tell() < 50 * 1024 * 1024:
            f.write(body)
    code = ("import resource, sys; from gradience.monitor import monitor_run; r = monitor_run(sys.argv[1]); "
            "print(r.lines, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")

    def rss(path: Path) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                             check=True).stdout.split()
        return int(out[0]), int(out[1]) * 1024

    n_small, small = rss(tb_file)
    n_big, large = rss(big)
    assert n_big > 100 * n_small
    assert large - small < 25 * 1024 * 1024, (small, large)


# -- LLaMA-Factory and W&B exports ---------------------------------------------------------------------------
def llamafactory_lines(events: list[tuple[str, int, dict[str, Any]]], total: int = 30) -> str:
    """``LogCallback.on_log`` (src/llamafactory/train/callbacks.py): keys with a None value are left out."""
    lines = []
    for event, step, data in events:
        logs: dict[str, Any] = {"current_steps": step, "total_steps": total}
        if event == "train_step":
            logs.update(loss=data["loss"], lr=data["lr"], epoch=data["epoch"], grad_norm=data["grad_norm"])
        else:
            logs.update(eval_loss=data["metrics"]["loss"], eval_accuracy=data["metrics"]["accuracy"])
        logs.update(percentage=round(step / total * 100, 2), elapsed_time="0:00:10", remaining_time="0:00:20")
        lines.append(json.dumps(logs))  # NaN is written as NaN, as Python's json does
    return "\n".join(lines) + "\n"


def test_llamafactory_equals_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = scripted_run()
    path = tmp_path / "trainer_log.jsonl"
    path.write_text(llamafactory_lines(events))
    ours = run_json(capsys, path)
    assert ours["source"] == "llamafactory"
    # LLaMA-Factory runs on the Trainer, so its max_grad_norm default applies as for the Trainer's own
    # trainer_state.json holding the same values: that monitor is equal in full
    state = tmp_path / "state" / "trainer_state.json"
    state.parent.mkdir()
    history = []
    for event, step, data in events:
        if event == "train_step":
            history.append({"loss": data["loss"], "learning_rate": data["lr"], "grad_norm": data["grad_norm"],
                            "epoch": data["epoch"], "step": step})
        else:
            history.append({f"eval_{k}": v for k, v in data["metrics"].items()} | {"step": step})
    state.write_text(json.dumps({"log_history": history}))
    assert ours["training"]["failure_signatures"]["clipping"]["max_grad_norm_source"] == "transformers default"
    same_state = run_json(capsys, state)
    for key in ("signals", "training", "alerts", "status"):  # trainer_state always has a (here empty) config
        assert ours[key] == same_state[key], key
    # and the run.jsonl of the same values differs only by what that default adds (clipping evidence)
    ref_path = tmp_path / "ref" / "run.jsonl"
    ref_path.parent.mkdir()
    assert_same_but_clipping_default(ours, run_json(capsys, reference_jsonl(ref_path, events)))
    # the output directory (one *.jsonl) is read the same way
    assert run_json(capsys, tmp_path)["source"] == "llamafactory"
    assert not [i for i in ours["telemetry_issues"] if i["code"] == "unknown_tag"]


def test_llamafactory_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text(llamafactory_lines(scripted_run()[:5]) + "{not json\n[1]\n")
    report = monitor_run(path)
    assert report.training["steps_logged"] == 5
    assert [i.code for i in report.telemetry_issues].count("bad_log_entry") == 2


def test_wandb_exports_equal_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``run.history()`` as JSON rows, and the UI's CSV (``<run> - key`` columns with __MIN/__MAX)."""
    events = scripted_run()
    names = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
             "epoch": "train/epoch"}
    rows: list[dict[str, Any]] = []
    for i, (event, step, data) in enumerate(events):
        row: dict[str, Any] = {"_step": i, "train/global_step": step, "_runtime": 1.0 + i}
        if event == "train_step":
            row.update({names[k]: v for k, v in data.items()})
        else:
            row.update({f"eval/{k}": v for k, v in data["metrics"].items()})
        rows.append(row)
    ref_path = tmp_path / "ref" / "run.jsonl"
    ref_path.parent.mkdir()
    ref = run_json(capsys, reference_jsonl(ref_path, events))
    as_json = tmp_path / "history.json"
    as_json.write_text(json.dumps(rows))
    ours = run_json(capsys, as_json)
    assert ours["source"] == "wandb_export"
    assert_same_but_clipping_default(ours, ref)
    plain = tmp_path / "plain.json"  # no train/global_step: not known to be a Trainer run, equal in full
    plain.write_text(json.dumps([{k: v for k, v in r.items() if k != "train/global_step"} | {"_step": s}
                                 for r, (_, s, _) in zip(rows, events, strict=False)]))
    assert_same_run(run_json(capsys, plain), ref)
    as_lines = tmp_path / "history.jsonl"  # the same rows as JSON lines
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = run_json(capsys, as_lines)
    assert ours["source"] == "wandb_export"
    assert_same_but_clipping_default(ours, ref)
    columns = sorted({k for r in rows for k in r})
    header = ["Step" if c == "_step" else f"my-run - {c}" for c in columns]
    header += ["my-run - train/loss__MIN", "my-run - train/loss__MAX"]
    lines = [",".join(header)]
    for r in rows:
        cells = ["" if c not in r else repr(float(r[c])) if c != "_step" else str(r[c]) for c in columns]
        lines.append(",".join([*cells, "0", "0"]))
    as_csv = tmp_path / "export.csv"
    as_csv.write_text("\n".join(lines) + "\n")
    ours = run_json(capsys, as_csv)
    assert ours["source"] == "wandb_export"
    assert_same_but_clipping_default(ours, ref)


def test_missing_extra_is_one_line(tb_file: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['tensorboard'] = None; sys.modules['google_crc32c'] = None; "
            "from gradience.cli.main import main; sys.exit(main(['monitor', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tb_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gradience[tensorboard]" in lines[0] and "Traceback" not in proc.stderr


def test_report_on_tensorboard_and_llamafactory(tb_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gradience report`` reads the same logs: the run view with its loss curve."""
    page = tmp_path / "tb.html"
    assert main(["report", str(tb_file.parent), "-o", str(page)]) == 0
    html = page.read_text()
    assert "<svg" in html and "spike" in html.lower()
    lf = tmp_path / "trainer_log.jsonl"
    lf.write_text(llamafactory_lines(scripted_run()))
    assert main(["report", str(lf), "-o", str(tmp_path / "lf.html")]) == 0
    capsys.readouterr()
    assert "<svg" in (tmp_path / "lf.html").read_text()


@pytest.mark.parametrize("case", ["csv_huge_field", "json_deep", "json_not_rows", "lf_only_garbage"])
def test_hostile_exports_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case == "csv_huge_field":
        path = tmp_path / "export.csv"
        path.write_text('Step,run - train/loss\n1,0.5\n2,"' + "x" * 200_000 + '"\n')
    elif case == "json_deep":
        path = tmp_path / "history.json"
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "json_not_rows":
        path = tmp_path / "history.json"
        path.write_text("[1, 2, 3]")
    else:
        path = tmp_path / "trainer_log.jsonl"
        path.write_text('{"current_steps": 1, "total_steps": 2, "percentage": 50}\n{bad\n')
    assert main(["monitor", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradience monitor: error: ") and "internal error" not in err[0]


def test_follow_a_finished_event_file(tb_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--follow reads TensorBoard logs too (tests/test_follow_external.py); on a file that no longer grows and
    holds no end-of-training summary, --idle-timeout ends it with the one-shot report."""
    ours = run_json(capsys, tb_file, "--follow", "--interval", "0.01", "--idle-timeout", "0.05")
    assert ours == run_json(capsys, tb_file)
