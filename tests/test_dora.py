"""DoRA adapters (SPEC §2): rank metrics on the directional part, UDR from the effective weight change.

Ground truth is PEFT itself: ``merge_and_unload()`` of the very adapter we audit, minus the base weight, densely
(small shapes), then numpy's SVD/Frobenius norm. The adapters are real PEFT DoRA adapters on tiny models built
from configs, with the magnitude vector and B perturbed (or trained) so that m ⊙ (W+sBA)/‖W+sBA‖ − W differs
from s·B·A by a lot (the directional norm alone was ~2x off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.adapter import load_adapter
from gradience.audit.core import AuditOptions, run_audit
from gradience.audit.render import render_text
from gradience.udr.spectral import RowBlocks, dora_effective_norms
from support import tiny_models

TOL = 1e-3  # SPEC §2: agreement with PEFT's merged difference


def _sigma1(x: np.ndarray) -> float:
    return float(np.linalg.svd(x.astype(np.float64), compute_uv=False)[0])


def _perturb(peft_model: Any, seed: int, mag: float = 0.5, b: float = 0.01) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + mag * torch.randn(p.shape, generator=gen))
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.add_(b * torch.randn(p.shape, generator=gen))


def _merged_deltas(peft_model: Any, base_state: dict[str, Any]) -> dict[str, np.ndarray]:
    """PEFT's own answer: merged weight − base weight, for every weight the merge changed."""
    merged = peft_model.merge_and_unload().state_dict()
    out = {}
    for key, w in merged.items():
        if key.endswith(".weight") and key in base_state:
            d = w.double().numpy() - base_state[key].double().numpy()
            if np.abs(d).max() > 0:
                out[key[: -len(".weight")]] = d
    return out


def _dora_llama(base_dir: Path, out: Path, *, targets: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                         init_lora_weights=False, lora_dropout=0.0))
    _perturb(pm, seed)
    pm.save_pretrained(str(out))
    return _merged_deltas(pm, base_state)


def _audit(adapter_dir: Path, base: Path | None, tmp_path: Path) -> dict[str, Any]:
    opts = AuditOptions(udr=base is not None, base_model=None if base is None else str(base),
                        base_norms_cache=str(tmp_path / "norms.json"))
    return run_audit(load_adapter(str(adapter_dir)), opts).to_summary()


def _assert_matches_merge(summary: dict[str, Any], deltas: dict[str, np.ndarray], base_dir: Path) -> None:
    from safetensors.numpy import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    rows = {row["name"]: row for row in summary["layers"]}
    assert set(rows) == set(deltas), (sorted(rows), sorted(deltas))
    ratios = []
    for name, d in deltas.items():
        row = rows[name]
        assert row["dora"] is True
        true_sigma, true_frob = _sigma1(d), float(np.linalg.norm(d))
        assert row["dora_eff_sigma_max"] == pytest.approx(true_sigma, rel=TOL), name
        assert row["dora_eff_frob_norm"] == pytest.approx(true_frob, rel=TOL), name
        w = base[name + ".weight"]
        assert row["udr"] == pytest.approx(true_sigma / _sigma1(w), rel=TOL), name
        assert row["udr_f"] == pytest.approx(true_frob / float(np.linalg.norm(w.astype(np.float64))), rel=TOL)
        ratios.append(row["delta_sigma_max"] / true_sigma)
    # The directional part alone is a different number everywhere: a fallback to s·B·A would fail above.
    assert all(abs(x - 1.0) > 5 * TOL for x in ratios), ratios


@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("dora_llama")
    deltas = _dora_llama(tiny_llama_dir, out, targets=["q_proj", "k_proj", "o_proj", "down_proj", "embed_tokens"])
    return out, deltas


