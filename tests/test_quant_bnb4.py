"""bitsandbytes 4-bit de-quantisation in numpy (gradience.quant.bnb4) against bitsandbytes itself, a hand-computed
case, a real transformers 4-bit checkpoint (UDR against it), and forged quant states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.quant.bnb4 import (
    NF4_CODE,
    code_table,
    dequantize_4bit,
    find_bnb4_tensors,
    nested_absmax,
    parse_bnb4_state,
    quantize_4bit,
    read_bnb4,
)


def _blob(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_hand_computed_nf4_block() -> None:
    # two blocks of 64: codes 0..15 repeated, high nibble first; absmax 2 and 0.5
    codes = np.tile(np.arange(16, dtype=np.uint8), 8)
    packed = (codes[0::2] << 4) | codes[1::2]
    state = parse_bnb4_state(_blob({"quant_type": "nf4", "blocksize": 64, "shape": [8, 16], "dtype": "float32"}), "t")
    out = dequantize_4bit(packed, np.array([2.0, 0.5], np.float32), code_table("nf4"), state)
    expect = np.array([NF4_CODE[c] * (2.0 if i < 64 else 0.5) for i, c in enumerate(codes)], np.float32)
    assert out.shape == (8, 16)
    np.testing.assert_array_equal(out.reshape(-1), expect)


def test_fp4_table_is_e2m1_over_12() -> None:
    table = code_table("fp4")
    assert table[3] == 1.0 and table[11] == -1.0 and table[1] == np.float32(0.0625 / 12)
    assert sorted(abs(v) for v in table[:8]) == sorted(abs(v) for v in table[8:])


def test_bf16_rounding_matches_numpy_halfway_rule() -> None:
    state = parse_bnb4_state(_blob({"quant_type": "nf4", "blocksize": 64, "shape": [2], "dtype": "bfloat16"}), "t")
    # 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (1.0); 1 + 3·2^-8 rounds up
    out = dequantize_4bit(np.array([0xFF], np.uint8), np.array([1.0 + 2**-8], np.float32), code_table("nf4"), state)
    assert out[0] == 1.0
    out = dequantize_4bit(np.array([0xFF], np.uint8), np.array([1.0 + 3 * 2**-8], np.float32), code_table("nf4"),
                          state)
    assert out[0] == np.float32(1.0 + 4 * 2**-8)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((64, 96), 64), ((33, 7), 128), ((5,), 64), ((3, 700), 256)])
def test_matches_bitsandbytes(quant_type: str, nested: bool, shape: tuple[int, ...], blocksize: int) -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = torch.randn(*shape, generator=gen) * 0.02
    w[0] = 3.0 if w.ndim == 1 else w[0]  # one outlier block
    for dtype in (torch.float32, torch.bfloat16):
        q, st = functional.quantize_4bit(w.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                         compress_statistics=nested)
        theirs = functional.dequantize_4bit(q, st).float().numpy()
        packed = st.as_dict(packed=True)
        state = parse_bnb4_state(bytes(packed[f"quant_state.bitsandbytes__{quant_type}"].numpy()), "w")
        assert state.nested == nested and state.shape == shape
        absmax = packed["absmax"].numpy()
        if nested:
            assert state.nested_blocksize is not None and state.nested_offset is not None
            absmax = nested_absmax(absmax, packed["nested_absmax"].numpy(), packed["nested_quant_map"].numpy(),
                                   state.nested_blocksize, state.nested_offset)
        ours = dequantize_4bit(q.numpy(), absmax, packed["quant_map"].numpy(), state)
        np.testing.assert_array_equal(ours, theirs)
    # our quantiser is bitsandbytes' (same codes, same scales)
    q, st = functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    codes, scales = quantize_4bit(w.numpy(), quant_type, blocksize)
    np.testing.assert_array_equal(codes, q.numpy().reshape(-1))
    np.testing.assert_array_equal(scales, st.absmax.numpy())


@pytest.mark.slow
def test_transformers_4bit_checkpoint_and_udr(tmp_path: Path) -> None:
    """A real bnb-4bit checkpoint saved by transformers (NF4, double quant): each weight reads back as bitsandbytes
    de-quantises it, and UDR against it equals the dense computation on those weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gradience.adapter import load_adapter
    from gradience.io.safetensors import SafetensorsFile
    from gradience.udr import UdrInput, measure_udr

    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base16")
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                               bnb_4bit_use_double_quant=nested,
                                               bnb_4bit_compute_dtype=torch.bfloat16)
        qm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base16", quantization_config=qcfg,
                                                               device_map="cpu")
        out = tmp_path / f"base_{quant_type}"
        qm.save_pretrained(out)
        sf = SafetensorsFile(out / "model.safetensors")
        found = find_bnb4_tensors(sf)
        name = "model.layers.0.self_attn.q_proj.weight"
        assert found[name].state.nested == nested and found[name].state.quant_type == quant_type
        layer = qm.model.layers[0].self_attn.q_proj
        import bitsandbytes.functional as bf
        theirs = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().numpy()
        ours = read_bnb4(sf, found[name])
        np.testing.assert_array_equal(ours, theirs)

        torch.manual_seed(1)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base16", dtype=torch.float32)
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                       init_lora_weights=False))
        pm.save_pretrained(tmp_path / "adapter")
        pair = next(p for p in load_adapter(str(tmp_path / "adapter")).pairs if p.name.endswith("q_proj"))
        a, b = pair.load_factors()
        delta = pair.scale * (b.astype(np.float64) @ a)
        report = measure_udr([UdrInput(pair.name, float(np.linalg.norm(delta, 2)), float(np.linalg.norm(delta)),
                                       pair.d_out, pair.d_in, scale=pair.scale)], str(out), use_cache=False)
        row = report.per_layer[pair.name]
        assert not [i for i in report.issues if "dtype" in i.code]
        assert row["base_frob_norm"] == pytest.approx(np.linalg.norm(theirs), rel=1e-5)
        assert row["udr"] == pytest.approx(np.linalg.norm(delta, 2) / np.linalg.norm(theirs.astype(np.float64), 2),
                                           rel=1e-3)


