"""``gradience verify --merged``: constructed base/adapter/merged triples with known verdicts, and real PEFT merges.

The triples (tests/support/verify_triples.py) are written with numpy: merged = round(W + c·s·B·A) per module, so
the verdict of every module is known by construction; the applied scale and residual are also checked against a
dense float64 computation of the same quantities.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.cli.main import main
from gradience.verify import verify_merged
from support import verify_triples as vt
from support.synthetic import write_safetensors

NAMES = vt.module_names()
Q, K, V, OPROJ, GATE, UP, DOWN = (NAMES[list(vt.TARGETS).index(t)] for t in vt.TARGETS)


def _triple(tmp_path: Path, *, dtype: str = "BF16", factors: dict[str, float] | None = None,
            adapter_kw: dict | None = None, onto: dict | None = None, changed: dict | None = None,
            base_weights: dict | None = None) -> tuple[Path, Path, Path, dict, dict]:
    base = vt.make_base(tmp_path / "base", dtype=dtype, weights=base_weights)
    pairs = vt.make_adapter(tmp_path / "adapter", **(adapter_kw or {}))
    vt.make_merged(tmp_path / "merged", base, pairs, dtype=dtype, factors=factors, onto=onto, changed=changed)
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", base, pairs


def _run(base: Path, adapter: Path, merged: Path) -> dict:
    return verify_merged(load_adapter(str(adapter)), str(merged), str(base))


def _rows(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["modules"]}


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_correct_merge_is_exact_in_each_dtype(tmp_path: Path, dtype: str) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path, dtype=dtype)
    doc = _run(base, adapter, merged)
    assert doc["schema"] == "gradience.verify/v1" and doc["mode"] == "merged"
    assert doc["ok"] is True
    assert {r["verdict"] for r in doc["modules"]} == {"exact"}
    assert doc["summary"]["exact"] == 7
    assert doc["unchanged"]["identical"] == 3 and not doc["unchanged"]["changed"]
    for row in doc["modules"]:
        assert row["dtype"] == dtype
        assert abs(row["applied_scale"] - 1) < 1e-3
        assert row["residual"] <= row["rounding_floor"]
    assert dtype in doc["rounding"]


def test_each_verdict_from_constructed_merges(tmp_path: Path) -> None:
    r = 8
    factors = {Q: 0.0, K: 2.0, V: math.sqrt(r), OPROJ: -1.0, GATE: 1 / r}
    base, adapter, merged, _, _ = _triple(tmp_path, factors=factors)
    rows = _rows(_run(base, adapter, merged))
    assert rows[Q]["verdict"] == "not_applied"
    assert rows[K]["verdict"] == "applied_twice"
    assert rows[V]["verdict"] == "wrong_scale" and "sqrt(r)" in rows[V]["detail"]
    assert rows[V]["scale_ratio"] == pytest.approx(math.sqrt(r))
    assert rows[OPROJ]["verdict"] == "wrong_scale" and "subtracted" in rows[OPROJ]["detail"]
    assert rows[GATE]["verdict"] == "wrong_scale" and "1/r" in rows[GATE]["detail"]
    assert rows[UP]["verdict"] == rows[DOWN]["verdict"] == "exact"


def test_a_merge_that_skipped_one_module(tmp_path: Path) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path, factors={DOWN: 0.0})
    doc = _run(base, adapter, merged)
    assert doc["ok"] is False
    assert doc["summary"]["verdicts"] == {"exact": 6, "not_applied": 1}
    assert next(i for i in doc["issues"] if i["code"] == "not_exact")["modules"] == [DOWN]


def test_rslora_merged_with_alpha_over_r_is_one_over_sqrt_r(tmp_path: Path) -> None:
    """An rsLoRA adapter (s = α/√r) merged by a tool that uses α/r: c = 1/√r on every module."""
    r = 16
    base, adapter, merged, _, _ = _triple(tmp_path, adapter_kw={"r": r, "alpha": 16, "use_rslora": True},
                                          factors=dict.fromkeys(NAMES, 1 / math.sqrt(r)))
    rows = _rows(_run(base, adapter, merged))
    for row in rows.values():
        assert row["verdict"] == "wrong_scale"
        assert row["scale_ratio"] == pytest.approx(0.25)
        assert "rsLoRA ignored" in row["detail"]


def test_alpha_pattern_ignored_is_named(tmp_path: Path) -> None:
    """v_proj has alpha 4 by alpha_pattern; a merge with the global lora_alpha 16 applies 4x its update."""
    base, adapter, merged, _, _ = _triple(tmp_path, adapter_kw={"alpha_pattern": {"v_proj": 4}},
                                          factors={V: 4.0})
    rows = _rows(_run(base, adapter, merged))
    assert rows[V]["verdict"] == "wrong_scale" and "alpha_pattern ignored" in rows[V]["detail"]
    assert rows[Q]["verdict"] == "exact"


def test_qlora_adapter_merged_into_16bit_weights_is_different_base(tmp_path: Path) -> None:
    """QLoRA trains on the de-quantized 4-bit weights; merging into the original 16-bit weights leaves the
    quantization error in W_merged − W_base − ΔW (unsloth-zoo PR 810: 10-150x the update)."""
    rng = np.random.default_rng(5)
    w16 = {f"{n}.weight": rng.normal(0, 0.02, (vt.TARGETS[n.rsplit('.', 1)[1]])).astype(np.float32) for n in NAMES}
    deq = {k: vt.quantize_4bit(v) for k, v in w16.items()}
    base, adapter, merged, _, _ = _triple(tmp_path, base_weights=deq, onto={k: vt.stored(w16[k], "BF16")
                                                                           for k in [f"{Q}.weight", f"{UP}.weight"]})
    rows = _rows(_run(base, adapter, merged))
    for name in (Q, UP):
        assert rows[name]["verdict"] == "different_base", rows[name]
        assert abs(rows[name]["applied_scale"] - 1) < 0.05
        assert rows[name]["residual"] > 1.0          # the quantization error is larger than the update
    assert rows[K]["verdict"] == "exact"


def test_unrelated_update_is_residual_unexplained(tmp_path: Path) -> None:
    base = vt.make_base(tmp_path / "base")
    pairs = vt.make_adapter(tmp_path / "adapter")
    other = vt.make_adapter(tmp_path / "other", seed=9)
    mixed = dict(pairs)
    mixed[OPROJ] = other[OPROJ]
    vt.make_merged(tmp_path / "merged", base, mixed)
    rows = _rows(_run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"))
    assert rows[OPROJ]["verdict"] == "residual_unexplained"
    assert rows[Q]["verdict"] == "exact"


def test_applied_scale_and_residual_match_dense_numpy(tmp_path: Path) -> None:
    base, adapter, merged, base_vals, pairs = _triple(tmp_path, factors={K: 0.7})
    rows = _rows(_run(base, adapter, merged))
    from gradience.io.safetensors import SafetensorsFile

    m = SafetensorsFile(merged / "model.safetensors")
    for name in (K, GATE):
        a, b, s = pairs[name]
        d = s * (b.astype(np.float64) @ a.astype(np.float64))
        e = m.read_f32(f"{name}.weight").astype(np.float64) - base_vals[f"{name}.weight"].astype(np.float64)
        c = float(np.sum(e * d) / np.sum(d * d))
        assert rows[name]["applied_scale"] == pytest.approx(c, rel=1e-5)
        assert rows[name]["residual"] == pytest.approx(np.linalg.norm(e - d) / np.linalg.norm(d), rel=1e-4)
    assert rows[K]["verdict"] == "wrong_scale" and "no known cause" in rows[K]["detail"]


def test_untouched_weight_changed_and_leftover_factors(tmp_path: Path) -> None:
    base, adapter, merged, base_vals, _ = _triple(
        tmp_path, changed={"model.norm.weight": np.full(vt.HIDDEN, 2.0, np.float32)})
    doc = _run(base, adapter, merged)
    assert doc["unchanged"]["changed"] == ["model.norm.weight"]
    assert doc["ok"] is False and any(i["code"] == "untouched_weight_changed" for i in doc["issues"])
    # a "merged" directory saved from the PEFT model without merge_and_unload still holds lora_A keys
    tensors = {k: v for k, v in base_vals.items()}
    tensors[f"{Q}.lora_A.weight"] = np.zeros((8, vt.HIDDEN), np.float32)
    (tmp_path / "merged2").mkdir()
    write_safetensors(tmp_path / "merged2" / "model.safetensors", tensors, dtype="BF16")
    doc2 = _run(base, adapter, tmp_path / "merged2")
    assert any(i["code"] == "not_unloaded" for i in doc2["issues"])


def test_sharded_merged_checkpoint(tmp_path: Path) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path)
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(merged / "model.safetensors")
    names = list(src.tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for i, chunk in enumerate((names[:4], names[4:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(shard_dir / fname, {n: src.read_f32(n) for n in chunk}, dtype="BF16")
        weight_map.update(dict.fromkeys(chunk, fname))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    doc = _run(base, adapter, shard_dir)
    assert doc["ok"] is True and doc["summary"]["exact"] == 7


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path, factors={Q: 0.0})
    argv = ["verify", "--merged", str(merged), "--base-model", str(base), "--peft-dir", str(adapter)]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["verdicts"]["not_applied"] == 1
    assert main([*argv, "--fail-on", "not_exact"]) == 1
    captured = capsys.readouterr()
    assert "not_applied" in captured.out and "fail-on met: not_exact" in captured.err
    assert main([*argv, "--fail-on", "applied_twice"]) == 0
    capsys.readouterr()
    assert main([*argv, "--fail-on", "bogus_rule"]) == 2
    assert "unknown rule" in capsys.readouterr().err


def test_cli_bad_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path)
    cases = [
        ["--merged", str(tmp_path / "nope"), "--base-model", str(base), "--peft-dir", str(adapter)],
        ["--merged", str(merged), "--base-model", str(base)],
        ["--merged", str(merged), "--peft-dir", str(adapter)],
    ]
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    cases.append(["--merged", str(tmp_path / "corrupt"), "--base-model", str(base), "--peft-dir", str(adapter)])
    for extra in cases:
        assert main(["verify", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gradience verify: error: ") and err.count("\n") == 1, err
        assert "internal error" not in err


@pytest.mark.slow
def test_verify_does_not_import_torch(tmp_path: Path) -> None:
    base, adapter, merged, _, _ = _triple(tmp_path)
    code = ("import sys\nfrom gradience.cli.main import main\n"
            f"rc = main(['verify', '--merged', {str(merged)!r}, '--base-model', {str(base)!r}, '--peft-dir', "
            f"{str(adapter)!r}, '--json'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- real PEFT merges --------------------------------------------------------------------------------------
def _peft_merge(base_dir: Path, adapter_dir: Path, out: Path, dtype: str = "float32") -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "patterns", "dora"])
def test_real_peft_merge_and_unload_is_exact(tmp_path: Path, tiny_llama_dir: Path, llama_adapter_dir: Path,
                                             llama_adapter_patterns_dir: Path, llama_adapter_dora_dir: Path,
                                             which: str) -> None:
    adapter = {"plain": llama_adapter_dir, "patterns": llama_adapter_patterns_dir,
               "dora": llama_adapter_dora_dir}[which]
    merged = _peft_merge(tiny_llama_dir, adapter, tmp_path / "merged")
    doc = verify_merged(load_adapter(str(adapter)), str(merged), str(tiny_llama_dir))
    assert doc["ok"] is True, [(r["name"], r["verdict"], r.get("detail")) for r in doc["modules"]]
    assert doc["summary"]["exact"] == len(doc["modules"]) == 14
    assert doc["unchanged"]["checked"] > 0 and not doc["unchanged"]["changed"]


@pytest.mark.slow
def test_real_peft_bf16_merge_is_exact(tmp_path: Path, tiny_llama_bf16_dir: Path, llama_adapter_dir: Path) -> None:
    merged = _peft_merge(tiny_llama_bf16_dir, llama_adapter_dir, tmp_path / "merged", dtype="bfloat16")
    doc = verify_merged(load_adapter(str(llama_adapter_dir)), str(merged), str(tiny_llama_bf16_dir))
    assert doc["ok"] is True, [(r["name"], r["verdict"], r.get("detail")) for r in doc["modules"]]
    assert {r["dtype"] for r in doc["modules"]} == {"BF16"}


@pytest.mark.slow
def test_real_peft_gpt2_conv1d_merge_is_exact(tmp_path: Path, tiny_gpt2_dir: Path, gpt2_adapter_dir: Path) -> None:
    """GPT-2's Conv1D stores weights (d_in, d_out) and the adapter says fan_in_fan_out: ΔW is compared transposed."""
    merged = _peft_merge(tiny_gpt2_dir, gpt2_adapter_dir, tmp_path / "merged")
    doc = verify_merged(load_adapter(str(gpt2_adapter_dir)), str(merged), str(tiny_gpt2_dir))
    assert doc["ok"] is True, [(r["name"], r["verdict"], r.get("detail")) for r in doc["modules"]]