def test_udr_of_real_peft_dora_matches_merge_and_unload(llama_dora: tuple[Path, dict[str, np.ndarray]],
                                                        tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter_dir, deltas = llama_dora
    assert any(k.endswith("embed_tokens") for k in deltas)  # embedding DoRA: norms per embedding dimension
    summary = _audit(adapter_dir, tiny_llama_dir, tmp_path)
    _assert_matches_merge(summary, deltas, tiny_llama_dir)
    assert summary["adapter"]["use_dora"] is True
    # Magnitudes are DoRA parts, not non-LoRA tensors; the one non-LoRA tensor is the embedding weight PEFT saves
    # along with an embedding adapter (save_embedding_layers).
    assert summary["non_lora_tensors"]["names"] == ["base_model.model.model.embed_tokens.base_layer.weight"]
    codes = {i["code"] for i in summary["issues"]}
    assert "dora_directional_only" not in codes
    assert summary["n_layers_with_udr"] == len(deltas)
    text = render_text(summary, top_wasteful=3)
    assert "DoRA: UDR from the effective update" in text


def test_without_base_magnitudes_are_said_to_be_directional(llama_dora: tuple[Path, dict[str, np.ndarray]],
                                                             tmp_path: Path) -> None:
    adapter_dir, deltas = llama_dora
    summary = _audit(adapter_dir, None, tmp_path)
    issue = next(i for i in summary["issues"] if i["code"] == "dora_directional_only")
    assert sorted(issue["modules"]) == sorted(deltas)
    assert "directional part s·B·A only" in issue["message"] and "--base-model" in issue["message"]
    for row in summary["layers"]:
        assert row["dora"] is True and row["udr"] is None and row["dora_eff_sigma_max"] is None
        assert row["delta_sigma_max"] > 0  # the directional magnitudes are still reported, labelled as such
    text = render_text(summary, top_wasteful=3)
    assert "DoRA: magnitudes are of the directional part s·B·A only" in text
    assert "dora_directional_only" in text


def test_trained_dora_fixture_matches_merge(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A DoRA adapter trained by a few real AdamW steps (m and B both moved by the optimizer)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = tiny_models.make_peft_adapter(tiny_llama_dir, tmp_path / "trained", arch="llama", use_dora=True,
                                            init="trained", targets=["q_proj", "v_proj", "up_proj"])
    base = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = _merged_deltas(PeftModel.from_pretrained(base, str(adapter)), base_state)
    summary = _audit(adapter, tiny_llama_dir, tmp_path)
    rows = {row["name"]: row for row in summary["layers"]}
    for name, d in deltas.items():
        assert rows[name]["dora_eff_sigma_max"] == pytest.approx(_sigma1(d), rel=TOL)
        assert rows[name]["dora_eff_frob_norm"] == pytest.approx(float(np.linalg.norm(d)), rel=TOL)


def test_gpt2_conv1d_dora_uses_the_transposed_base(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (d_in, d_out); c_proj is square, so only fan_in_fan_out tells the layout."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir), dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                         use_dora=True, init_lora_weights=False, lora_dropout=0.0,
                                         fan_in_fan_out=True))
    _perturb(pm, 1)
    adapter = tmp_path / "gpt2_dora"
    pm.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    deltas = _merged_deltas(pm, base_state)
    assert any(d.shape[0] == d.shape[1] for d in deltas.values())  # attn.c_proj: the ambiguous square case
    _assert_matches_merge(_audit(adapter, tiny_gpt2_dir, tmp_path), deltas, tiny_gpt2_dir)


def test_conv2d_dora_matches_merge(tmp_path: Path) -> None:
    """Conv DoRA: PEFT normalises each output channel over (in, kh, kw); factors flatten to (r, in·kh·kw)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(2)
    net = Net()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    pm = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], use_dora=True,
                                        init_lora_weights=False))
    _perturb(pm, 2)
    adapter = tmp_path / "conv_dora"
    pm.save_pretrained(str(adapter))
    deltas = _merged_deltas(pm, base_state)
    assert list(deltas) == ["conv"]
    summary = _audit(adapter, base_dir, tmp_path)
    row = summary["layers"][0]
    assert row["kind"] == "conv" and row["dora"] is True
    d = deltas["conv"].reshape(8, -1)
    assert row["dora_eff_sigma_max"] == pytest.approx(_sigma1(d), rel=TOL)
    assert row["dora_eff_frob_norm"] == pytest.approx(float(np.linalg.norm(d)), rel=TOL)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(70, 50), (50, 70), (300, 120)])
def test_effective_norms_against_dense_formula(shape: tuple[int, int], transposed: bool) -> None:
    """The implicit operator against the dense ΔW_eff = diag(m/‖W+sBA‖_row)(W+sBA) − W (numpy, float64)."""
    d_out, d_in = shape
    rng = np.random.default_rng(d_out + d_in + transposed)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    a, b, s = rng.standard_normal((3, d_in)) * 0.1, rng.standard_normal((d_out, 3)) * 0.1, 1.5
    full = w.astype(np.float64) + s * b @ a
    norms = np.linalg.norm(full, axis=1)
    m = norms * (1.0 + 0.1 * rng.standard_normal(d_out))
    dense = (m / norms)[:, None] * full - w
    stored = np.ascontiguousarray(w.T) if transposed else w
    eff = dora_effective_norms(RowBlocks(stored, block_bytes=4 * stored.shape[1] * 7), transposed=transposed,
                               a=a, b=b, scale=s, magnitude=m)
    assert eff.sigma_max == pytest.approx(_sigma1(dense), rel=2e-4)
    assert eff.frob_norm == pytest.approx(float(np.linalg.norm(dense)), rel=1e-12)
    # m equal to the row norms and B·A = 0 is the identity: no change at all.
    zero = dora_effective_norms(RowBlocks(stored), transposed=transposed, a=a, b=np.zeros_like(b), scale=s,
                                magnitude=np.linalg.norm(w.astype(np.float64), axis=1))
    assert zero.frob_norm < 1e-6 * float(np.linalg.norm(w)) and zero.sigma_max < 1e-5 * _sigma1(w)


def test_zero_row_norm_gives_an_issue_not_nan(tmp_path: Path) -> None:
    """W + s·B·A with a zero row makes m/‖·‖ undefined (PEFT would produce NaN): an issue, UDR null."""
    from safetensors.numpy import save_file

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    w = np.ones((6, 5), np.float32)
    w[2] = 0.0
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    a, b = np.ones((1, 5), np.float32), np.ones((6, 1), np.float32)
    b[2] = 0.0
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b,
               f"{prefix}.lora_magnitude_vector": np.ones(6, np.float32)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1, "use_dora": True,
                                                             "peft_type": "LORA"}))
    summary = _audit(adapter, base_dir, tmp_path)
    codes = {i["code"]: i for i in summary["issues"]}
    assert codes["dora_effective_unavailable"]["modules"] == ["model.layers.0.mlp.up_proj"]
    assert "zero row norm" in codes["dora_effective_unavailable"]["message"]
    assert "dora_directional_only" in codes
    assert summary["layers"][0]["udr"] is None and summary["layers"][0]["base_sigma_max"] is not None


def test_misshapen_magnitude_is_a_shape_issue(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"{prefix}.lora_A.weight": np.ones((2, 5), np.float32),
               f"{prefix}.lora_B.weight": np.ones((6, 2), np.float32),
               f"{prefix}.lora_magnitude_vector": np.ones(5, np.float32)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True}))
    loaded = load_adapter(str(adapter))
    assert loaded.pairs[0].dora and loaded.pairs[0].magnitude_key is None
    issue = next(i for i in loaded.issues if i.code == "shape_mismatch")
    assert "magnitude" in issue.message and issue.modules == ["model.layers.0.mlp.up_proj"]
    assert loaded.non_lora.count == 0
