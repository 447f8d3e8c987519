"""``gradience verify --merged`` with QLoRA adapters: a bitsandbytes 4-bit base read de-quantised, and a 16-bit base
checked against both W16 and deq(Q(W16)) so that the base a merge used is named (unsloth-zoo PR 810).

The 4-bit checkpoints are written in bitsandbytes' saved layout (``QuantState.as_dict(packed=True)`` next to the
packed weight, as transformers saves a Linear4bit) from bitsandbytes' own CPU ``quantize_4bit``; the expected
de-quantised weights come from bitsandbytes' ``dequantize_4bit``, independent of gradience's numpy reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.cli.main import main
from gradience.verify import verify_merged
from gradience.verify.verdict import REASONS
from support import verify_triples as vt

torch = pytest.importorskip("torch")
functional = pytest.importorskip("bitsandbytes.functional")

NAMES = vt.module_names()
Q, K, V, OPROJ, GATE, UP, DOWN = NAMES
_NP = {"U8": np.uint8, "F32": np.float32}


def _write_raw(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file of (dtype, array) tensors, BF16 given as float32 values (written by their top bits)."""
    header: dict = {}
    chunks = []
    offset = 0
    for name, (dtype, arr) in tensors.items():
        if dtype == "BF16":
            data = (np.ascontiguousarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(arr, _NP[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def _bnb4(w: np.ndarray, quant_type: str, nested: bool) -> tuple[dict[str, tuple[str, np.ndarray]], np.ndarray]:
    """bitsandbytes' saved tensors of one bf16 weight (suffixes of ``X.weight``) and its de-quantised values."""
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(torch.bfloat16)
    q, state = functional.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    deq = functional.dequantize_4bit(q, state).float().numpy()
    out = {"": ("U8", q.numpy())}
    for key, value in state.as_dict(packed=True).items():
        arr = value.numpy()
        out["." + key] = ("U8" if arr.dtype == np.uint8 else "F32", arr)
    return out, deq


def _twin(w: np.ndarray, quant_type: str = "nf4", nested: bool = False, f32: bool = False) -> np.ndarray:
    """deq(Q(W16)) by bitsandbytes itself (block 64, bf16 out, or fp32 from an fp32 weight; ``nested``: double
    quantisation)."""
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(torch.float32 if f32 else torch.bfloat16)
    q, state = functional.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    return functional.dequantize_4bit(q, state).float().numpy()


def _drop_module(adapter: Path, pairs: dict, module: str) -> None:
    """Rewrite the adapter without ``module`` (so its base weight is one no adapter module adapts)."""
    from support.synthetic import write_safetensors

    tensors = {}
    for name, (a, b, _s) in pairs.items():
        if name != module:
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    write_safetensors(adapter / "adapter_model.safetensors", tensors, dtype="F32")
    del pairs[module]


def _rows(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["modules"]}


def _run(base: Path, adapter: Path, merged: Path, **kw: object) -> dict:
    return verify_merged(load_adapter(str(adapter)), str(merged), str(base), **kw)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_correct_qlora_merge_is_exact_against_a_4bit_base(tmp_path: Path, quant_type: str, nested: bool) -> None:
    w16 = vt.make_base(tmp_path / "base16")                       # bf16 values, float32
    pairs = vt.make_adapter(tmp_path / "adapter")
    _drop_module(tmp_path / "adapter", pairs, K)                    # K stays 4-bit and untouched
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    deq: dict[str, np.ndarray] = {}
    for key, value in w16.items():
        if key[: -len(".weight")] in NAMES:
            parts, deq[key] = _bnb4(value, quant_type, nested)
            tensors.update({key + suffix: item for suffix, item in parts.items()})
        else:
            tensors[key] = ("BF16", value)
            deq[key] = value
    (tmp_path / "base4").mkdir()
    _write_raw(tmp_path / "base4" / "model.safetensors", tensors)
    (tmp_path / "base4" / "config.json").write_text((tmp_path / "base16" / "config.json").read_text())
    # the correct QLoRA merge: deq(W4) + s·B·A, stored in bf16; the untouched K de-quantised
    vt.make_merged(tmp_path / "good", deq, pairs)
    doc = _run(tmp_path / "base4", tmp_path / "adapter", tmp_path / "good")
    rows = _rows(doc)
    assert doc["ok"] is True, doc["issues"]
    assert all(rows[n]["verdict"] == "exact" for n in NAMES if n != K), rows
    assert doc["unchanged"]["changed"] == [] and doc["unchanged"]["missing_in_merged"] == []
    assert doc["unchanged"]["within_rounding"] == 1                 # K: bf16 in the merge, 4-bit in the base
    assert doc["qlora"]["base_4bit"] == [quant_type.upper()]
    # the known failure: merged into the 16-bit weights, checked against the 4-bit base
    vt.make_merged(tmp_path / "bad", {**deq, f"{Q}.weight": w16[f"{Q}.weight"]}, pairs)
    rows = _rows(_run(tmp_path / "base4", tmp_path / "adapter", tmp_path / "bad"))
    assert rows[Q]["verdict"] == "different_base" and abs(rows[Q]["applied_scale"] - 1) < 0.05
    a, b, s = pairs[Q]
    dense = (np.linalg.norm(w16[f"{Q}.weight"].astype(np.float64) - deq[f"{Q}.weight"])
             / np.linalg.norm(s * (b.astype(np.float64) @ a)))
    assert rows[Q]["residual"] == pytest.approx(dense, rel=0.02)    # the bf16 rounding of the merge aside
    assert rows[UP]["verdict"] == "exact"


def _qlora_triple(tmp_path: Path, into_16bit: tuple[str, ...], base_name: str | None = None
                  ) -> tuple[dict, dict]:
    w16 = vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    if base_name is not None:
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    onto = {f"{n}.weight": _twin(w16[f"{n}.weight"]) for n in NAMES if n not in into_16bit}
    vt.make_merged(tmp_path / "merged", w16, pairs, onto=onto)
    return w16, pairs


def test_16bit_base_with_qlora_names_the_base_each_merge_used(tmp_path: Path) -> None:
    w16, pairs = _qlora_triple(tmp_path, into_16bit=(Q, UP))
    doc = _run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", qlora="nf4")
    rows = _rows(doc)
    for name in (Q, UP):
        row = rows[name]
        assert row["verdict"] == "different_base" and row["reason"] == "merged_into_16bit", row
        assert row["reason"] in REASONS
        assert row["qlora"]["merged_into"] == "16bit" and row["qlora"]["verdict_vs_16bit"] == "exact"
        assert "merged into the 16-bit weights; the adapter was trained against the de-quantized 4-bit" \
               in row["detail"]
        a, b, s = pairs[name]
        w = w16[f"{name}.weight"].astype(np.float64)
        dense = np.linalg.norm(w - _twin(w16[f"{name}.weight"])) / np.linalg.norm(s * (b.astype(np.float64) @ a))
        assert row["qlora"]["quantization_residual"] == pytest.approx(dense, rel=1e-6)
        assert row["residual"] == pytest.approx(dense, rel=0.02) and dense > 1.0
    for name in (K, V, OPROJ, GATE, DOWN):
        assert rows[name]["verdict"] == "exact" and rows[name]["qlora"]["merged_into"] == "dequantized_4bit"
    assert doc["qlora"]["merged_into"] == {"16bit": 2, "dequantized_4bit": 5}
    assert "merged_into_16bit" in [i["code"] for i in doc["issues"]] and doc["ok"] is False
    # without --qlora (a plain adapter config) the same merge is judged against W16 alone: the correct QLoRA
    # merges then look like a different base, and no base is named
    plain = _rows(_run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"))
    assert plain[K]["verdict"] == "different_base" and "reason" not in plain[K] and "qlora" not in plain[K]
    assert plain[Q]["verdict"] == "exact"


def test_adapter_config_naming_a_4bit_base_turns_the_check_on(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _qlora_triple(tmp_path, into_16bit=(), base_name="unsloth/llama-3-8b-bnb-4bit")
    args = ["verify", "--merged", str(tmp_path / "merged"), "--base-model", str(tmp_path / "base"),
            "--peft-dir", str(tmp_path / "adapter"), "--json", "--fail-on", "not_exact"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["qlora"]["why"].startswith("the adapter config")
    assert doc["qlora"]["merged_into"] == {"dequantized_4bit": 7}


def test_cli_qlora_flag_and_fail_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _qlora_triple(tmp_path, into_16bit=(DOWN,))
    base = ["verify", "--merged", str(tmp_path / "merged"), "--base-model", str(tmp_path / "base"),
            "--peft-dir", str(tmp_path / "adapter")]
    assert main([*base, "--qlora", "--fail-on", "different_base"]) == 1
    captured = capsys.readouterr()
    assert "merged into the 16-bit weights" in captured.out and DOWN in captured.err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--qlora", "int8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "int8" in err[-1] and "Traceback" not in "\n".join(err)


def test_untouched_linear_stored_dequantized_is_not_changed(tmp_path: Path) -> None:
    """A merge written from the 4-bit model stores every quantised layer de-quantised, adapted or not."""
    w16 = vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    _drop_module(tmp_path / "adapter", pairs, OPROJ)
    onto = {f"{n}.weight": _twin(w16[f"{n}.weight"]) for n in NAMES}
    vt.make_merged(tmp_path / "merged", {**w16, **onto}, pairs)
    doc = _run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", qlora="nf4")
    assert doc["ok"] is True, doc["issues"]
    assert doc["unchanged"]["dequantized_4bit"] == 1 and doc["unchanged"]["changed"] == []
    # without --qlora the de-quantised copy of o_proj is a changed weight
    plain = _run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert plain["unchanged"]["changed"] == [f"{OPROJ}.weight"]


def test_twin_is_bitsandbytes_round_trip() -> None:
    """verify's candidate base deq(Q(W16)) equals bitsandbytes' own quantise/de-quantise round trip."""
    from gradience.quant.residual import dequantized_twin, quantization_residual

    rng = np.random.default_rng(3)
    w = vt.stored(rng.normal(0, 0.02, (96, 200)).astype(np.float32), "BF16")
    for qt in ("nf4", "fp4"):
        ours = dequantized_twin(w, qt, 64, "bfloat16")
        np.testing.assert_array_equal(ours, _twin(w, qt))
        assert quantization_residual(w, qt, 64) == pytest.approx(
            math.sqrt(float(np.sum((w.astype(np.float64) - ours) ** 2))), rel=1e-12)


def test_merged_checkpoint_stored_in_4bit_is_a_named_problem(tmp_path: Path) -> None:
    w16 = vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    vt.make_merged(tmp_path / "m16", w16, pairs)
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(tmp_path / "m16" / "model.safetensors")
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for key in src.tensors:
        value = np.array(src.read_f32(key))
        if key == f"{Q}.weight":
            parts, _ = _bnb4(value, "nf4", True)
            tensors.update({key + suffix: item for suffix, item in parts.items()})
        else:
            tensors[key] = ("BF16", value)
    (tmp_path / "m4").mkdir()
    _write_raw(tmp_path / "m4" / "model.safetensors", tensors)
    doc = _run(tmp_path / "base", tmp_path / "adapter", tmp_path / "m4")
    rows = _rows(doc)
    assert rows[Q]["verdict"] is None and "re-quantised after the merge" in rows[Q]["problem"]
    assert all(rows[n]["verdict"] == "exact" for n in NAMES if n != Q) and doc["ok"] is False


def test_forged_4bit_base_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 4-bit state whose shape promises more than the packed bytes hold: refused from the headers."""
    w16 = vt.make_base(tmp_path / "base16")
    pairs = vt.make_adapter(tmp_path / "adapter")
    vt.make_merged(tmp_path / "merged", w16, pairs)
    tensors = {k: ("BF16", v) for k, v in w16.items() if k != f"{Q}.weight"}
    parts, _ = _bnb4(w16[f"{Q}.weight"], "nf4", False)
    state_key = ".quant_state.bitsandbytes__nf4"
    doc = json.loads(bytes(parts[state_key][1]).decode())
    doc["shape"] = [1 << 20, 1 << 16]
    parts[state_key] = ("U8", np.frombuffer(json.dumps(doc).encode(), np.uint8))
    tensors.update({f"{Q}.weight" + suffix: item for suffix, item in parts.items()})
    (tmp_path / "base4").mkdir()
    _write_raw(tmp_path / "base4" / "model.safetensors", tensors)
    rc = main(["verify", "--merged", str(tmp_path / "merged"), "--base-model", str(tmp_path / "base4"),
               "--peft-dir", str(tmp_path / "adapter")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gradience verify: error:") and "4-bit" in err[0]


def test_double_quantized_training_base_is_recognised(tmp_path: Path) -> None:
    """The adapter trained on a double-quantised 4-bit base (bitsandbytes' own nested quantisation): the correct
    merge is exact against verify's deq(Q(W16)) with double quantisation; a merge into W16 is still named."""
    w16 = vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    onto = {f"{n}.weight": _twin(w16[f"{n}.weight"], nested=True) for n in NAMES if n != Q}
    vt.make_merged(tmp_path / "merged", w16, pairs, onto=onto)
    rows = _rows(_run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", qlora="nf4"))
    for name in NAMES:
        if name == Q:
            assert rows[name]["reason"] == "merged_into_16bit", rows[name]
        else:   # within bf16's floor already without double quantisation (residual ~0.07 of ΔW, floor ~0.1)
            assert rows[name]["verdict"] == "exact", rows[name]
            assert rows[name]["qlora"]["merged_into"] == "dequantized_4bit"
            assert rows[name]["qlora"]["verdict_vs_16bit"] == "different_base"


def test_double_quantized_twin_is_chosen_when_it_explains_the_merge_better(tmp_path: Path) -> None:
    """An fp32 merge (floor 2^-24: no twin is exact) onto bitsandbytes' double-quantised weights: verify tries the
    nested twin after the plain one and keeps it, being the closer."""
    w16 = vt.make_base(tmp_path / "base", dtype="F32")
    pairs = vt.make_adapter(tmp_path / "adapter")
    onto = {f"{n}.weight": _twin(w16[f"{n}.weight"], nested=True, f32=True) for n in (K, UP)}
    vt.make_merged(tmp_path / "merged", w16, pairs, dtype="F32", onto=onto)
    rows = _rows(_run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", qlora="nf4"))
    for name in (K, UP):
        info = rows[name]["qlora"]
        assert info["double_quant"] is True, info
        assert info["residual_vs_dequantized_4bit"] < 0.3 * info["residual_vs_16bit"]
    assert rows[Q]["qlora"]["merged_into"] == "16bit" and rows[Q]["reason"] == "merged_into_16bit"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantized_twin_is_close_to_bitsandbytes(quant_type: str) -> None:
    """Nested scales as bitsandbytes quantises them: equal on all but a few elements (its CPU kernel's binary
    search now and then keeps the code below the nearest), and ~20x closer than the plain round trip."""
    from gradience.quant.residual import dequantized_twin, dynamic_map

    np.testing.assert_allclose(dynamic_map(), functional.create_dynamic_map().numpy(), rtol=0, atol=1e-7)
    rng = np.random.default_rng(4)
    w = vt.stored(rng.normal(0, 0.02, (512, 1024)).astype(np.float32), "BF16")
    theirs = _twin(w, quant_type, nested=True)
    ours = dequantized_twin(w, quant_type, 64, "bfloat16", double_quant=True)
    plain = dequantized_twin(w, quant_type, 64, "bfloat16")
    rel = np.linalg.norm(ours.astype(np.float64) - theirs) / np.linalg.norm(theirs.astype(np.float64))
    rel_plain = np.linalg.norm(plain.astype(np.float64) - theirs) / np.linalg.norm(theirs.astype(np.float64))
    assert np.mean(ours != theirs) < 0.01 and rel < 1e-3 and rel_plain > 10 * rel


@pytest.mark.slow
def test_real_qlora_dequantize_then_merge_is_exact(tmp_path: Path) -> None:
    """The real flow: transformers loads the bf16 base in 4-bit (NF4, double quant) on CPU and saves it; the model
    is de-quantised (transformers' ``dequantize()``), the PEFT adapter merged with ``merge_and_unload`` and saved.
    That merge is exact against the saved 4-bit checkpoint and against the 16-bit base with --qlora; the same
    adapter merged into the bf16 base is named ``merged_into_16bit``."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "base16")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    load4 = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path / "base16", quantization_config=qcfg, device_map="cpu")
    load4().save_pretrained(tmp_path / "base4")
    torch.manual_seed(1)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base16",
                                                                               dtype=torch.bfloat16), lcfg)
    for name, param in pm.named_parameters():   # an update well above bf16 rounding
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    deq = load4().dequantize()
    merged = peft.PeftModel.from_pretrained(deq, str(tmp_path / "adapter")).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(tmp_path / "merged")
    wrong = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base16", dtype=torch.bfloat16),
        str(tmp_path / "adapter")).merge_and_unload()
    wrong.save_pretrained(tmp_path / "wrong")

    doc = _run(tmp_path / "base4", tmp_path / "adapter", tmp_path / "merged")
    assert doc["ok"] is True, (doc["issues"], [(r["name"], r["verdict"]) for r in doc["modules"]])
    assert doc["unchanged"]["changed"] == []
    doc = _run(tmp_path / "base16", tmp_path / "adapter", tmp_path / "merged", qlora="nf4")
    assert doc["ok"] is True, [(r["name"], r["verdict"], r.get("detail")) for r in doc["modules"]]
    assert doc["unchanged"]["dequantized_4bit"] >= 4          # k/o/gate/up stored de-quantised, not changed
    doc = _run(tmp_path / "base16", tmp_path / "adapter", tmp_path / "wrong", qlora="nf4")
    assert {r["reason"] for r in doc["modules"]} == {"merged_into_16bit"}


def test_only_linear_layers_a_4bit_load_quantises_get_the_twin(tmp_path: Path) -> None:
    """bitsandbytes leaves embeddings and the output head in 16 bits: no deq(Q(W16)) candidate for them."""
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base
    from gradience.verify.qlora import applies

    rng = np.random.default_rng(0)
    vt.make_base(tmp_path / "base", weights={"lm_head.weight": rng.normal(0, 0.02, (vt.VOCAB, vt.HIDDEN))})
    base = BaseWeights(resolve_base(str(tmp_path / "base"), allow_download=False))
    assert applies(base, f"{Q}.weight") and not applies(base, f"{Q}.weight", "embedding")
    assert not applies(base, "lm_head.weight") and not applies(base, "model.embed_tokens.weight")
    assert not applies(base, "model.norm.weight")
