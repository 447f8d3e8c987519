"""bitsandbytes 4-bit (NF4 / FP4) weights, de-quantised in numpy.

Layout, as bitsandbytes 0.50 ``functional.quantize_4bit`` / ``QuantState.as_dict(packed=True)`` and transformers'
``Linear4bit._save_to_state_dict`` write it for a weight ``X.weight`` of logical shape ``shape``:

- ``X.weight``: uint8, two 4-bit codes per byte, the first element in the high nibble (``backends/default/ops.py``
  ``_dequantize_4bit_compute``: ``out[::2] = A >> 4``, ``out[1::2] = A & 0xF``), the flattened weight in row-major
  order, ``ceil(numel / 2)`` bytes;
- ``X.weight.absmax``: one scale per block of ``blocksize`` elements (the last block may be short), float32; with
  double quantisation ("nested", ``compress_statistics=True``) these are uint8 codes of ``absmax - offset``
  quantised blockwise (blocks of ``nested_blocksize``, 256) with the 256-entry dynamic map ``nested_quant_map``
  and per-block scales ``nested_absmax``; ``offset`` is the mean absmax (``nested_offset`` in the JSON blob);
- ``X.weight.quant_map``: the 16 code values (NF4: QLoRA's normal-quantile table; FP4: e2m1 values / 12);
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object with ``quant_type``,
  ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``
  (``utils.pack_dict_to_tensor``).

De-quantisation is ``w = quant_map[code] * absmax[block]`` in float32, then cast to ``dtype`` (bitsandbytes
returns the weight in the dtype it was quantised from). Every size is checked against the headers before any
array is allocated, so a forged blob cannot make the reader allocate more than the file promises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.errors import InputError

# bitsandbytes functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083, use_extra_value=True), the
# NormalFloat4 table of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, appendix E).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes functional.get_4bit_type("fp4"): 1 sign, 2 exponent (bias 2), 1 mantissa bit, in bit-pattern order,
# normalised by the largest magnitude (12).
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW)
# bitsandbytes dequantize_4bit / quantize_blockwise accept these block sizes only.
BLOCKSIZES = frozenset({32, 64, 128, 256, 512, 1024, 2048, 4096})
QUANT_TYPES = ("nf4", "fp4")
STATE_PREFIX = "quant_state.bitsandbytes__"
# The JSON blob holds a handful of fields; a larger one is not bitsandbytes'.
MAX_STATE_BYTES = 64 * 1024
MAX_NDIM = 4
MAX_NUMEL = 2**40
_DTYPES = ("bfloat16", "float16", "float32")
# Elements de-quantised per step (a multiple of every block size): temporaries of a few MB that stay in cache.
_CHUNK = 1 << 20

COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def code_table(quant_type: str) -> np.ndarray:
    """The 16 code values of ``nf4`` / ``fp4`` as float32 (what bitsandbytes stores as ``quant_map``)."""
    if quant_type == "nf4":
        return np.asarray(NF4_CODE, np.float32)
    if quant_type == "fp4":
        return np.asarray(FP4_CODE, np.float32)
    raise ValueError(f"unknown 4-bit quant type {quant_type!r}")


@dataclass(frozen=True)
class Bnb4State:
    """The non-tensor part of a bitsandbytes 4-bit quant state (the JSON blob), validated."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_bytes(self) -> int:
        return -(-self.numel // 2)

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None


def bnb4_companion_keys(weight_key: str, keys: Mapping[str, Any]) -> dict[str, str] | None:
    """``{"state": ..., "absmax": ..., ...}`` for the 4-bit weight ``weight_key`` among ``keys``; None when the
    weight has no ``quant_state.bitsandbytes__*`` companion (it is not a bitsandbytes 4-bit weight)."""
    states = [k for k in (f"{weight_key}.{STATE_PREFIX}{q}" for q in QUANT_TYPES) if k in keys]
    if not states:
        return None
    out = {"state": states[0]}
    for role in COMPANIONS:
        key = f"{weight_key}.{role}"
        if key in keys:
            out[role] = key
    return out


def _positive_int(doc: Mapping[str, Any], field: str, where: str) -> int:
    value = doc.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: 4-bit quant state field {field!r} is {value!r}, not a positive integer")
    return value


def parse_bnb4_state(blob: bytes, where: str) -> Bnb4State:
    """Validate the JSON blob of a bitsandbytes quant state (``where`` names the tensor in messages)."""
    if len(blob) > MAX_STATE_BYTES:
        raise InputError(f"{where}: 4-bit quant state is {len(blob)} bytes; bitsandbytes writes well under "
                         f"{MAX_STATE_BYTES}")
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: 4-bit quant state is not a JSON object") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: 4-bit quant state is not a JSON object")
    quant_type = doc.get("quant_type")
    if quant_type not in QUANT_TYPES:
        raise InputError(f"{where}: 4-bit quant_type {quant_type!r} is not one of nf4, fp4")
    blocksize = _positive_int(doc, "blocksize", where)
    if blocksize not in BLOCKSIZES:
        raise InputError(f"{where}: 4-bit blocksize {blocksize} is not one bitsandbytes uses "
                         f"({', '.join(map(str, sorted(BLOCKSIZES)))})")
    shape = doc.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            or math.prod(shape) > MAX_NUMEL):
        raise InputError(f"{where}: 4-bit quant state shape {str(shape)[:80]} is not 1 to {MAX_NDIM} positive "
                         f"dimensions of at most {MAX_NUMEL} elements")
    dtype = doc.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise InputError(f"{where}: 4-bit quant state dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    nested_blocksize: int | None = None
    offset: float | None = None
    if "nested_blocksize" in doc or "nested_offset" in doc:
        nested_blocksize = _positive_int(doc, "nested_blocksize", where)
        if nested_blocksize not in BLOCKSIZES:
            raise InputError(f"{where}: nested blocksize {nested_blocksize} is not one bitsandbytes uses")
        raw = doc.get("nested_offset")
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not math.isfinite(raw):
            raise InputError(f"{where}: nested_offset {raw!r} is not a finite number")
        offset = float(raw)
    return Bnb4State(quant_type, blocksize, tuple(shape), dtype, nested_blocksize, offset)


def check_companions(state: Bnb4State, metas: Mapping[str, tuple[tuple[int, ...], str]], keys: Mapping[str, str],
                     weight_meta: tuple[tuple[int, ...], str], where: str) -> None:
    """Shapes and dtypes of the packed weight and its companions against ``state``, from headers only.

    ``metas`` maps a tensor key to (shape, safetensors dtype); ``keys`` is :func:`bnb4_companion_keys`' answer.
    """
    def numel(key: str) -> int:
        return math.prod(metas[key][0])

    shape, dtype = weight_meta
    if dtype != "U8" or math.prod(shape) != state.packed_bytes:
        raise InputError(f"{where}: packed 4-bit weight is {dtype}{list(shape)}; its quant state shape "
                         f"{list(state.shape)} needs {state.packed_bytes} uint8 bytes")
    need = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if state.nested else [])
    missing = [r for r in need if r not in keys]
    if missing:
        raise InputError(f"{where}: 4-bit weight without its {', '.join(missing)} tensor(s)")
    absmax_dtype = "U8" if state.nested else "F32"
    if numel(keys["absmax"]) != state.blocks or metas[keys["absmax"]][1] not in (absmax_dtype, "F16", "BF16"):
        raise InputError(f"{where}: absmax is {metas[keys['absmax']][1]}{list(metas[keys['absmax']][0])}; "
                         f"{state.blocks} blocks of {state.blocksize} need {state.blocks} {absmax_dtype} values")
    if numel(keys["quant_map"]) != 16 or metas[keys["quant_map"]][1] != "F32":
        raise InputError(f"{where}: quant_map is not 16 float32 code values")
    if state.nested:
        assert state.nested_blocksize is not None
        nested_blocks = -(-state.blocks // state.nested_blocksize)
        if numel(keys["nested_absmax"]) != nested_blocks or metas[keys["nested_absmax"]][1] != "F32":
            raise InputError(f"{where}: nested_absmax does not hold {nested_blocks} float32 values")
        if numel(keys["nested_quant_map"]) != 256 or metas[keys["nested_quant_map"]][1] != "F32":
            raise InputError(f"{where}: nested_quant_map is not 256 float32 code values")


def _blockwise(values: np.ndarray, scales: np.ndarray, blocksize: int) -> np.ndarray:
    """values (n,) float32 multiplied in place by scales[block] (the last block may be short)."""
    n = values.shape[0]
    full = n - n % blocksize
    if full:
        values[:full].reshape(-1, blocksize)[...] *= scales[:full // blocksize, None]
    if full < n:
        values[full:] *= scales[full // blocksize]
    return values


def nested_absmax(codes: np.ndarray, nested_scales: np.ndarray, nested_code: np.ndarray, nested_blocksize: int,
                  offset: float) -> np.ndarray:
    """The float32 block scales of a double-quantised state (bitsandbytes dequantize_blockwise, then + offset)."""
    absmax = np.asarray(nested_code, np.float32)[np.asarray(codes, np.uint8).reshape(-1)]
    _blockwise(absmax, np.asarray(nested_scales, np.float32).reshape(-1), nested_blocksize)
    absmax += np.float32(offset)
    return absmax


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded in place to ``dtype`` (bfloat16: round to nearest even; float16 via numpy)."""
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        carry = bits >> np.uint32(16)
        carry &= np.uint32(1)
        carry += np.uint32(0x7FFF)
        bits += carry
        bits &= np.uint32(0xFFFF0000)
    elif dtype == "float16":
        values[...] = values.astype(np.float16)
    return values


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, quant_map: np.ndarray, state: Bnb4State, *,
                    round_to_state_dtype: bool = True) -> np.ndarray:
    """The float32 weight (``state.shape``) from packed codes and float32 block scales (already de-nested).

    With ``round_to_state_dtype`` the values are rounded to ``state.dtype`` as bitsandbytes returns them.
    """
    flat = np.asarray(packed).reshape(-1).view(np.uint8)
    code = np.asarray(quant_map, np.float32).reshape(16)
    # byte -> (code[high nibble], code[low nibble]) as one 8-byte word: one gather per byte writes both elements
    pairs = np.ascontiguousarray(np.stack([np.repeat(code, 16), np.tile(code, 16)], axis=1)).view(np.uint64)
    pairs = pairs.reshape(256)
    scales = np.asarray(absmax, np.float32).reshape(-1)
    n = state.numel
    out = np.empty(2 * state.packed_bytes, np.float32)
    words = out.view(np.uint64)
    step = _CHUNK  # a multiple of 2·blocksize: every chunk starts on a block boundary and an even element
    for start in range(0, n, step):
        stop = min(n, start + step)
        byte_lo, byte_hi = start // 2, -(-stop // 2)
        words[byte_lo:byte_hi] = pairs[flat[byte_lo:byte_hi]]
        chunk = out[start:stop]
        _blockwise(chunk, scales[start // state.blocksize:-(-stop // state.blocksize)], state.blocksize)
        if round_to_state_dtype:  # in the chunk while it is in cache
            round_to_dtype(chunk, state.dtype)
    out = out[:n]
    return out.reshape(state.shape)


def quantize_4bit(weight: np.ndarray, quant_type: str = "nf4", blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 codes, float32 absmax): bitsandbytes' quantisation (``backends/default/ops.py``
    ``quantize_4bit``: per-block absmax, values scaled by its reciprocal, nearest code by the midpoints of the
    sorted table). Used for ``deq(Q(W₁₆))``, the base a QLoRA adapter was trained against, from a 16-bit base."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one bitsandbytes uses")
    code = code_table(quant_type)
    order = np.argsort(code, kind="stable")
    bounds = (code[order[:-1]] + code[order[1:]]) / np.float32(2)
    flat = np.asarray(weight, np.float32).reshape(-1)
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    absmax = np.empty(nblocks, np.float32)
    full = n - n % blocksize
    if full:
        np.max(np.abs(flat[:full].reshape(-1, blocksize)), axis=1, out=absmax[:full // blocksize])
    if full < n:
        absmax[-1] = np.abs(flat[full:]).max()
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = flat.copy()
    _blockwise(scaled, inv, blocksize)
    np.clip(scaled, -1, 1, out=scaled)
    if n % 2:
        scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
    q = np.searchsorted(bounds, scaled, side="left").astype(np.uint8)
    if quant_type != "nf4":
        q = order.astype(np.uint8)[q]
    packed = (q[0::2] << np.uint8(4)) | q[1::2]
    return packed, absmax


@dataclass(frozen=True)
class Bnb4Tensor:
    """A validated bitsandbytes 4-bit weight in a safetensors file: its state and its companions' keys."""

    key: str
    state: Bnb4State
    keys: Mapping[str, str]


def find_bnb4_tensors(sf: Any) -> dict[str, Bnb4Tensor]:
    """The bitsandbytes 4-bit weights of a ``SafetensorsFile`` (``sf.tensors`` headers, ``sf.read_raw``), validated
    from the headers and the small JSON blobs only; a malformed one raises ``InputError`` naming the file."""
    tensors = sf.tensors
    metas = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    found: dict[str, Bnb4Tensor] = {}
    for key in tensors:
        head, sep, tail = key.rpartition("." + STATE_PREFIX)
        if not sep or tail not in QUANT_TYPES or head not in tensors:
            continue
        where = f"{sf.path}: {head}"
        blob_meta = tensors[key]
        if blob_meta.dtype != "U8" or blob_meta.numel > MAX_STATE_BYTES:
            raise InputError(f"{where}: 4-bit quant state is {blob_meta.dtype}{list(blob_meta.shape)}, not a short "
                             "uint8 JSON blob")
        state = parse_bnb4_state(bytes(np.asarray(sf.read_raw(key)).reshape(-1)), where)
        if state.quant_type != tail:
            raise InputError(f"{where}: quant state key says {tail} but its JSON says {state.quant_type}")
        keys = bnb4_companion_keys(head, tensors)
        assert keys is not None
        check_companions(state, metas, keys, metas[head], where)
        found[head] = Bnb4Tensor(head, state, keys)
    return found


def read_bnb4(sf: Any, tensor: Bnb4Tensor, *, round_to_state_dtype: bool = True) -> np.ndarray:
    """The de-quantised float32 weight of ``tensor`` (found by :func:`find_bnb4_tensors` in ``sf``)."""
    state, keys = tensor.state, tensor.keys
    absmax = np.asarray(sf.read_raw(keys["absmax"])).reshape(-1)
    if state.nested:
        assert state.nested_blocksize is not None and state.nested_offset is not None
        absmax = nested_absmax(absmax, sf.read_raw(keys["nested_absmax"]), sf.read_raw(keys["nested_quant_map"]),
                               state.nested_blocksize, state.nested_offset)
    elif absmax.dtype != np.float32:
        absmax = np.asarray(sf.read_f32(keys["absmax"]), np.float32).reshape(-1)
    return dequantize_4bit(sf.read_raw(tensor.key), absmax, sf.read_raw(keys["quant_map"]), state,
                           round_to_state_dtype=round_to_state_dtype)
