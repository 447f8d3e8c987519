"""``gradience export --to gguf`` and ``verify --gguf``: round trips read back with the ``gguf`` package's reader.

The expected ΔW comes from PEFT itself (``get_delta_weight`` on the loaded adapter) or from the numpy factors of
a constructed adapter; the GGUF's ΔW is rebuilt here independently of gradience's reader, by llama.cpp's rule
(adapter.lora.alpha / rank, rank = lora_b's ne[0]), undoing the Llama q/k row permutation with its own inverse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gradience.adapter import load_adapter  # noqa: E402
from gradience.cli.main import main  # noqa: E402
from gradience.export.gguf import export_gguf  # noqa: E402
from gradience.verify import verify_gguf  # noqa: E402
from support import tiny_models  # noqa: E402
from support import verify_triples as vt  # noqa: E402
from support.synthetic import write_safetensors  # noqa: E402


def _gguf_deltas(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """{GGUF base tensor name: ΔW as llama.cpp computes it (float64)}, and the metadata."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k in ("general.type", "adapter.type",
                                                                     "adapter.lora.alpha", "general.architecture")}
    alpha = float(meta["adapter.lora.alpha"])
    tensors = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = gguf.quants.dequantize(data, t.tensor_type)
        tensors[t.name] = np.asarray(data, np.float64).reshape([int(d) for d in reversed(list(t.shape))])
    deltas = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a, b = tensors[name], tensors[base + ".lora_b"]
        rank = b.shape[1]                        # ggml ne[0] of lora_b
        if base.endswith("token_embd.weight"):   # A stored (vocab, r): ΔE = scale · A_g B_gᵀ  (vocab, dim)
            deltas[base] = alpha / rank * (a @ b.T)
        else:
            deltas[base] = alpha / rank * (b @ a)
    return deltas, meta


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute (written independently: de-interleave the rope halves)."""
    d = rows.shape[0]
    return rows.reshape(n_head, d // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(module: str) -> str:
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    parts = module.split(".")
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:])]}.weight"


def _peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """PEFT's own ΔW per module (float64), from get_delta_weight on the loaded adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            adapters = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
            if hasattr(module, "get_delta_weight") and "default" in adapters:
                out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double().numpy()
    return out


def _check_against_peft(gguf_path: Path, base_dir: Path, adapter_dir: Path, n_head: int = 4, n_kv: int = 2,
                        rtol: float = 1e-6) -> None:
    deltas, meta = _gguf_deltas(gguf_path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    expected = _peft_deltas(base_dir, adapter_dir)
    assert len(deltas) == len(expected)
    for module, d_peft in expected.items():
        d = deltas[_gguf_name(module)]
        if module.endswith("q_proj"):
            d = _unpermute(d, n_head)
        elif module.endswith("k_proj"):
            d = _unpermute(d, n_kv)
        err = np.linalg.norm(d - d_peft) / np.linalg.norm(d_peft)
        assert err < rtol, (module, err)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "patterns"])
def test_round_trip_matches_peft(tmp_path: Path, tiny_llama_dir: Path, llama_adapter_dir: Path,
                                 llama_adapter_patterns_dir: Path, which: str) -> None:
    """Plain, and rsLoRA + rank_pattern + alpha_pattern: llama.cpp's alpha/rank rule reproduces PEFT's ΔW."""
    adapter = llama_adapter_dir if which == "plain" else llama_adapter_patterns_dir
    out = tmp_path / "a.gguf"
    doc = export_gguf(load_adapter(str(adapter)), str(tiny_llama_dir), out)
    assert doc["schema"] == "gradience.export/v1" and doc["tensors"] == 28
    _check_against_peft(out, tiny_llama_dir, adapter)
    if which == "plain":  # nothing to rescale: the factors are written as they are, like the converter does
        assert doc["rescaled_modules"] == 0
    else:
        assert doc["rescaled_modules"] == 14
    check = verify_gguf(load_adapter(str(adapter)), str(out), str(tiny_llama_dir))
    assert check["ok"] is True and check["summary"]["exact"] == 14


@pytest.mark.slow
def test_embedding_lora_round_trip(tmp_path: Path, tiny_llama_dir: Path) -> None:
    adapter = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "emb", arch="llama",
                                            targets=["embed_tokens", "q_proj"], use_rslora=True)
    out = tmp_path / "e.gguf"
    export_gguf(load_adapter(str(adapter)), str(tiny_llama_dir), out)
    _check_against_peft(out, tiny_llama_dir, adapter)
    assert verify_gguf(load_adapter(str(adapter)), str(out))["ok"] is True


