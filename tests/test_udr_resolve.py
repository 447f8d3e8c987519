"""Base resolution, name mapping and bad base checkpoints: issues or one InputError, never a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import InputError
from gradience.udr import UdrInput, measure_udr
from gradience.udr.names import BaseNameIndex
from gradience.udr.resolve import hub_cache_dir, resolve_base

Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"


def q_inputs() -> list[UdrInput]:
    return [UdrInput(Q0, 1.0, 1.0, 32, 32), UdrInput(Q1, 1.0, 1.0, 32, 32)]


# -- name mapping --------------------------------------------------------------------------------------------
def test_name_index_exact_suffix_and_wrapper_prefixes() -> None:
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias", "lm_head.weight",
             "encoder.layer.0.attention.self.query.weight", "decoder.layer.0.attention.self.query.weight"]
    idx = BaseNameIndex(names)
    assert idx.match("model.layers.0.self_attn.q_proj").how == "exact"
    assert idx.match("lm_head").tensor == "lm_head.weight"
    # base has a prefix the adapter lacks / adapter has a prefix the base lacks
    assert idx.match("h.0.attn.c_attn").tensor == "transformer.h.0.attn.c_attn.weight"
    assert idx.match("base.transformer.h.0.attn.c_attn").tensor == "transformer.h.0.attn.c_attn.weight"
    assert idx.match("roberta.model.layers.0.self_attn.q_proj").tensor == "model.layers.0.self_attn.q_proj.weight"
    # two bases hold a matching suffix: ambiguous, never a guess
    amb = idx.match("layer.0.attention.self.query")
    assert amb.tensor is None and amb.how == "ambiguous" and len(amb.candidates) == 2
    # a dotted boundary is required: "xq_proj" is not "q_proj"
    assert idx.match("model.layers.0.self_attn.xq_proj").how == "missing"
    # the layer index is never cut away to force a match
    assert idx.match("model.layers.9.self_attn.q_proj").how == "missing"
    # only .weight tensors are candidates: a bias never stands in for a weight
    assert BaseNameIndex(["model.layers.0.self_attn.q_proj.bias"]).match(
        "model.layers.0.self_attn.q_proj").how == "missing"


# -- resolution ----------------------------------------------------------------------------------------------
def test_hub_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache_dir() == tmp_path / "b" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hub_cache_dir() == tmp_path / "x" / "huggingface" / "hub"


def test_resolve_local_single_and_sharded(tiny_llama_dir: Path, tiny_llama_sharded_dir: Path) -> None:
    single = resolve_base(str(tiny_llama_dir))
    assert single.fmt == "safetensors" and single.files == ["model.safetensors"] and single.weight_map is None
    assert single.identity == f"path:{tiny_llama_dir.resolve()}"
    sharded = resolve_base(str(tiny_llama_sharded_dir))
    assert sharded.index_path is not None and sharded.weight_map is not None
    assert sharded.files == sorted(p.name for p in tiny_llama_sharded_dir.glob("*.safetensors"))


def test_hub_snapshot_without_refs_main(hf_cache_snapshot: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    shutil.copytree(hf_cache_snapshot.parents[2], cache, symlinks=True)
    (cache / "models--org--tiny-llama" / "refs" / "main").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # one snapshot and no refs/main: that snapshot is the only candidate
    assert resolve_base("org/tiny-llama").display == f"org/tiny-llama@{hf_cache_snapshot.name}"
    # refs/main naming a snapshot that is not cached: a clear error
    (cache / "models--org--tiny-llama" / "refs" / "main").write_text("f" * 40)
    with pytest.raises(InputError, match="not cached"):
        resolve_base("org/tiny-llama")


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/base", "no-such-model-anywhere"])
def test_explicit_unresolvable_base_is_input_error(spec: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as err:
        measure_udr(q_inputs(), spec, use_cache=False)
    assert "base model not found" in str(err.value) and spec in str(err.value)


def test_base_dir_without_weights_and_adapter_dir_as_base(tmp_path: Path, llama_adapter_dir: Path) -> None:
    empty = tmp_path / "empty_base"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no base weights found") as err:
        measure_udr(q_inputs(), str(empty), use_cache=False)
    assert str(empty) in str(err.value)
    with pytest.raises(InputError, match="adapter directory"):
        measure_udr(q_inputs(), str(llama_adapter_dir), use_cache=False)
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(b"")
    with pytest.raises(InputError, match="not a file"):
        measure_udr(q_inputs(), str(weights_file), use_cache=False)


def test_missing_shard_is_an_issue_for_its_modules(tiny_llama_sharded_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_sharded_dir, base)
    wmap = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    lost = wmap[Q1 + ".weight"]
    assert wmap[Q0 + ".weight"] != lost, "fixture should put the two q_proj in different shards"
    (base / lost).unlink()
    report = measure_udr(q_inputs(), str(base), use_cache=False)
    unreadable = [i for i in report.issues if i.code == "base_shard_unreadable"]
    assert any(lost in i.message and "missing" in i.message for i in unreadable)
    assert any(i.modules == [Q1] for i in unreadable)
    assert report.per_layer[Q1]["udr"] is None and report.per_layer[Q0]["udr"] is not None
    assert report.summary["n_layers_with_udr"] == 1


def test_corrupt_shard_is_an_issue_not_a_crash(tiny_llama_sharded_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_sharded_dir, base)
    wmap = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    bad = base / wmap[Q1 + ".weight"]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    report = measure_udr(q_inputs(), str(base), use_cache=False)
    issue = next(i for i in report.issues if i.code == "base_shard_unreadable" and i.modules is None)
    assert bad.name in issue.message and "safetensors" in issue.message
    assert report.per_layer[Q1]["udr"] is None and report.summary["n_layers_with_udr"] == 1


def test_index_that_is_not_json_is_input_error(tiny_llama_sharded_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_sharded_dir, base)
    (base / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(InputError, match="index is not valid JSON"):
        measure_udr(q_inputs(), str(base), use_cache=False)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../../etc/x"}}))
    with pytest.raises(InputError, match="outside its directory"):
        measure_udr(q_inputs(), str(base), use_cache=False)


def test_quantized_base_tensor_is_an_issue(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    base = tmp_path / "base"
    base.mkdir()
    save_file({Q0 + ".weight": np.ones((32, 32), np.int8)}, str(base / "model.safetensors"))
    report = measure_udr(q_inputs()[:1], str(base), use_cache=False)
    assert [i.code for i in report.issues][:1] == ["base_dtype_unsupported"]


def test_bin_only_base_uses_weights_only_torch_load(tiny_llama_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    base = tmp_path / "bin_base"
    base.mkdir()
    torch.save(state, base / "pytorch_model.bin")
    report = measure_udr(q_inputs(), str(base), use_cache=False)
    assert report.stats["base_format"] == "bin" and report.summary["n_layers_with_udr"] == 2
    w = state[Q0 + ".weight"].double().numpy()
    assert report.per_layer[Q0]["base_sigma_max"] == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-4)

    # A pickle that is not a plain state dict is refused by weights_only: an issue, never code execution.
    evil = tmp_path / "evil_base"
    evil.mkdir()
    torch.save({Q0 + ".weight": state[Q0 + ".weight"], "obj": _Payload()}, evil / "pytorch_model.bin")
    refused = measure_udr(q_inputs(), str(evil), use_cache=False)
    assert any(i.code == "base_shard_unreadable" and "weights-only" in i.message for i in refused.issues)
    assert refused.summary["n_layers_with_udr"] == 0


class _Payload:
    """An arbitrary Python object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_embedding_and_conv_shapes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    # Embedding: the base stores (num_embeddings, dim); PEFT's ΔW orientation may be either way round.
    from test_udr_measure import _load_all, sigma1

    emb = _load_all(tiny_llama_dir)["model.embed_tokens.weight"]
    for d_out, d_in in (emb.shape, emb.shape[::-1]):
        report = measure_udr([UdrInput("model.embed_tokens", 2.0, 3.0, d_out, d_in, "embedding")],
                             str(tiny_llama_dir), use_cache=False)
        row = report.per_layer["model.embed_tokens"]
        assert row["udr"] == pytest.approx(2.0 / sigma1(emb), rel=1e-4)
        assert row["udr_f"] == pytest.approx(3.0 / np.linalg.norm(emb), rel=1e-6)
    # Conv: base (out, in, kh, kw) against ΔW flattened to (out, in·kh·kw).
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    base = tmp_path / "conv_base"
    base.mkdir()
    save_file({"unet.conv_in.weight": conv, "unet.conv_in.bias": np.zeros(8, np.float32)},
              str(base / "model.safetensors"))
    report = measure_udr([UdrInput("unet.conv_in", 1.0, 1.0, 8, 36, "conv")], str(base), use_cache=False)
    expected = sigma1(conv.reshape(8, 36).astype(np.float64))
    assert report.per_layer["unet.conv_in"]["base_sigma_max"] == pytest.approx(expected, rel=1e-4)
    wrong = measure_udr([UdrInput("unet.conv_in", 1.0, 1.0, 8, 35, "conv")], str(base), use_cache=False)
    assert [i.code for i in wrong.issues][:1] == ["base_shape_mismatch"]