def _forge(tmp_path: Path, doc: dict, packed_bytes: int, absmax: int, absmax_dtype: str = "F32") -> Path:
    """A safetensors file with one 4-bit weight whose headers say what the test wants."""
    blob = _blob(doc)
    entries = [("w.weight", "U8", [packed_bytes, 1], packed_bytes), ("w.weight.absmax", absmax_dtype, [absmax],
               absmax * (1 if absmax_dtype == "U8" else 4)), ("w.weight.quant_map", "F32", [16], 64),
               ("w.weight.quant_state.bitsandbytes__nf4", "U8", [len(blob)], len(blob))]
    header: dict = {}
    data = b""
    for name, dtype, shape, n in entries:
        chunk = blob if name.endswith("nf4") else bytes(n)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += chunk
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("doc,packed,absmax,needle", [
    ({"quant_type": "nf4", "blocksize": 64, "shape": [1 << 20, 1 << 19], "dtype": "bfloat16"}, 32, 1,
     "needs 274877906944 uint8 bytes"),
    ({"quant_type": "nf4", "blocksize": 64, "shape": [8, 8], "dtype": "bfloat16"}, 32, 5, "1 blocks of 64 need 1"),
    ({"quant_type": "nf4", "blocksize": 48, "shape": [8, 8]}, 32, 1, "blocksize 48"),
    ({"quant_type": "nf4", "blocksize": 64, "shape": [8, -8]}, 32, 1, "positive"),
    ({"quant_type": "nf4", "blocksize": 64, "shape": [8, 8], "nested_blocksize": 256}, 32, 1, "nested_offset"),
    ({"quant_type": "int8", "blocksize": 64, "shape": [8, 8]}, 32, 1, "quant_type"),
])
def test_forged_states_are_one_line_errors(tmp_path: Path, doc: dict, packed: int, absmax: int, needle: str) -> None:
    from gradience.io.safetensors import SafetensorsFile

    doc = dict(doc)
    sf = SafetensorsFile(_forge(tmp_path, doc, packed, absmax))
    with pytest.raises(InputError) as err:
        find_bnb4_tensors(sf)
    text = str(err.value)
    assert needle in text and "\n" not in text and "w.weight" in text


def test_forged_4bit_base_is_an_unreadable_shard_for_udr(tmp_path: Path) -> None:
    """UDR against a base whose 4-bit state lies about its shape: the shard is reported unusable, no crash."""
    from gradience.udr import UdrInput, measure_udr

    base = tmp_path / "base"
    base.mkdir()
    _forge(base, {"quant_type": "nf4", "blocksize": 64, "shape": [4096, 4096], "dtype": "bfloat16"}, 32, 1)
    (base / "config.json").write_text("{}")
    report = measure_udr([UdrInput("w", 1.0, 1.0, 8, 8)], str(base), use_cache=False)
    codes = [i.code for i in report.issues]
    assert "base_shard_unreadable" in codes and report.per_layer["w"]["udr"] is None