@pytest.mark.parametrize("outtype,rtol", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 1.6e-2)])
def test_synthetic_round_trip_outtypes(tmp_path: Path, outtype: str, rtol: float) -> None:
    vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter", r=16, alpha=8, use_rslora=True,
                            rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 32})
    out = tmp_path / "x.gguf"
    export_gguf(load_adapter(str(tmp_path / "adapter")), str(tmp_path / "base"), out, outtype=outtype)
    deltas, meta = _gguf_deltas(out)
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    for module, (a, b, s) in pairs.items():
        d = deltas[_gguf_name(module)]
        if module.endswith(("q_proj", "k_proj")):
            d = _unpermute(d, 8)                   # the config says 8 heads, 8 KV heads
        expected = s * (b.astype(np.float64) @ a.astype(np.float64))
        assert np.linalg.norm(d - expected) / np.linalg.norm(expected) < rtol, module
    check = verify_gguf(load_adapter(str(tmp_path / "adapter")), str(out), str(tmp_path / "base"))
    assert check["ok"] is True, [(r["name"], r["verdict"], r.get("rel_error")) for r in check["modules"]]


def _write_like_the_converter(path: Path, pairs: dict, alpha: float, n_head: int = 8) -> None:
    """What convert_lora_to_gguf.py writes for this adapter: the config's lora_alpha and the factors as they are
    (B rows permuted for Llama q/k); no per-module scale."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, (a, b, _s) in pairs.items():
        if module.endswith(("q_proj", "k_proj")):
            d = b.shape[0]
            b = b.reshape(n_head, 2, d // n_head // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
        name = _gguf_name(module)
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a, np.float32))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_converter_style_file_of_an_rslora_adapter_is_wrong_scale(tmp_path: Path) -> None:
    vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter", r=16, alpha=16, use_rslora=True)
    path = tmp_path / "converted.gguf"
    _write_like_the_converter(path, pairs, alpha=16)
    doc = verify_gguf(load_adapter(str(tmp_path / "adapter")), str(path))
    assert doc["ok"] is False
    for row in doc["modules"]:
        assert row["verdict"] == "wrong_scale", row
        assert row["applied_scale"] == pytest.approx(0.25, rel=1e-6)
        assert "1/sqrt(r)" in row["detail"]
    # the same adapter exported by gradience is exact
    ours = tmp_path / "ours.gguf"
    export_gguf(load_adapter(str(tmp_path / "adapter")), str(tmp_path / "base"), ours)
    assert verify_gguf(load_adapter(str(tmp_path / "adapter")), str(ours))["ok"] is True


def test_converter_style_file_of_a_plain_adapter_is_exact_and_missing_pairs_are_named(tmp_path: Path) -> None:
    vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    path = tmp_path / "converted.gguf"
    dropped = vt.module_names()[0]
    _write_like_the_converter(path, {k: v for k, v in pairs.items() if k != dropped}, alpha=16)
    doc = verify_gguf(load_adapter(str(tmp_path / "adapter")), str(path), str(tmp_path / "base"))
    rows = {r["name"]: r for r in doc["modules"]}
    assert rows[dropped]["verdict"] == "missing"
    assert all(r["verdict"] == "exact" for n, r in rows.items() if n != dropped)


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    # modules_to_save: a full lm_head copy next to the factors
    mts = tmp_path / "mts"
    mts.mkdir()
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors = {k: src.read_f32(k) for k in src.tensors}
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = np.zeros((vt.VOCAB, vt.HIDDEN), np.float32)
    write_safetensors(mts / "adapter_model.safetensors", tensors)
    (mts / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg = json.loads((mts / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    dora = tmp_path / "dora"
    dora.mkdir()
    write_safetensors(dora / "adapter_model.safetensors", {k: v for k, v in tensors.items() if "lm_head" not in k})
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    for adapter, needle in ((mts, "non-LoRA tensors"), (dora, "DoRA")):
        rc = main(["export", "--peft-dir", str(adapter), "--to", "gguf", "--base-model", str(tmp_path / "base"),
                   "--out", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("gradience export: error: ") and err.count("\n") == 1, err
        assert needle in err and "merge" in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter", use_rslora=True)
    out = tmp_path / "sub" / "a.gguf"
    argv = ["export", "--peft-dir", str(tmp_path / "adapter"), "--to", "gguf", "--base-model",
            str(tmp_path / "base"), "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    assert "7 of 7 module(s)" in capsys.readouterr().out
    assert main(argv) == 2                                  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_alpha"] == 16.0
    assert [p.name for p in out.parent.iterdir()] == ["a.gguf"]   # no staging leftovers
    assert main(["verify", "--gguf", str(out), "--peft-dir", str(tmp_path / "adapter"), "--fail-on",
                 "not_exact"]) == 0
    capsys.readouterr()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 7)
    assert main(["verify", "--gguf", str(tmp_path / "junk.gguf"), "--peft-dir", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradience verify: error: ") and "not a valid GGUF" in err and err.count("\n") == 1


def test_missing_gguf_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "gguf", None)
    rc = main(["export", "--peft-dir", str(tmp_path / "adapter"), "--to", "gguf", "--base-model",
               str(tmp_path / "base"), "--out", str(tmp_path / "a.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "gradience[gguf]" in err and err.count("\n") == 1


def test_unsupported_architecture_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vt.make_base(tmp_path / "base")
    vt.make_adapter(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    rc = main(["export", "--peft-dir", str(tmp_path / "adapter"), "--to", "gguf", "--base-model",
               str(tmp_path / "base"), "--out", str(tmp_path / "a.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "FancyNewForCausalLM" in err and "LlamaForCausalLM" in err


def test_qwen2_names_and_no_row_permutation(tmp_path: Path) -> None:
    vt.make_base(tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    pairs = vt.make_adapter(tmp_path / "adapter", use_rslora=True)
    out = tmp_path / "q.gguf"
    doc = export_gguf(load_adapter(str(tmp_path / "adapter")), str(tmp_path / "base"), out)
    assert doc["architecture"] == "qwen2" and not any(m["rows_permuted"] for m in doc["modules"])
    deltas, meta = _gguf_deltas(out)
    assert meta["general.architecture"] == "qwen2"
    for module, (a, b, s) in pairs.items():       # Qwen2 keeps the HF row order: no un-permutation here
        expected = s * (b.astype(np.float64) @ a.astype(np.float64))
        assert np.linalg.norm(deltas[_gguf_name(module)] - expected) / np.linalg.norm(expected) < 1e-6
    assert verify_gguf(load_adapter(str(tmp_path / "adapter")), str(out))["ok"] is True


def test_gguf_pair_with_an_implausible_rank_is_refused_per_module(tmp_path: Path) -> None:
    """A forged pair whose shared dimension exceeds the layer's: named, before any r×r work."""
    vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    module = vt.module_names()[list(vt.TARGETS).index("o_proj")]
    rng = np.random.default_rng(0)
    forged = dict(pairs)
    forged[module] = (rng.normal(size=(300, vt.HIDDEN)).astype(np.float32),
                      rng.normal(size=(vt.HIDDEN, 300)).astype(np.float32), 1.0)
    _write_like_the_converter(tmp_path / "f.gguf", forged, alpha=16)
    rows = {r["name"]: r for r in verify_gguf(load_adapter(str(tmp_path / "adapter")), str(tmp_path / "f.gguf"))
            ["modules"]}
    assert rows[module]["verdict"] == "mismatch" and "rank 300" in rows[module]["detail"]


