"""Streaming reader: tolerance with line numbers, strict mode, runs, original-tool files, bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradience.errors import InputError
from gradience.telemetry import SCHEMA, TelemetryReader, TelemetryWriter, last_run_position, read_events


def line(event: str, step: int | None = None, run_id: str = "r1", **payload: object) -> str:
    return json.dumps({"schema": SCHEMA, "ts": 1.0, "run_id": run_id, "event": event, "step": step, **payload})


def write(path: Path, *lines: str | bytes, final_newline: bool = True) -> Path:
    chunks = [x if isinstance(x, bytes) else x.encode() for x in lines]
    path.write_bytes(b"\n".join(chunks) + (b"\n" if final_newline else b""))
    return path


def test_every_tolerated_problem_is_one_issue_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "run.jsonl",
        line("run_start", config={}),                                      # 1
        "",                                                                # 2 blank
        "{not json",                                                       # 3 bad JSON
        line("mystery_event", 1),                                          # 4 unknown event
        line("mystery_event", 2),                                          # 5 same unknown event: no new issue
        json.dumps({"schema": "gradience.vnext.telemetry/v9", "event": "train_step", "step": 3, "run_id": "r1",
                    "loss": 1.0}),                                         # 6 unknown schema (still read)
        json.dumps({"schema": "gradience.vnext.telemetry/v9", "event": "train_step", "step": 4,
                    "run_id": "r1"}),                                      # 7 same schema: no new issue
        "[1, 2, 3]",                                                       # 8 not an object
        json.dumps({"schema": SCHEMA, "step": 5}),                         # 9 no event
        b"\xff\xfe\x00garbage\x80",                                        # 10 not UTF-8
        line("train_step", 6, loss=0.5),                                   # 11
        json.dumps({"schema": SCHEMA, "event": "train_step", "step": "x", "run_id": "r1"}),  # 12 bad step
        '{"schema": "gradience.vnext.telemetry/v1", "event": "train_st',   # 13 truncated last line
        final_newline=False,
    )
    reader = TelemetryReader(path)
    records = list(reader)
    assert [(r.line, r.event, r.step) for r in records] == [
        (1, "run_start", None), (4, "mystery_event", 1), (5, "mystery_event", 2), (6, "train_step", 3),
        (7, "train_step", 4), (11, "train_step", 6), (12, "train_step", None)]
    assert [(i.code, i.line) for i in reader.issues] == [
        ("blank_line", 2), ("bad_json", 3), ("unknown_event", 4), ("unknown_schema", 6), ("not_an_object", 8),
        ("missing_event", 9), ("not_utf8", 10), ("bad_step", 12), ("truncated_line", 13)]
    assert reader.lines == 13 and reader.n_records == 7
    # a second pass reports the same issues once, not twice
    assert len(list(reader)) == 7 and len(reader.issues) == 9


def test_terminated_final_line_that_parses_is_fine_and_unterminated_good_line_too(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", line("train_step", 1, loss=1.0), line("train_step", 2, loss=0.5),
                 final_newline=False)
    reader = TelemetryReader(path)
    assert [r.step for r in reader] == [1, 2] and reader.issues == []


@pytest.mark.parametrize("bad,needle", [
    ("", "line 2: blank line"),
    ("{oops", "line 2: not valid JSON"),
    (line("what", 1), "line 2: unknown event 'what'"),
    (json.dumps({"schema": "other/v2", "event": "eval"}), "line 2: schema 'other/v2'"),
    ("42", "line 2: JSON int"),
])
def test_strict_mode_turns_the_first_problem_into_an_input_error(tmp_path: Path, bad: str, needle: str) -> None:
    path = write(tmp_path / "run.jsonl", line("run_start", config={}), bad, line("run_end", status="ok"))
    with pytest.raises(InputError) as err:
        list(TelemetryReader(path, strict=True))
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)
    assert len(list(TelemetryReader(path))) >= 2  # tolerant mode reads it


def test_original_tool_files_bare_nan_tokens_and_nan_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path / "orig.jsonl",
        '{"schema": "gradience.vnext.telemetry/v1", "ts": 1.5, "run_id": "old", "event": "train_step", '
        '"step": 1, "loss": NaN, "grad_norm": Infinity, "lr": -Infinity}',
        line("alert", 2, run_id="old", severity="warning", code="nan", message="NaN", metadata={"x": "NaN"}),
        line("eval", 3, run_id="old", split="eval", metrics={"loss": "Infinity", "accuracy": 0.5}),
    )
    a, b, c = read_events(path)
    assert math.isnan(a.data["loss"]) and a.data["grad_norm"] == math.inf and a.data["lr"] == -math.inf
    assert a.ts == 1.5 and a.run_id == "old"
    assert b.data["message"] == "NaN"            # text fields stay text
    assert math.isnan(b.data["metadata"]["x"])   # payload values are decoded
    assert c.data["metrics"]["loss"] == math.inf and c.data["split"] == "eval"


def test_runs_are_listed_in_order_of_first_appearance(tmp_path: Path) -> None:
    path = write(tmp_path / "runs.jsonl",
                 line("run_start", run_id="a", config={}), line("train_step", 1, run_id="a"),
                 line("run_start", run_id="b", config={}), line("train_step", 9, run_id="b"),
                 line("metrics", None, run_id="a", kind="guard", metrics={}),
                 json.dumps({"schema": SCHEMA, "event": "train_step", "step": 10, "run_id": 123}))
    reader = TelemetryReader(path)
    assert [r.run_id for r in reader] == ["a", "a", "b", "b", "a", "123"]
    assert reader.run_ids == ["a", "b", "123"]


def test_last_run_position(tmp_path: Path) -> None:
    path = write(tmp_path / "runs.jsonl",
                 line("train_step", 50, run_id="a"), line("train_step", 4, run_id="b"),
                 line("train_step", 60, run_id="a"), line("train_step", 5, run_id="b"),
                 line("eval", None, run_id="b", split="test", metrics={}))
    assert last_run_position(path) == ("b", 5)
    only_null = write(tmp_path / "null.jsonl", line("metrics", None, run_id="z", kind="k", metrics={}))
    assert last_run_position(only_null) == ("z", None)


def test_issue_lists_are_capped_and_summarized(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", line("run_start", config={}), *(["{bad"] * 100))
    reader = TelemetryReader(path, max_issues_per_code=5)
    assert len(list(reader)) == 1
    issues = reader.issues
    assert [i.line for i in issues[:5]] == [2, 3, 4, 5, 6]
    summary = issues[5]
    assert summary.code == "bad_json" and summary.extra == {"count": 100, "omitted": 95}
    assert len(issues) == 6


def test_over_long_line_is_skipped_with_an_issue_and_reading_resumes(tmp_path: Path) -> None:
    big = json.dumps({"event": "metrics", "blob": "z" * 3_000_000})
    path = write(tmp_path / "long.jsonl", line("train_step", 1, loss=1.0), big, line("train_step", 2, loss=0.5))
    reader = TelemetryReader(path, max_line_bytes=1 << 20)
    assert [(r.line, r.step) for r in reader] == [(1, 1), (3, 2)]
    (issue,) = reader.issues
    assert issue.code == "line_too_long" and issue.line == 2 and issue.extra["bytes"] == len(big) + 1
    # with the default 16 MiB cap the same line is read
    assert len(list(TelemetryReader(path))) == 3


def test_huge_sparse_line_keeps_memory_bounded(tmp_path: Path) -> None:
    """A 512 MiB line (sparse file, no disk used) must be skipped without being held in memory."""
    path = tmp_path / "huge.jsonl"
    huge = 512 * 1024 * 1024
    with open(path, "wb") as fh:
        fh.write((line("train_step", 1, loss=1.0) + "\n").encode())
        fh.seek(huge, os.SEEK_CUR)  # a hole of NUL bytes: one giant line
        fh.write(("\n" + line("train_step", 2, loss=0.5) + "\n").encode())
    # Peak RSS from /proc (VmHWM, this process image only): getrusage's ru_maxrss would carry over the
    # parent's peak across fork+exec (Linux keeps it), i.e. pytest's, after a torch test ran.
    script = textwrap.dedent(f"""
        import json
        from gradience.telemetry import TelemetryReader
        reader = TelemetryReader({str(path)!r})
        steps = [r.step for r in reader]
        hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        print(json.dumps({{"steps": steps, "issues": [(i.code, i.line) for i in reader.issues],
                          "maxrss_kib": hwm}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result["steps"] == [1, 2]
    assert result["issues"] == [["line_too_long", 2]]
    # Python + gradience + a 16 MiB line buffer is well under 100 MiB; reading the line whole would be > 512 MiB.
    assert result["maxrss_kib"] < 100 * 1024, result


def test_binary_garbage_without_any_record_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(bytes(range(256)) * 50)
    with pytest.raises(InputError, match=r"no telemetry records found .*line 1"):
        list(TelemetryReader(path))
    reader = TelemetryReader(path, require_records=False)
    assert list(reader) == [] and reader.issues


@pytest.mark.parametrize("kind", ["missing", "empty", "directory", "fifo"])
def test_unreadable_inputs_are_one_line_input_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.jsonl"
    expected = {"missing": "no such file", "empty": "empty file", "directory": "is a directory",
                "fifo": "not a regular file"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening a FIFO for reading would block: it must be refused before open()
    with pytest.raises(InputError, match=expected) as err:
        list(TelemetryReader(path))
    assert str(path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; see the FIFO case instead")
def test_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.jsonl", line("train_step", 1))
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        list(TelemetryReader(path))


def test_writer_output_reads_back_without_issues(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as tw:
        tw.run_start({})
        for s in range(1, 50):
            tw.train_step(s, loss=1.0 / s)
        tw.eval(49, "test", {"loss": 0.1})
    reader = TelemetryReader(path, strict=True)
    records = list(reader)
    assert len(records) == 52 and reader.issues == [] and reader.run_ids == [tw.run_id]
    assert records[5].data["loss"] == pytest.approx(1.0 / 5)
