"""compress against real PEFT: OUT loads with ``PeftModel.from_pretrained``, every module has its new rank, and
its ``get_delta_weight`` equals the dense truncated SVD (numpy) of the input's ΔW as PEFT computes it.

The reference is independent of our reader and math: PEFT builds ΔW of the input (its scaling, patterns,
fan_in_fan_out, embedding/conv layouts), numpy SVDs it densely, and the truncation to each module's k is
compared with what PEFT computes from OUT. Logits of the compressed model are compared with the original's and
with a model carrying the dense truncated ΔW merged in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.engines import next_allowed_max_lora_rank
from gradience.io.safetensors import SafetensorsFile

pytest.importorskip("peft")
REL_TOL = 1e-5


# -- builders ---------------------------------------------------------------------------------------------
def _load_base(base_dir: str | None, kind: str) -> Any:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "conv":
        return _TinyConvNet()
    if kind == "seq_cls":
        return AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
    if kind == "bare":
        return AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def _tiny_conv_class() -> type:
    import torch

    class TinyConvNet(torch.nn.Module):
        """A Conv2d (3x3 and 1x1) + Linear model: conv LoRA on real PEFT."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
            self.pointwise = torch.nn.Conv2d(12, 10, 1)
            self.fc = torch.nn.Linear(10 * 6 * 6, 7)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.relu(self.pointwise(torch.relu(self.conv(x)))).flatten(1))

    return TinyConvNet


def _TinyConvNet() -> Any:  # a factory standing in for the class (torch is imported lazily)
    return _tiny_conv_class()()


def make_adapter(base_dir: Path | None, out: Path, kind: str, *, seed: int = 0, dtype: str = "float32",
                 **lora: Any) -> Path:
    """A real PEFT adapter whose LoRA factors (and DoRA magnitudes) are perturbed with random values, so B ≠ 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _load_base(None if base_dir is None else str(base_dir), kind)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=gen) * 0.3
                if "lora_magnitude_vector" in name:
                    param.add_(noise * 0.1)
                else:
                    # a decaying spectrum: scale the rank axis so that truncation has something to choose
                    r_axis = 0 if ("lora_A" in name or "lora_embedding_A" in name) else 1
                    decay = 0.6 ** torch.arange(param.shape[r_axis], dtype=torch.float32)
                    shape = [1] * param.dim()
                    shape[r_axis] = -1
                    param.copy_(noise * decay.reshape(shape))
    peft_model = peft_model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None if base_dir is None else str(base_dir)
    cfg_path.write_text(json.dumps(cfg))
    return out


def peft_model(adapter_dir: Path, kind: str) -> Any:
    import torch
    from peft import PeftModel

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = _load_base(cfg.get("base_model_name_or_path"), kind)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(torch.float64).eval()


def peft_deltas(model: Any) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    import torch
    from peft.tuners.lora import LoraLayer

    deltas, ranks = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            key = name.removeprefix("base_model.model.")
            with torch.no_grad():
                deltas[key] = module.get_delta_weight("default").detach().cpu().numpy().astype(np.float64)
            ranks[key] = int(module.r["default"])
    return deltas, ranks


def dense_truncation(dw: np.ndarray, k: int) -> np.ndarray:
    mat = dw.reshape(dw.shape[0], -1)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vt[:k]).reshape(dw.shape)


def run_compress(src: Path, out: Path, *flags: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["compress", "--peft-dir", str(src), "--out", str(out), "--json", *flags]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / "compress.json").read_text()) | {"output": doc["output"]}
    return doc


def check_against_peft(src: Path, out: Path, doc: dict[str, Any], kind: str) -> dict[str, float]:
    """OUT's modules have rank r_after and ΔW = dense rank-k truncation of the input's ΔW (relative 1e-5)."""
    before, ranks_before = peft_deltas(peft_model(src, kind))
    after, ranks_after = peft_deltas(peft_model(out, kind))
    rows = {row["name"]: row for row in doc["layers"]}
    assert set(after) == set(before) == set(rows)
    worst = 0.0
    for name, dw in before.items():
        row = rows[name]
        assert ranks_before[name] == row["r_before"]
        assert ranks_after[name] == row["r_after"], name
        k = min(row["r_after"], row["r_before"])
        want = dense_truncation(dw, k)
        err = float(np.linalg.norm(after[name] - want) / np.linalg.norm(want))
        worst = max(worst, err)
        assert err <= REL_TOL, (name, err)
        # energy retained per layer = Σ_{i≤k}σ²/Σσ² of the input (dense reference here; the audit below)
        sig = np.linalg.svd(dw.reshape(dw.shape[0], -1), compute_uv=False)
        assert row["energy_retained"] == pytest.approx(float(np.sum(sig[:k] ** 2) / np.sum(sig**2)), rel=1e-6)
    return {"max_rel_delta_error": worst}


def audit_json(adapter: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["audit", "--peft-dir", str(adapter), "--json", "--no-udr"]) == 0
    return json.loads(capsys.readouterr().out)


def check_audit(src: Path, out: Path, doc: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """``gradience audit OUT`` shows the new ranks; energy_retained = Σ_{i≤k}σ²/Σσ² of the input audit's σ."""
    a_in = {row["name"]: row for row in audit_json(src, capsys)["layers"]}
    a_out = {row["name"]: row for row in audit_json(out, capsys)["layers"]}
    for row in doc["layers"]:
        assert a_out[row["name"]]["r"] == row["r_after"]
        sig = np.asarray(a_in[row["name"]]["singular_values"])
        k = min(row["r_after"], row["r_before"])
        assert row["energy_retained"] == pytest.approx(float(np.sum(sig[:k] ** 2) / np.sum(sig**2)), rel=1e-12)