_LLAMA_CPP = os.environ.get("GRADIENCE_LLAMA_CPP_DIR", "")


@pytest.mark.slow
@pytest.mark.skipif(not (Path(_LLAMA_CPP) / "convert_lora_to_gguf.py").is_file(),
                    reason="set GRADIENCE_LLAMA_CPP_DIR to a llama.cpp checkout to run its own converter")
def test_llama_cpp_converter_output(tmp_path: Path, tiny_llama_dir: Path, llama_adapter_dir: Path,
                                    llama_adapter_patterns_dir: Path) -> None:
    """llama.cpp's convert_lora_to_gguf.py: a plain adapter converts exactly (the names, layout and q/k permutation
    verify reproduces are the converter's); an rsLoRA + alpha_pattern adapter converts without error and computes
    another ΔW, which verify names; the same adapter exported by gradience is exact."""
    import subprocess
    import sys

    def convert(adapter: Path, out: Path) -> None:
        proc = subprocess.run([sys.executable, "convert_lora_to_gguf.py", "--base", str(tiny_llama_dir),
                               "--outfile", str(out), str(adapter)], cwd=_LLAMA_CPP, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    convert(llama_adapter_dir, tmp_path / "plain.gguf")
    plain = verify_gguf(load_adapter(str(llama_adapter_dir)), str(tmp_path / "plain.gguf"), str(tiny_llama_dir))
    assert plain["ok"] is True and plain["summary"]["exact"] == 14
    convert(llama_adapter_patterns_dir, tmp_path / "patterns.gguf")
    converted = verify_gguf(load_adapter(str(llama_adapter_patterns_dir)), str(tmp_path / "patterns.gguf"),
                            str(tiny_llama_dir))
    assert converted["ok"] is False
    assert {r["verdict"] for r in converted["modules"]} == {"wrong_scale"}
    assert all("copied without PEFT's own scale" in r["detail"] for r in converted["modules"])
    ours = tmp_path / "ours.gguf"
    export_gguf(load_adapter(str(llama_adapter_patterns_dir)), str(tiny_llama_dir), ours)
    assert verify_gguf(load_adapter(str(llama_adapter_patterns_dir)), str(ours), str(tiny_llama_dir))["ok"] is True