def test_untouched_weight_in_another_dtype_is_checked_within_rounding(tmp_path: Path) -> None:
    """A merge saved in bf16 from an fp32 base: untouched weights equal within bf16 rounding, not bitwise."""
    base, adapter, merged, _, _ = _triple(tmp_path, dtype="F32")
    from gradience.io.safetensors import SafetensorsFile

    src = SafetensorsFile(merged / "model.safetensors")
    tensors = {k: np.array(src.read_f32(k)) for k in src.tensors}
    src.close()
    write_safetensors(merged / "model.safetensors", tensors, dtype="F32",
                      dtypes={"model.norm.weight": "BF16", "model.embed_tokens.weight": "BF16"})
    doc = _run(base, adapter, merged)
    assert doc["unchanged"]["within_rounding"] == 2 and doc["unchanged"]["identical"] == 1
    assert doc["ok"] is True
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01     # 1% off: beyond bf16 rounding
    write_safetensors(merged / "model.safetensors", tensors, dtype="F32", dtypes={"model.norm.weight": "BF16"})
    assert _run(base, adapter, merged)["unchanged"]["changed"] == ["model.norm.weight"]



def test_quantized_weight_is_a_named_problem_not_a_crash(tmp_path: Path) -> None:
    """4-bit merges are stored packed in uint8 (bitsandbytes): not read here; that module says so."""
    from gradience.io.safetensors import SafetensorsFile
    from gradience.io.safetensors_write import TensorSpec
    from gradience.io.safetensors_write import write_safetensors as write_specs

    base, adapter, merged, _, _ = _triple(tmp_path, dtype="F32")
    src = SafetensorsFile(merged / "model.safetensors")
    specs = []
    for name, info in src.tensors.items():
        if name == f"{Q}.weight":
            packed = np.zeros((info.shape[0] * info.shape[1] // 2, 1), np.uint8)
            specs.append(TensorSpec(name, "U8", packed.shape, lambda p=packed: p))
        else:
            specs.append(TensorSpec(name, "F32", info.shape, lambda n=name: np.array(src.read_f32(n))))
    (tmp_path / "q4").mkdir()
    write_specs(tmp_path / "q4" / "model.safetensors", specs)
    doc = _run(base, adapter, tmp_path / "q4")
    row = _rows(doc)[Q]
    assert row["verdict"] is None and "quantized" in row["problem"]
    assert doc["summary"]["exact"] == 6 and doc["ok"] is False


@pytest.mark.slow
def test_real_peft_merge_of_a_sharded_base_saved_sharded(tmp_path: Path, tiny_llama_sharded_dir: Path,
                                                          llama_adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sharded_dir), torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(llama_adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"), max_shard_size="20KB")
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    doc = verify_merged(load_adapter(str(llama_adapter_dir)), str(tmp_path / "merged"), str(tiny_llama_sharded_dir))
    assert doc["ok"] is True and doc["summary"]["exact"] == 14