def logits(model: Any, kind: str) -> np.ndarray:
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if kind == "conv":
            return model(torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)).numpy()
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        out = model(input_ids=ids)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def check_logits(src: Path, out: Path, kind: str, doc: dict[str, Any]) -> dict[str, float]:
    """Compressed logits equal a model with the dense truncated ΔW merged (to 1e-5 relative); the difference to
    the original model's logits is what the truncation costs, reported (and 0 when nothing was truncated)."""
    import torch

    original = peft_model(src, kind)
    compressed = peft_model(out, kind)
    reference = peft_model(src, kind)
    rows = {row["name"]: row for row in doc["layers"]}
    deltas, _ = peft_deltas(reference)
    merged = reference.merge_and_unload()
    with torch.no_grad():
        for name, dw in deltas.items():
            k = min(rows[name]["r_after"], rows[name]["r_before"])
            module = merged.get_submodule(name)
            fix = torch.from_numpy(dense_truncation(dw, k) - dw).to(module.weight.dtype)
            module.weight.add_(fix.reshape(module.weight.shape))
    lo, lc, lr = logits(original, kind), logits(compressed, kind), logits(merged, kind)
    scale = float(np.abs(lo).max())
    if not any(row["dora"] for row in doc["layers"]):  # a DoRA merge is not W + ΔW (see the base-model test)
        assert float(np.abs(lc - lr).max()) <= 1e-5 * scale
    diff = float(np.abs(lc - lo).max())
    if all(r["r_after"] >= r["r_before"] for r in doc["layers"]):
        assert diff <= 1e-5 * scale
    return {"logits_max_abs_diff_vs_original": diff, "logits_scale": scale}


