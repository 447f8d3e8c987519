"""Adapter reading without torch: pairing, orientation, names, scale, dtypes, sharding, discovery, bad inputs.

Files are written with the reference ``safetensors`` package (or the independent writer in ``support.synthetic``
for BF16 and crafted files); expected values are computed here by hand or with plain numpy.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradience.adapter import (
    adapter_from_state_dict,
    list_adapters,
    load_adapter,
    module_rank,
    module_scale,
    pattern_key,
)
from gradience.errors import InputError
from support.synthetic import bf16_bits_to_f32, f32_to_bf16_bits, write_safetensors

P = "base_model.model.model.layers.{i}.self_attn.{m}"
RNG = np.random.default_rng(1234)


def _factors(r: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    return (RNG.standard_normal((r, d_in)).astype(np.float32), RNG.standard_normal((d_out, r)).astype(np.float32))


def _write_adapter(directory: Path, tensors: dict[str, np.ndarray], config: dict | None = None,
                   filename: str = "adapter_model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / filename), metadata={"format": "pt"})
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _lora(prefix: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


def _issue(adapter, code):
    found = [i for i in adapter.issues if i.code == code]
    assert len(found) == 1, [i.to_dict() for i in adapter.issues]
    return found[0]


def _codes(adapter) -> set[str]:
    return {i.code for i in adapter.issues}


# -- pairs, names, orientation, scale --------------------------------------------------------------------------
def test_linear_pairs_names_shapes_scale_and_zero_copy_factors(tmp_path: Path) -> None:
    q = _factors(4, 32, 32)
    v = _factors(4, 32, 16)
    tensors = {**_lora(P.format(i=5, m="q_proj"), *q), **_lora(P.format(i=5, m="v_proj"), *v)}
    _write_adapter(tmp_path, tensors, {"r": 4, "lora_alpha": 8, "peft_type": "LORA"})
    ad = load_adapter(str(tmp_path))
    assert ad.peft_dir == str(tmp_path)
    assert ad.adapter_config_path == str(tmp_path / "adapter_config.json")
    assert ad.adapter_weights_path == str(tmp_path / "adapter_model.safetensors")
    assert ad.issues == [] and ad.non_lora.count == 0
    by_name = {p.name: p for p in ad.pairs}
    assert sorted(by_name) == ["model.layers.5.self_attn.q_proj", "model.layers.5.self_attn.v_proj"]
    vp = by_name["model.layers.5.self_attn.v_proj"]
    assert vp.peft_prefix == "base_model.model.model.layers.5.self_attn.v_proj"
    assert (vp.kind, vp.dora, vp.r, vp.d_in, vp.d_out) == ("linear", False, 4, 32, 16)
    assert (vp.alpha, vp.scale) == (8.0, 2.0)
    assert vp.a_shape == (4, 32) and vp.b_shape == (16, 4)
    assert vp.a_key.endswith("v_proj.lora_A.weight") and vp.b_key.endswith("v_proj.lora_B.weight")
    assert vp.params == 4 * (32 + 16)
    a, b = vp.load_factors()
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_array_equal(a, v[0])
    np.testing.assert_array_equal(b, v[1])
    # A zero-copy view on the read-only memory map, not a copy.
    assert not a.flags.owndata and not a.flags.writeable


def test_fp16_and_bf16_factors_are_read_as_float32(tmp_path: Path) -> None:
    a, b = _factors(3, 8, 6)
    prefix = P.format(i=0, m="q_proj")
    save_file(_lora(prefix, a.astype(np.float16), b.astype(np.float16)), str(tmp_path / "f16.safetensors"))
    ad = load_adapter(weights=str(tmp_path / "f16.safetensors"))
    got_a, got_b = ad.pairs[0].load_factors()
    assert got_a.dtype == np.float32
    np.testing.assert_array_equal(got_a, a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got_b, b.astype(np.float16).astype(np.float32))

    write_safetensors(tmp_path / "bf16.safetensors", _lora(prefix, a, b), dtype="BF16")
    ad = load_adapter(weights=str(tmp_path / "bf16.safetensors"))
    got_a, got_b = ad.pairs[0].load_factors()
    np.testing.assert_array_equal(got_a, bf16_bits_to_f32(f32_to_bf16_bits(a)))
    np.testing.assert_array_equal(got_b, bf16_bits_to_f32(f32_to_bf16_bits(b)))
    assert np.abs(got_a - a).max() <= np.abs(a).max() * 2**-8  # bf16 keeps 8 significant bits


def test_factors_stored_transposed_are_transposed_back(tmp_path: Path) -> None:
    a, b = _factors(4, 24, 40)
    name = "model.layers.0.self_attn.o_proj"
    _write_adapter(tmp_path, _lora("base_model.model." + name, a.T.copy(), b.T.copy()), {"r": 4, "lora_alpha": 4})
    ad = load_adapter(str(tmp_path))
    pair = ad.pairs[0]
    assert (pair.r, pair.d_in, pair.d_out) == (4, 24, 40)
    assert pair.a_shape == (24, 4) and pair.b_shape == (4, 40)  # as stored
    got_a, got_b = pair.load_factors()
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    issue = _issue(ad, "transposed_factors")
    assert issue.severity == "info" and issue.modules == [name]
    assert "rank_mismatch" not in _codes(ad)


def test_square_shapes_that_fit_both_ways_prefer_the_config_rank(tmp_path: Path) -> None:
    # A (d_in=8, r=2) and B (r=2, d_out=8) stored transposed: "A (8, 2), B (2, 8)" also fits as r=8 on 2x2.
    a, b = _factors(2, 8, 8)
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), a.T.copy(), b.T.copy()), {"r": 2, "lora_alpha": 2})
    pair = load_adapter(str(tmp_path)).pairs[0]
    assert (pair.r, pair.d_in, pair.d_out) == (2, 8, 8)
    np.testing.assert_array_equal(pair.load_factors()[0], a)


def test_shapes_that_fit_no_orientation_are_an_issue_and_other_pairs_survive(tmp_path: Path) -> None:
    good = _factors(4, 16, 16)
    tensors = {**_lora(P.format(i=0, m="q_proj"), *good),
               **_lora(P.format(i=0, m="k_proj"), np.zeros((4, 16), np.float32), np.zeros((12, 3), np.float32))}
    _write_adapter(tmp_path, tensors, {"r": 4, "lora_alpha": 8})
    ad = load_adapter(str(tmp_path))
    assert [p.name for p in ad.pairs] == ["model.layers.0.self_attn.q_proj"]
    issue = _issue(ad, "shape_mismatch")
    assert issue.modules == ["model.layers.0.self_attn.k_proj"]
    assert "k_proj" in issue.message and "(4, 16)" in issue.message and "(12, 3)" in issue.message


def test_unpaired_factor_is_an_issue_naming_the_key(tmp_path: Path) -> None:
    a, b = _factors(4, 16, 16)
    lone = P.format(i=1, m="v_proj") + ".lora_B.weight"
    _write_adapter(tmp_path, {**_lora(P.format(i=0, m="q_proj"), a, b), lone: b}, {"r": 4, "lora_alpha": 8})
    ad = load_adapter(str(tmp_path))
    assert len(ad.pairs) == 1
    issue = _issue(ad, "unpaired_factor")
    assert lone in issue.message and issue.extra["keys"] == [lone]
    assert issue.modules == ["model.layers.1.self_attn.v_proj"]


def test_rank_mismatch_with_config_and_rank_pattern_shapes_win(tmp_path: Path) -> None:
    tensors = {**_lora(P.format(i=0, m="q_proj"), *_factors(4, 16, 16)),   # config r=8: mismatch
               **_lora(P.format(i=0, m="k_proj"), *_factors(2, 16, 16)),   # rank_pattern k_proj=2: consistent
               **_lora(P.format(i=0, m="v_proj"), *_factors(8, 16, 16))}   # config r=8: consistent
    _write_adapter(tmp_path, tensors, {"r": 8, "lora_alpha": 16, "rank_pattern": {"k_proj": 2}})
    ad = load_adapter(str(tmp_path))
    by_name = {p.name.rsplit(".", 1)[1]: p for p in ad.pairs}
    assert {k: p.r for k, p in by_name.items()} == {"q_proj": 4, "k_proj": 2, "v_proj": 8}
    assert by_name["q_proj"].scale == 16 / 4  # the scale follows the factors' rank
    issue = _issue(ad, "rank_mismatch")
    assert issue.modules == ["model.layers.0.self_attn.q_proj"]
    assert issue.extra["ranks"] == {"model.layers.0.self_attn.q_proj": {"shape_r": 4, "config_r": 8}}


def test_without_config_magnitudes_are_unscaled(tmp_path: Path) -> None:
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), *_factors(4, 16, 16)))
    ad = load_adapter(str(tmp_path))
    assert ad.config == {} and ad.adapter_config_path is None
    pair = ad.pairs[0]
    assert pair.alpha is None and pair.scale == 1.0
    issue = _issue(ad, "unscaled")
    assert "unscaled" in issue.message and issue.modules == [pair.name]


def test_config_without_lora_alpha_is_unscaled_too(tmp_path: Path) -> None:
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), *_factors(4, 16, 16)), {"r": 4})
    ad = load_adapter(str(tmp_path))
    assert ad.pairs[0].scale == 1.0 and "lora_alpha" in _issue(ad, "unscaled").message


def test_rslora_scale(tmp_path: Path) -> None:
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), *_factors(16, 32, 32)),
                   {"r": 16, "lora_alpha": 8, "use_rslora": True})
    assert load_adapter(str(tmp_path)).pairs[0].scale == pytest.approx(8 / math.sqrt(16), rel=1e-15)


# -- PEFT pattern semantics (hand-worked cases; tests/test_adapter_peft.py compares against PEFT itself) -----
@pytest.mark.parametrize(("keys", "name", "expected"), [
    (["q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
    (["q_proj"], "model.layers.0.self_attn.q_proj2", None),            # whole leaf, not a prefix
    (["proj"], "model.layers.0.self_attn.q_proj", None),               # suffix must start at a dot
    (["layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj", "layers.1.self_attn.q_proj"),
    (["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj", None),
    (["model.layers.1.mlp.down_proj"], "model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"),
    ([r"layers\.[01]\.mlp\..*"], "model.layers.0.mlp.up_proj", r"layers\.[01]\.mlp\..*"),
    ([r"layers\.[01]\.mlp\..*"], "model.layers.2.mlp.up_proj", None),
    (["v_proj", "layers.0.self_attn.v_proj"], "model.layers.0.self_attn.v_proj", "v_proj"),  # first key wins
    (["q_proj("], "model.layers.0.self_attn.q_proj(", "q_proj("),    # invalid regex: compared literally
])
def test_pattern_key_follows_peft_matching(keys: list[str], name: str, expected: str | None) -> None:
    assert pattern_key(keys, name) == expected


def test_module_scale_and_rank_with_patterns() -> None:
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 2}}
    assert module_rank(config, "model.layers.0.self_attn.q_proj") == 4
    assert module_rank(config, "model.layers.0.self_attn.k_proj") == 8
    assert module_scale(config, "model.layers.0.self_attn.q_proj", 4) == (16.0, 4.0, [])
    assert module_scale(config, "model.layers.1.self_attn.q_proj", 4) == (2.0, 0.5, [])
    rs = {**config, "use_rslora": True}
    alpha, scale, issues = module_scale(rs, "model.layers.1.self_attn.q_proj", 4)
    assert (alpha, scale, issues) == (2.0, 1.0, [])
    alpha, scale, issues = module_scale({}, "x", 4)
    assert (alpha, scale) == (None, 1.0) and [i.code for i in issues] == ["unscaled"]
    _, _, issues = module_scale({"lora_alpha": 8, "alpha_pattern": {"q_proj(": 1}}, "a.q_proj", 4)
    assert [i.code for i in issues] == ["invalid_pattern"]
    with pytest.raises(ValueError):
        module_scale(config, "x", 0)


def test_invalid_regex_in_config_is_an_issue_not_a_crash(tmp_path: Path) -> None:
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), *_factors(4, 8, 8)),
                   {"r": 4, "lora_alpha": 8, "alpha_pattern": {"[q_proj": 1}})
    ad = load_adapter(str(tmp_path))
    assert ad.pairs[0].scale == 2.0 and "invalid_pattern" in _codes(ad)


# -- other kinds: embedding, conv, DoRA, non-LoRA tensors ------------------------------------------------------
def test_embedding_lora_is_oriented_a_r_by_vocab(tmp_path: Path) -> None:
    emb_a = RNG.standard_normal((4, 100)).astype(np.float32)   # PEFT: lora_embedding_A (r, num_embeddings)
    emb_b = RNG.standard_normal((32, 4)).astype(np.float32)    # PEFT: lora_embedding_B (embedding_dim, r)
    prefix = "base_model.model.model.embed_tokens"
    _write_adapter(tmp_path, {f"{prefix}.lora_embedding_A": emb_a, f"{prefix}.lora_embedding_B": emb_b},
                   {"r": 4, "lora_alpha": 8})
    pair = load_adapter(str(tmp_path)).pairs[0]
    assert (pair.name, pair.kind, pair.r, pair.d_in, pair.d_out) == ("model.embed_tokens", "embedding", 4, 100, 32)
    a, b = pair.load_factors()
    np.testing.assert_array_equal(a, emb_a)
    np.testing.assert_array_equal(b, emb_b)


def test_conv_lora_is_flattened(tmp_path: Path) -> None:
    conv_a = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)   # (r, in, kh, kw)
    conv_b = RNG.standard_normal((8, 2, 1, 1)).astype(np.float32)   # (out, r, 1, 1)
    bad_b = RNG.standard_normal((8, 2, 3, 3)).astype(np.float32)    # not a 1x1 up-projection
    tensors = {**_lora("base_model.model.conv", conv_a, conv_b), **_lora("base_model.model.conv2", conv_a, bad_b)}
    _write_adapter(tmp_path, tensors, {"r": 2, "lora_alpha": 4})
    ad = load_adapter(str(tmp_path))
    assert [p.name for p in ad.pairs] == ["conv"]
    pair = ad.pairs[0]
    assert (pair.kind, pair.r, pair.d_in, pair.d_out, pair.params) == ("conv", 2, 27, 8, 2 * 27 + 8 * 2)
    a, b = pair.load_factors()
    np.testing.assert_array_equal(a, conv_a.reshape(2, 27))
    np.testing.assert_array_equal(b, conv_b[:, :, 0, 0])
    assert _issue(ad, "shape_mismatch").modules == ["conv2"]


def test_heads_and_lora_bias_are_non_lora_but_dora_magnitudes_belong_to_their_pair(tmp_path: Path) -> None:
    q = P.format(i=0, m="q_proj")
    k = P.format(i=0, m="k_proj")
    mag = np.linspace(0.5, 2.0, 16, dtype=np.float32)
    tensors = {**_lora(q, *_factors(4, 16, 16)), **_lora(k, *_factors(4, 16, 16)),
               f"{q}.lora_magnitude_vector": mag,
               f"{k}.lora_B.bias": np.ones(16, np.float32),
               "base_model.model.score.weight": np.ones((2, 16), np.float32)}
    _write_adapter(tmp_path, tensors, {"r": 4, "lora_alpha": 8, "use_dora": True})
    ad = load_adapter(str(tmp_path))
    assert {p.name.rsplit(".", 1)[1]: p.dora for p in ad.pairs} == {"q_proj": True, "k_proj": False}
    assert ad.non_lora.count == 2 and ad.non_lora.params == 16 + 32
    assert sorted(ad.non_lora.names) == sorted([f"{k}.lora_B.bias", "base_model.model.score.weight"])
    qp = next(p for p in ad.pairs if p.dora)
    assert qp.magnitude_key == f"{q}.lora_magnitude_vector"
    np.testing.assert_array_equal(qp.load_magnitude(), mag)


def test_state_dict_keys_with_adapter_name_segments() -> None:
    q = _factors(4, 16, 16)
    k = _factors(2, 16, 8)
    sd = {f"{P.format(i=0, m='q_proj')}.lora_A.default.weight": q[0],
          f"{P.format(i=0, m='q_proj')}.lora_B.default.weight": q[1],
          f"{P.format(i=0, m='q_proj')}.lora_magnitude_vector.default.weight": np.ones(16, np.float32),
          f"{P.format(i=0, m='k_proj')}.lora_A.other.weight": k[0],
          f"{P.format(i=0, m='k_proj')}.lora_B.other.weight": k[1],
          "base_model.model.model.embed_tokens.lora_embedding_A.default": np.ones((4, 10), np.float32),
          "base_model.model.model.embed_tokens.lora_embedding_B.default": np.ones((6, 4), np.float32)}
    ad = adapter_from_state_dict(sd, {"r": 4, "lora_alpha": 8}, adapter_name="default")
    assert sorted(p.name for p in ad.pairs) == ["model.embed_tokens", "model.layers.0.self_attn.q_proj"]
    qp = next(p for p in ad.pairs if p.kind == "linear")
    assert qp.dora and qp.scale == 2.0
    np.testing.assert_array_equal(qp.load_factors()[1], q[1])
    assert ad.peft_dir is None and ad.adapter_weights_path is None and ad.adapter_name == "default"

    both = adapter_from_state_dict(sd, {"r": 4, "lora_alpha": 8})
    assert len(both.pairs) == 3 and "multiple_adapters" in _codes(both)
    assert next(p for p in both.pairs if p.name.endswith("k_proj")).scale == 4.0  # r=2 from shapes


def test_state_dict_values_must_be_tensors() -> None:
    with pytest.raises(InputError, match="not a tensor"):
        adapter_from_state_dict({"x.lora_A.weight": [1, 2]}, None)


def test_no_lora_pairs_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    _write_adapter(tmp_path, {"base_model.model.hada_w1_a": np.ones((4, 4), np.float32)},
                   {"peft_type": "LOHA", "r": 4})
    with pytest.raises(InputError) as err:
        load_adapter(str(tmp_path))
    assert err.value.path == str(tmp_path / "adapter_model.safetensors")
    assert "no LoRA pairs found" in err.value.problem and "LOHA" in err.value.problem
    # Only unpaired factors: still nothing to audit, and the message says why.
    lone = tmp_path / "lone"
    _write_adapter(lone, {P.format(i=0, m="q_proj") + ".lora_A.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(InputError, match=r"no LoRA pairs found.*without their twin"):
        load_adapter(str(lone))


# -- sharded weights ---------------------------------------------------------------------------------------
def _sharded(directory: Path) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**_lora(P.format(i=0, m="q_proj"), *_factors(4, 16, 16)),
               **_lora(P.format(i=1, m="q_proj"), *_factors(4, 16, 16))}
    keys = list(tensors)
    # Split A and B of layer 0 across the two shards on purpose.
    shard_of = {keys[0]: "adapter_model-00001-of-00002.safetensors",
                keys[1]: "adapter_model-00002-of-00002.safetensors",
                keys[2]: "adapter_model-00001-of-00002.safetensors",
                keys[3]: "adapter_model-00002-of-00002.safetensors"}
    for shard in set(shard_of.values()):
        save_file({k: v for k, v in tensors.items() if shard_of[k] == shard}, str(directory / shard))
    (directory / "adapter_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": shard_of}))
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    return tensors


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    ad = load_adapter(str(tmp_path))
    assert ad.adapter_weights_path == str(tmp_path / "adapter_model.safetensors.index.json")
    assert len(ad.pairs) == 2
    for pair in ad.pairs:
        a, b = pair.load_factors()
        np.testing.assert_array_equal(a, tensors[pair.a_key])
        np.testing.assert_array_equal(b, tensors[pair.b_key])


def test_sharded_index_problems(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = tmp_path / "adapter_model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))

    doc["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="outside the index's directory"):
        load_adapter(str(tmp_path))

    doc["weight_map"][first] = "adapter_model-00002-of-00002.safetensors"  # key is in shard 1
    index.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="does not contain it") as err:
        load_adapter(str(tmp_path))
    assert err.value.path == str(index)

    doc["weight_map"][first] = "adapter_model-00003-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="missing"):
        load_adapter(str(tmp_path))

    index.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_adapter(str(tmp_path))

    index.unlink()
    with pytest.raises(InputError, match=r"no adapter_model.safetensors.index.json"):
        load_adapter(str(tmp_path))


# -- malformed files ---------------------------------------------------------------------------------------
def _raw(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


@pytest.mark.parametrize(("make", "needle"), [
    ("truncated", "truncated"),
    ("header_past_end", "runs past the end"),
    ("not_json", "not valid JSON"),
    ("huge_shape", "bytes of data"),
    ("offset_out_of_range", "truncated"),
    ("empty", "too short"),
])
def test_corrupt_safetensors_is_an_input_error_naming_the_file(tmp_path: Path, make: str, needle: str) -> None:
    path = tmp_path / "adapter_model.safetensors"
    key = P.format(i=0, m="q_proj") + ".lora_A.weight"
    if make == "truncated":
        save_file(_lora(P.format(i=0, m="q_proj"), *_factors(4, 64, 64)), str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif make == "header_past_end":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif make == "not_json":
        path.write_bytes(struct.pack("<Q", 6) + b"\xff\xfenot{")
    elif make == "huge_shape":
        _raw(path, {key: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif make == "offset_out_of_range":
        _raw(path, {key: {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}, b"\0" * 16)
    else:
        path.write_bytes(b"")
    tracemalloc.start()
    with pytest.raises(InputError) as err:
        load_adapter(str(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert err.value.path == str(path) and needle in err.value.problem
    assert peak < 8 << 20  # no allocation driven by a header value


def test_adapter_config_that_is_not_json_names_the_config(tmp_path: Path) -> None:
    _write_adapter(tmp_path, _lora(P.format(i=0, m="q_proj"), *_factors(4, 8, 8)))
    (tmp_path / "adapter_config.json").write_text("{'r': 4,")
    with pytest.raises(InputError, match="not valid JSON") as err:
        load_adapter(str(tmp_path))
    assert err.value.path == str(tmp_path / "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        load_adapter(str(tmp_path))


def test_weights_with_unknown_extension_are_sniffed_as_safetensors(tmp_path: Path) -> None:
    save_file(_lora(P.format(i=0, m="q_proj"), *_factors(4, 8, 8)), str(tmp_path / "weights.data"))
    assert len(load_adapter(weights=str(tmp_path / "weights.data")).pairs) == 1


# -- discovery -------------------------------------------------------------------------------------------------
def _small_adapter(directory: Path, r: int = 4) -> Path:
    return _write_adapter(directory, _lora(P.format(i=0, m="q_proj"), *_factors(r, 8, 8)),
                          {"r": r, "lora_alpha": 2 * r})


def test_discovery_searches_below_and_reports_the_relative_name(tmp_path: Path) -> None:
    _small_adapter(tmp_path / "run" / "final" / "adapter")
    (tmp_path / "run" / "logs").mkdir()
    ad = load_adapter(str(tmp_path))
    assert ad.peft_dir == str(tmp_path / "run" / "final" / "adapter")
    assert ad.adapter_name == "run/final/adapter"
    assert list_adapters(str(tmp_path)) == ["run/final/adapter"]


def test_several_adapters_at_the_same_depth_is_an_error_listing_them(tmp_path: Path) -> None:
    _small_adapter(tmp_path / "checkpoint-500")
    _small_adapter(tmp_path / "checkpoint-1000")
    _small_adapter(tmp_path / "checkpoint-1000" / "nested")  # deeper: not a candidate
    with pytest.raises(InputError) as err:
        load_adapter(str(tmp_path))
    assert "checkpoint-1000, checkpoint-500" in err.value.problem
    assert "--adapter-name" in err.value.problem and "--all" in err.value.problem
    assert err.value.path == str(tmp_path)
    assert list_adapters(str(tmp_path)) == ["checkpoint-1000", "checkpoint-500"]
    ad = load_adapter(str(tmp_path), adapter_name="checkpoint-500")
    assert ad.peft_dir == str(tmp_path / "checkpoint-500") and ad.adapter_name == "checkpoint-500"


def test_shallowest_match_wins(tmp_path: Path) -> None:
    _small_adapter(tmp_path / "a", r=2)
    _small_adapter(tmp_path / "b" / "x", r=4)
    _small_adapter(tmp_path / "b" / "y", r=4)
    assert load_adapter(str(tmp_path)).pairs[0].r == 2


def test_multi_adapter_layout_default_at_top(tmp_path: Path) -> None:
    _small_adapter(tmp_path, r=8)
    _small_adapter(tmp_path / "second", r=4)
    (tmp_path / "not_an_adapter").mkdir()
    assert list_adapters(str(tmp_path)) == ["default", "second"]
    top = load_adapter(str(tmp_path))
    assert top.pairs[0].r == 8 and top.adapter_name is None
    other = _issue(top, "other_adapters")
    assert other.severity == "info" and other.extra["adapters"] == ["second"]
    assert load_adapter(str(tmp_path), adapter_name="default").pairs[0].r == 8
    second = load_adapter(str(tmp_path), adapter_name="second")
    assert second.pairs[0].r == 4 and second.adapter_config_path == str(tmp_path / "second" / "adapter_config.json")
    with pytest.raises(InputError, match=r"no adapter named 'third'.*available: default, second"):
        load_adapter(str(tmp_path), adapter_name="third")
    with pytest.raises(InputError, match="invalid adapter name"):
        load_adapter(str(tmp_path / "second"), adapter_name="../second")
    assert list_adapters(str(tmp_path / "second")) == []


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory not found"):
        load_adapter(str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        load_adapter(str(tmp_path / "file.txt"))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match=r"no PEFT adapter found: looked for adapter_model.safetensors") as err:
        load_adapter(str(empty))
    assert err.value.path == str(empty)
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"has adapter_config.json but no adapter weights"):
        load_adapter(str(empty))
    with pytest.raises(InputError, match="no adapter given"):
        load_adapter()
    with pytest.raises(InputError, match="weights file not found"):
        load_adapter(weights=str(tmp_path / "nope.safetensors"))


def test_explicit_paths_override_discovery(tmp_path: Path) -> None:
    weights_dir = _small_adapter(tmp_path / "w", r=4)             # its own config says alpha 8
    other_config = tmp_path / "cfg" / "adapter_config.json"
    other_config.parent.mkdir()
    other_config.write_text(json.dumps({"r": 4, "lora_alpha": 1}))
    ad = load_adapter(adapter_config=str(other_config), weights=str(weights_dir / "adapter_model.safetensors"))
    assert ad.pairs[0].scale == 0.25 and ad.adapter_config_path == str(other_config)
    # Weights alone: the config next to them is used.
    ad = load_adapter(weights=str(weights_dir / "adapter_model.safetensors"))
    assert ad.pairs[0].scale == 2.0 and ad.peft_dir is None
    # Directory plus explicit config.
    ad = load_adapter(str(weights_dir), adapter_config=str(other_config))
    assert ad.pairs[0].scale == 0.25 and ad.peft_dir == str(weights_dir)
    with pytest.raises(InputError, match="adapter config not found"):
        load_adapter(str(weights_dir), adapter_config=str(tmp_path / "none.json"))


# -- laziness and light imports ------------------------------------------------------------------------------
def test_loading_reads_headers_only(tmp_path: Path) -> None:
    tensors = {}
    for i in range(8):
        tensors.update(_lora(P.format(i=i, m="q_proj"), np.full((16, 4096), 0.5, np.float32),
                             np.full((4096, 16), 0.25, np.float32)))
    _write_adapter(tmp_path, tensors, {"r": 16, "lora_alpha": 16})   # 4 MiB of data
    del tensors
    tracemalloc.start()
    ad = load_adapter(str(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ad.pairs) == 8
    assert peak < 512 << 10  # far below the 4 MiB the factors occupy
    a, b = ad.pairs[3].load_factors()
    assert a.shape == (16, 4096) and float(a[0, 0]) == 0.5 and float(b[-1, -1]) == 0.25


def test_reading_safetensors_adapters_never_imports_torch(tmp_path: Path) -> None:
    _small_adapter(tmp_path)
    code = ("import sys; from gradience.adapter import load_adapter; ad = load_adapter(sys.argv[1]); "
            "[p.load_factors() for p in ad.pairs]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "False"


def test_pairs_come_in_natural_layer_order(tmp_path: Path) -> None:
    tensors = {}
    for i in (10, 2, 1):
        tensors.update(_lora(P.format(i=i, m="q_proj"), *_factors(2, 4, 4)))
    _write_adapter(tmp_path, tensors, {"r": 2, "lora_alpha": 2})  # safetensors stores keys alphabetically
    assert [p.name.split(".")[2] for p in load_adapter(str(tmp_path)).pairs] == ["1", "2", "10"]
