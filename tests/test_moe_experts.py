"""MoE expert LoRA (PEFT target_parameters): per-expert pairs against PEFT's own get_delta_weight on tiny
transformers MoE models (Qwen3-MoE: (E, out, in); GPT-OSS: (E, in, out), is_transposed), the audit's expert rows
and coverage, and hostile headers refused in one line before any data is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit.core import AuditOptions, run_audit
from gradience.errors import InputError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_MODELS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
}


def _peft_moe(model_type: str, out: Path, *, use_rslora: bool = False) -> Any:
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=12,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, **_MODELS[model_type])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=use_rslora,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(model, lora)
    pm.save_pretrained(out)
    return pm


def _peft_deltas(pm: Any) -> dict[str, np.ndarray]:
    """PEFT's get_delta_weight per wrapper, sliced per expert and put in (out, in) orientation."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in pm.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        delta = module.get_delta_weight("default").detach().double().numpy()
        for e in range(module.num_experts):
            # (E, out, in) for swapped (Qwen3-MoE) parameters, (E, in, out) for is_transposed ones (GPT-OSS)
            out[f"{clean}.{module.parameter_name}[{e}]"] = delta[e] if module._did_swap_in_out_features else delta[e].T
    return out


@pytest.mark.parametrize("model_type", sorted(_MODELS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_expert_pairs_match_peft_delta(tmp_path: Path, model_type: str, use_rslora: bool) -> None:
    pm = _peft_moe(model_type, tmp_path, use_rslora=use_rslora)
    expected = _peft_deltas(pm)
    loaded = load_adapter(str(tmp_path))
    experts = {p.name: p for p in loaded.pairs if p.expert is not None}
    assert set(experts) == set(expected) and len(expected) == 2 * 2 * 4
    assert any(p.name.endswith("q_proj") and p.expert is None for p in loaded.pairs)  # ordinary pairs stay
    for name, pair in experts.items():
        a, b = pair.load_factors()
        ours = pair.scale * (b.astype(np.float64) @ a.astype(np.float64))
        np.testing.assert_allclose(ours, expected[name], rtol=1e-5, atol=1e-7)
    # the audit's spectrum of each expert row is the dense SVD of PEFT's ΔW_e
    result = run_audit(loaded, AuditOptions(udr=False))
    rows = {row["name"]: row for row in result.to_summary()["layers"]}
    for name, delta in expected.items():
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert rows[name]["delta_sigma_max"] == pytest.approx(sigma[0], rel=1e-5)
        assert rows[name]["delta_frob_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        assert rows[name]["expert"] == int(name[-2]) and rows[name]["num_experts"] == 4


def test_never_adapted_expert_and_coverage(tmp_path: Path) -> None:
    """An expert whose B columns are zero (never routed to) is reported, with the per-parameter coverage."""
    from safetensors.numpy import load_file, save_file

    pm = _peft_moe("qwen3_moe", tmp_path)
    del pm
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"  # the outer wrapper: down_proj
    b = state[key].copy()
    b[:, 2::4] = 0.0  # expert 2 of 4: every 4th column from 2 (PEFT's (out, r, E) layout)
    state[key] = b
    save_file(state, path)
    summary = run_audit(load_adapter(str(tmp_path)), AuditOptions(udr=False)).to_summary()
    issue = next(i for i in summary["issues"] if i["code"] == "expert_never_adapted")
    assert issue["modules"] == ["model.layers.1.mlp.experts.down_proj[2]"]
    params = {p["parameter"]: p for p in summary["experts"]["parameters"]}
    down = params["model.layers.1.mlp.experts.down_proj"]
    assert down["never_adapted"] == [2] and down["n_adapted"] == 3
    assert params["model.layers.1.mlp.experts.gate_up_proj"]["n_adapted"] == 4
    shares = [r["energy_share"] for r in summary["layers"] if r["name"].startswith(down["parameter"] + "[")]
    assert sum(shares) == pytest.approx(1.0) and shares[2] == 0.0
    assert summary["experts"]["n_expert_rows"] == 16 and summary["experts"]["n_adapted"] == 15
    from gradience.audit.render import render_text

    text = render_text(summary, top_wasteful=5)
    assert "Experts: 15 of 16 expert updates adapted" in text
    assert "layer 1: down_proj 3/4, gate_up_proj 4/4 experts adapted" in text


def _forged(tmp_path: Path, a_shape: list[int], b_shape: list[int], r: int = 2) -> Path:
    """An expert adapter whose headers promise these shapes (data zero-filled, sizes consistent)."""
    header: dict[str, Any] = {}
    offset = 0
    prefix = "base_model.model.model.layers.0.mlp.experts"
    for name, shape in ((f"{prefix}.lora_A.weight", a_shape), (f"{prefix}.lora_B.weight", b_shape)):
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(offset))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": [],
        "target_parameters": ["mlp.experts.down_proj"]}))
    return tmp_path


@pytest.mark.parametrize("a_shape,b_shape,needle", [
    ([7, 12], [16, 7], "not a multiple of r=2"),
    ([2 * 5000, 1], [1, 2 * 5000], "5000 experts"),
    ([8, 12], [16, 6], "do not fit"),
])
def test_hostile_expert_headers(tmp_path: Path, a_shape: list[int], b_shape: list[int], needle: str) -> None:
    path = _forged(tmp_path, a_shape, b_shape)
    with pytest.raises(InputError) as err:
        load_adapter(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "gradience", "audit", str(path), "--no-udr"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradience audit: error: ") and needle in lines[0]


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_udr_per_expert(tmp_path: Path, layout: str) -> None:
    """UDR of each expert against the base expert's own weight: the hub layout (experts.<e>.gate_proj/up_proj/
    down_proj.weight, saved by transformers) and the fused 3-D layout (the in-memory parameters saved as is)."""
    from safetensors.numpy import save_file

    pm = _peft_moe("qwen3_moe", tmp_path / "adapter")
    expected = _peft_deltas(pm)
    base = pm.get_base_model()
    params = {n: p for n, p in base.named_parameters() if "lora" not in n}
    wrapped = {n.replace(".base_layer", "").replace(".parametrizations", "").replace(".original", ""): p
               for n, p in params.items()}
    if layout == "fused":
        (tmp_path / "base").mkdir()
        save_file({n: p.detach().numpy().copy() for n, p in wrapped.items()}, tmp_path / "base" / "model.safetensors")
        (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    else:
        pm.unload().save_pretrained(tmp_path / "base")
    summary = run_audit(load_adapter(str(tmp_path / "adapter")),
                        AuditOptions(udr=True, base_model=str(tmp_path / "base"))).to_summary()
    rows = {r["name"]: r for r in summary["layers"]}
    for name, delta in expected.items():
        stacked, e = name[:-3], int(name[-2])
        w = wrapped[stacked].detach().double().numpy()[e]
        expect = np.linalg.norm(delta, 2) / np.linalg.norm(w, 2)
        assert rows[name]["udr"] == pytest.approx(expect, rel=1e-3), name

