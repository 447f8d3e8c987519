"""The validating safetensors reader: dtypes without torch, laziness, and malformed files."""

import json
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradience.errors import InputError
from gradience.io.safetensors import SafetensorsFile


def _raw_file(path, header: dict, data: bytes = b"", header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)


def test_reads_f32_f16_f64_int_like_the_reference(tmp_path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float16),
        "c": rng.normal(size=(2, 2, 2)).astype(np.float64),
        "d": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert sorted(f.keys()) == sorted(tensors)
    for name, ref in tensors.items():
        got = f.read(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
    assert f.read_f32("b").dtype == np.float32


def test_bf16_matches_torch(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    ref = torch.randn(7, 9, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_torch({"w": ref}, str(path))
    f = SafetensorsFile(path)
    assert f.tensors["w"].dtype == "BF16"
    got = f.read("w")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref.float().numpy())


def test_read_is_a_lazy_view(tmp_path) -> None:
    big = np.ones((1024, 1024), dtype=np.float32)  # 4 MiB
    path = tmp_path / "big.safetensors"
    save_file({"w": big}, str(path))
    tracemalloc.start()
    f = SafetensorsFile(path)
    view = f.read("w")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert view.base is not None and not view.flags.owndata
    assert peak < 1 << 20  # opening and mapping did not copy the 4 MiB tensor


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "exceeds the 100 MB limit"),
        (lambda p: p.write_bytes(struct.pack("<Q", 5000) + b"{}"), "runs past the end of the file"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not valid JSON"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}},
                             b"\0" * 16), "bytes of data"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
         "truncated"),
        (lambda p: _raw_file(p, {"w": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"),
         "unknown dtype"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "invalid shape"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8),
         "out of order"),
        (lambda p: _raw_file(p, [1, 2]), "not a JSON object"),
    ],
)
def test_malformed_files_name_the_file_and_problem(tmp_path, make, needle) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(InputError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        SafetensorsFile(tmp_path / "absent.safetensors")