def full_check(src: Path, out: Path, kind: str, doc: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    facts = check_against_peft(src, out, doc, kind)
    facts |= check_logits(src, out, kind, doc)
    check_audit(src, out, doc, capsys)
    # the reported logits difference (visible with pytest -s)
    print(f"\n[compress] {src.name} -> {out.name}: {facts}", file=sys.stderr)


# -- fixtures specific to compress -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "llama_embed"
    return make_adapter(tiny_llama_dir, out, "causal", r=6, lora_alpha=12,
                        target_modules=["embed_tokens", "q_proj", "v_proj"])


@pytest.fixture(scope="module")
def conv_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compress") / "conv"
    return make_adapter(None, out, "conv", r=6, lora_alpha=6, target_modules=["conv", "pointwise", "fc"])


@pytest.fixture(scope="module")
def llama_decay_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "llama_decay"
    return make_adapter(tiny_llama_dir, out, "causal", r=8, lora_alpha=16,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def patterns_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """rsLoRA + rank_pattern + a regex alpha_pattern."""
    out = tmp_path_factory.mktemp("compress") / "llama_patterns"
    return make_adapter(tiny_llama_dir, out, "causal", r=8, lora_alpha=16, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
                        alpha_pattern={r"layers\.[01]\.self_attn\.v_proj": 5, "up_proj": 24})


@pytest.fixture(scope="module")
def dora_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "llama_dora"
    return make_adapter(tiny_llama_dir, out, "causal", r=8, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "llama_bf16"
    return make_adapter(tiny_llama_dir, out, "causal", r=8, lora_alpha=16, dtype="bfloat16",
                        target_modules=["q_proj", "v_proj", "gate_proj"])


@pytest.fixture(scope="module")
def gpt2_decay_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "gpt2"
    return make_adapter(tiny_gpt2_dir, out, "causal", r=8, lora_alpha=16, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"])


@pytest.fixture(scope="module")
def seqcls_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_distilbert_seqcls_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("compress") / "distilbert_seqcls"
    return make_adapter(tiny_distilbert_seqcls_dir, out, "seq_cls", r=8, lora_alpha=8, task_type="SEQ_CLS",
                        target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"])


# -- the matrix of SPEC §12 tests --------------------------------------------------------------------------
CASES: list[tuple[str, str, list[str]]] = [
    ("llama_decay_adapter", "causal", ["--energy", "0.9"]),
    ("llama_decay_adapter", "causal", ["--per-layer", "--margin", "1.5"]),
    ("llama_decay_adapter", "causal", ["--budget", "40%"]),
    ("patterns_adapter", "causal", ["--rank", "3"]),
    ("patterns_adapter", "causal", ["--energy", "0.95", "--uniform"]),
    ("bf16_adapter", "causal", ["--sv-fro", "0.9", "--dtype", "float32"]),
    ("gpt2_decay_adapter", "causal", ["--sv-cumulative", "0.7"]),
    ("seqcls_adapter", "seq_cls", ["--sv-ratio", "3"]),
    ("embed_adapter", "causal", ["--rank", "2"]),
    ("conv_adapter", "conv", ["--rank", "2", "--min-rank", "1"]),
    ("dora_adapter", "causal", ["--rank", "3"]),
]


@pytest.mark.parametrize(("fixture", "kind", "flags"), CASES, ids=[f"{c[0]}:{' '.join(c[2])}" for c in CASES])
def test_compressed_adapter_loads_in_peft_with_exact_truncation(
        fixture: str, kind: str, flags: list[str], request: pytest.FixtureRequest, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    src: Path = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    doc = run_compress(src, out, *flags, capsys=capsys)
    assert doc["schema"] == "gradience.compress/v1"
    assert any(row["r_after"] < row["r_before"] for row in doc["layers"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["alpha_pattern"] == {}
    src_cfg = json.loads((src / "adapter_config.json").read_text())
    for key in ("target_modules", "task_type", "use_dora", "modules_to_save", "fan_in_fan_out"):
        assert cfg.get(key) == src_cfg.get(key)
    full_check(src, out, kind, doc, capsys)
    if "--uniform" in flags:
        assert len({row["r_after"] for row in doc["layers"]}) == 1 and cfg["rank_pattern"] == {}
        assert all(v["ok"] for v in doc["portability"].values())
    if "--budget" in flags:
        assert doc["summary"]["params_after"] <= doc["policy"]["budget_params"]


def test_k_equal_r_reproduces_the_input(llama_decay_adapter: Path, patterns_adapter: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # plain α/r: every tensor is copied byte for byte
    out = tmp_path / "same"
    doc = run_compress(llama_decay_adapter, out, "--rank", "8", capsys=capsys)
    assert {row["action"] for row in doc["layers"]} == {"kept"}
    a, b = SafetensorsFile(llama_decay_adapter / "adapter_model.safetensors"), SafetensorsFile(out / "adapter_model.safetensors")
    assert list(a.tensors) == list(b.tensors)
    for key in a.tensors:
        assert a.read_raw(key).tobytes() == b.read_raw(key).tobytes()
    full_check(llama_decay_adapter, out, "causal", doc, capsys)
    # rsLoRA + alpha_pattern: the factors must be rescaled for α/r, ΔW unchanged
    out2 = tmp_path / "same_patterns"
    doc2 = run_compress(patterns_adapter, out2, "--rank", "8", capsys=capsys)
    assert {row["method"] for row in doc2["layers"]} == {"rescale"}
    full_check(patterns_adapter, out2, "causal", doc2, capsys)


def test_bf16_kept_and_metadata(bf16_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bf16"
    doc = run_compress(bf16_adapter, out, "--rank", "4", capsys=capsys)
    sf = SafetensorsFile(out / "adapter_model.safetensors")
    assert {info.dtype for info in sf.tensors.values()} == {"BF16"}
    assert sf.metadata["gradience_source_sha256"] == doc["source"]["sha256"]
    assert json.loads(sf.metadata["gradience_policy"])["name"] == "rank"
    before, _ = peft_deltas(peft_model(bf16_adapter, "causal"))
    after, ranks = peft_deltas(peft_model(out, "causal"))
    for name, dw in before.items():
        want = dense_truncation(dw, 4)
        assert ranks[name] == 4
        assert np.linalg.norm(after[name] - want) <= 1e-2 * np.linalg.norm(want)  # bf16 rounding of factors


def test_modules_to_save_and_dora_parts_are_copied(seqcls_adapter: Path, dora_adapter: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for src, flags in ((seqcls_adapter, ["--rank", "2"]), (dora_adapter, ["--rank", "2"])):
        out = tmp_path / src.name
        doc = run_compress(src, out, *flags, capsys=capsys)
        a, b = SafetensorsFile(src / "adapter_model.safetensors"), SafetensorsFile(out / "adapter_model.safetensors")
        lora_keys = {k for row in doc["layers"] for k in b.tensors if k.startswith(row["peft_prefix"] + ".lora_")
                     and ("lora_A" in k or "lora_B" in k)}
        others = [k for k in a.tensors if k not in lora_keys]
        assert others
        for key in others:
            assert a.read_raw(key).tobytes() == b.read_raw(key).tobytes(), key
        port = doc["portability"]
        assert port["peft"]["ok"] and not port["vllm"]["ok"] and not port["llama_cpp"]["ok"]
        if src is dora_adapter:
            assert "DoRA" in port["vllm"]["reason"]
            assert any(i["code"] == "dora_directional_truncated" for i in doc["issues"])
        else:
            assert "modules_to_save" in port["vllm"]["reason"]


def test_dora_with_base_model_reports_exact_merged_error(dora_adapter: Path, tiny_llama_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    out = tmp_path / "dora_base"
    doc = run_compress(dora_adapter, out, "--rank", "3", "--base-model", str(tiny_llama_dir),
                       "--base-norms-cache", str(tmp_path / "norms.json"), capsys=capsys)
    merged_in = peft_model(dora_adapter, "causal").merge_and_unload()
    merged_out = peft_model(out, "causal").merge_and_unload()
    base = _load_base(str(tiny_llama_dir), "causal").to(torch.float64)
    for row in doc["layers"]:
        w = base.get_submodule(row["name"]).weight.detach().numpy()
        m_in = merged_in.get_submodule(row["name"]).weight.detach().numpy()
        m_out = merged_out.get_submodule(row["name"]).weight.detach().numpy()
        want = np.linalg.norm(m_out - m_in) / np.linalg.norm(m_in - w)
        assert row["dora_rel_error_of_update"] == pytest.approx(want, rel=1e-3)
    assert doc["udr"]["after"]["n_layers_with_udr"] == len(doc["layers"])
    for row in doc["layers"]:
        assert row["udr_after"] == pytest.approx(row["udr_before"])          # σ₁ is kept
        assert row["udr_f_after"] < row["udr_f_before"]


def test_heterogeneous_output_portability(llama_decay_adapter: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_compress(llama_decay_adapter, tmp_path / "het", "--energy", "0.8", capsys=capsys)
    assert len({row["r_after"] for row in doc["layers"]}) > 1
    port = doc["portability"]
    assert port["peft"]["ok"] and port["llama_cpp"]["ok"]
    # vLLM >= 0.33.0 reads rank_pattern (PEFTHelper.get_rank_and_scaling): per-module ranks are fine there
    assert port["vllm"]["ok"] and "--uniform" not in port["vllm"]["reason"]
    assert port["vllm"]["version"] == ">= 0.33.0" and port["vllm"]["rules"] == ["vllm.rank_pattern"]
    top = max(row["r_after"] for row in doc["layers"])
    assert f"--max-lora-rank {next_allowed_max_lora_rank(top)}" in port["vllm"]["reason"]
    # older releases used one lora_alpha/r for every module
    old = run_compress(llama_decay_adapter, tmp_path / "het_old", "--energy", "0.8", "--engine-version",
                       "vllm=0.10.2", capsys=capsys)["portability"]["vllm"]
    assert not old["ok"] and "--uniform" in old["reason"] and old["version"] == "0.10.2"


def test_text_output_names_policy_table_and_portability(llama_decay_adapter: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "text"
    assert main(["compress", "--peft-dir", str(llama_decay_adapter), "--out", str(out), "--energy", "0.9"]) == 0
    text = capsys.readouterr().out
    for needle in ("Gradience compress", "Policy:", "PEFT convert_to_lora", "Largest reductions", "Summary:",
                   "Portability:", "vLLM", "llama.cpp", "gradience audit --peft-dir"):
        assert needle in text
