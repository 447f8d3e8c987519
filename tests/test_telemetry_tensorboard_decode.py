"""The TensorBoard reader's fast paths (issue 22, speed): a read buffer's records decoded as one batch of
TensorBoard's Event, ``simple_value`` scalars taken without the generic path. Checked against what the
SummaryWriter wrote and against a per-record decode with TensorBoard's own ``Event.FromString``."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from gradience.issues import Issue
from gradience.telemetry.logmap import EventBuilder
from gradience.telemetry.tfrecord import records

pytest.importorskip("tensorboard")


def _frame(data: bytes) -> bytes:
    """TFRecord framing as TensorBoard's RecordWriter writes it (its own masked_crc32c)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _write(log_dir: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for step in range(1, 21):
        writer.add_scalar("train/loss", 0.0 if step == 5 else (float("nan") if step == 7 else 1.0 / step), step)
        writer.add_scalar("train/learning_rate", 1e-3, step)
        # new_style writes a tensor-valued scalar (the generic path, TensorBoard's make_ndarray)
        writer.add_scalar("train/grad_norm", 0.5 + step, step, new_style=True)
        if step % 10 == 0:
            writer.add_scalar("eval/loss", 0.75, step)
    writer.close()
    return next(log_dir.glob("*tfevents*"))


def _per_record_events(path: Path) -> list[tuple[str, int | None, dict]]:
    """The same events through TensorBoard's Event.FromString, one record at a time, and the generic add()."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    builder = EventBuilder()
    out: list[tuple[str, int | None, dict]] = []
    for data in records(path, []):
        ev = event_pb2.Event.FromString(data)
        for value in ev.summary.value:
            if value.WhichOneof("value") == "simple_value":
                number = value.simple_value
            else:
                number = float(tensor_util.make_ndarray(value.tensor).reshape(()))
            out.extend(builder.add(value.tag, ev.step, number))
    out.extend(builder.flush())
    return out


def _normalized(events: list[tuple[str, int | None, dict]]) -> list[tuple[str, int | None, dict]]:
    def norm(v: object) -> object:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [(e, s, {k: (norm(v) if not isinstance(v, dict) else {a: norm(b) for a, b in v.items()})
                    for k, v in d.items()}) for e, s, d in events]


def test_batched_decode_equals_per_record_decode(tmp_path: Path) -> None:
    from gradience.telemetry.tensorboard import TensorBoardLog

    path = _write(tmp_path / "tb")
    ours = list(TensorBoardLog(path).events())
    assert _normalized(ours) == _normalized(_per_record_events(path))
    train = {s: d for e, s, d in ours if e == "train_step"}
    assert len(train) == 20 and train[5]["loss"] == 0.0 and math.isnan(train[7]["loss"])
    assert train[3]["grad_norm"] == pytest.approx(3.5) and train[3]["lr"] == pytest.approx(1e-3)
    assert [d["metrics"] for e, _s, d in ours if e == "eval"] == [{"loss": 0.75}, {"loss": 0.75}]


def test_a_record_that_is_not_an_event(tmp_path: Path) -> None:
    """Intact framing around bytes that are not an Event: counted, and every other record of its buffer is
    still read (the batch falls back to one record at a time)."""
    from gradience.telemetry.tensorboard import TensorBoardLog

    path = _write(tmp_path / "tb")
    data = path.read_bytes()
    spliced = tmp_path / "bad" / path.name
    spliced.parent.mkdir()
    first = 16 + struct.unpack("<Q", data[:8])[0]  # after the file_version record
    spliced.write_bytes(data[:first] + _frame(b"\xff\xff\xff\xff") + data[first:])
    log = TensorBoardLog(spliced)
    events = list(log.events())
    assert _normalized(events) == _normalized(_per_record_events(path))
    bad = [i for i in log.issues if i.code == "bad_log_entry"]
    assert len(bad) == 1 and bad[0].message.startswith("1 record(s) are not TensorBoard events")
    assert all(isinstance(i, Issue) for i in log.issues)
