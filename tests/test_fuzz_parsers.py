"""Property-based fuzzing (hypothesis) of the parsers that face untrusted files: the safetensors header
parser, the config loaders and the telemetry reader. Property: whatever the bytes, the result is either a
parsed value or an ``InputError`` naming the file — never another exception. Example counts are bounded so
the whole module runs in seconds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradience.config.loader import read_mapping
from gradience.errors import InputError
from gradience.io.safetensors import SafetensorsFile
from gradience.telemetry import TelemetryReader

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "X", ""]) | json_values
shapes = st.lists(st.integers(-2, 9), max_size=4) | json_values
offsets = st.lists(st.integers(-4, 600), min_size=0, max_size=3) | json_values
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}) | json_values


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="gradience_fuzz_"))


def _check_safetensors(path: Path) -> None:
    try:
        sf = SafetensorsFile(path)
    except InputError as exc:
        assert exc.path == str(path)
        return
    for name, info in sf.tensors.items():  # whatever the header accepted must read back
        arr = sf.read_raw(name)
        assert arr.shape == info.shape and arr.nbytes == info.nbytes


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), entries, max_size=4), data_len=st.integers(0, 700),
       pad=st.booleans())
def test_structured_headers(header: dict[str, Any], data_len: int, pad: bool) -> None:
    path = _tmp() / "w.safetensors"
    raw = json.dumps(header, allow_nan=True).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_len))
    _check_safetensors(path)


@FUZZ
@given(blob=st.binary(max_size=400), declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_raw_bytes(blob: bytes, declared: int | None) -> None:
    path = _tmp() / "w.safetensors"
    prefix = b"" if declared is None else declared.to_bytes(8, "little")
    path.write_bytes(prefix + blob)
    _check_safetensors(path)


@FUZZ
@given(tensors=st.lists(st.tuples(st.sampled_from(["F32", "F16", "BF16"]),
                                  st.lists(st.integers(0, 5), min_size=1, max_size=3)), min_size=1, max_size=4),
       cut=st.integers(0, 64))
def test_valid_files_round_trip_and_truncations_fail_cleanly(tensors: list[tuple[str, list[int]]], cut: int) -> None:
    size = {"F32": 4, "F16": 2, "BF16": 2}
    header, offset, data = {}, 0, b""
    for i, (dtype, shape) in enumerate(tensors):
        n = int(np.prod(shape)) * size[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        data += bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        offset += n
    raw = json.dumps(header).encode()
    path = _tmp() / "w.safetensors"
    full = len(raw).to_bytes(8, "little") + raw + data
    path.write_bytes(full)
    sf = SafetensorsFile(path)
    assert list(sf.tensors) == list(header)
    path.write_bytes(full[: max(0, len(full) - cut)])
    if cut:
        try:
            SafetensorsFile(path)
        except InputError:
            pass
        else:
            raise AssertionError("a truncated file was accepted")


@FUZZ
@given(text=st.text(max_size=300), suffix=st.sampled_from([".json", ".yaml", ".yml", ".cfg"]))
def test_config_loader_text(text: str, suffix: str) -> None:
    path = _tmp() / f"c{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = read_mapping(path)
    except InputError as exc:
        assert exc.path == str(path)
    else:
        assert isinstance(data, dict)


@FUZZ
@given(value=json_values, suffix=st.sampled_from([".json", ".yaml"]))
def test_config_loader_structures(value: Any, suffix: str) -> None:
    """Whatever JSON structure (YAML is a superset), the check pipeline reads it or refuses it cleanly."""
    from gradience.config import snapshot_from_sources

    path = _tmp() / f"c{suffix}"
    path.write_text(json.dumps({"lora": value, "learning_rate": value, "r": value}, allow_nan=True))
    try:
        data = read_mapping(path)
        snapshot_from_sources(config=data, origins={"config": str(path)})
    except InputError:
        pass


records = st.fixed_dictionaries(
    {"event": st.sampled_from(["run_start", "train_step", "eval", "metrics", "alert", "run_end",
                               "recommendation", "odd"]) | json_values},
    optional={"schema": st.just("gradience.vnext.telemetry/v1") | json_values, "run_id": json_values,
              "step": st.integers(-5, 5) | json_values, "ts": json_values, "loss": json_values,
              "lr": json_values, "split": json_values, "metrics": json_values, "config": json_values,
              "kind": json_values, "message": json_values, "severity": json_values, "context": json_values,
              "status": json_values, "recommendations": json_values, "meta": json_values})
lines = st.one_of(records.map(lambda r: json.dumps(r, allow_nan=True)), st.text(max_size=40),
                  st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(body=st.lists(lines, min_size=1, max_size=12), trailing_newline=st.booleans())
def test_telemetry_reader_and_monitor(body: list[str], trailing_newline: bool) -> None:
    from gradience.monitor import monitor_run

    path = _tmp() / "run.jsonl"
    path.write_text("\n".join(body) + ("\n" if trailing_newline else ""), encoding="utf-8",
                    errors="surrogatepass")
    try:
        for rec in TelemetryReader(path, require_records=False):
            assert isinstance(rec.data, dict) and isinstance(rec.event, str)
    except InputError as exc:
        assert exc.path == str(path) and "empty file" in exc.problem
    try:
        report = monitor_run(path)
    except InputError as exc:
        assert exc.path == str(path)
    else:
        from gradience.jsonio import dumps
        from gradience.monitor.render import render_text

        dumps(report.to_dict())
        render_text(report, verbose=True)


# -- issue 17: the one bounded JSON loader and compare's audit JSON reader ------------------------------------
deep_json_values = st.recursive(json_scalars | st.integers(-10**400, 10**400),
                                lambda kids: st.lists(kids, max_size=2) | st.dictionaries(st.text(max_size=4), kids,
                                                                                          max_size=2),
                                max_leaves=80)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _max_int(value: Any) -> int:
    if isinstance(value, dict):
        return max((_max_int(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_max_int(v) for v in value), default=0)
    return abs(value) if type(value) is int else 0


@FUZZ
@given(value=deep_json_values, max_depth=st.integers(1, 8))
def test_loads_bounded_matches_a_recursive_check(value: Any, max_depth: int) -> None:
    """Accepted exactly when the document is within the depth and integer bounds (an independent recursive
    measure on these shallow values); otherwise one InputError naming the file."""
    from gradience.jsonio import MAX_JSON_INT, loads_bounded

    text = json.dumps(value)
    fits = _depth(value) <= max_depth and _max_int(value) <= MAX_JSON_INT
    try:
        out = loads_bounded(text, "f.json", max_depth=max_depth, max_abs_int=MAX_JSON_INT)
    except InputError as exc:
        assert not fits and str(exc).startswith("f.json: ")
    else:
        assert fits
        assert json.dumps(out) == text


@FUZZ
@given(value=json_values, as_reference=st.booleans())
def test_compare_audit_json_reader(value: Any, as_reference: bool) -> None:
    from gradience.compare.sides import load_audit_json

    doc: Any = value
    if as_reference:
        doc = {"total_lora_params": 1, "layer_data": {"layer_rows": value}}
    elif isinstance(value, dict):
        doc = {"schema": "gradience.audit/v1", **value}
    path = _tmp() / "a.json"
    path.write_text(json.dumps(doc))
    try:
        out = load_audit_json(path)
    except InputError as exc:
        assert str(path) in str(exc)
    else:
        assert out["schema"] == "gradience.audit/v1" and out["layers"]
        assert all(isinstance(r, dict) and isinstance(r["name"], str) for r in out["layers"])
