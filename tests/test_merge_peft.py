"""merge against real PEFT on a tiny Llama: the merged adapter loads with ``PeftModel.from_pretrained`` and its
``get_delta_weight`` equals the intended merge of what PEFT computes for each input (≤ 1e-5 relative); PEFT's own
``add_weighted_adapter(combination_type="linear")`` of the same two adapters does not (its cross terms), and
``gradience audit`` / ``compare`` read the merged adapter.

The reference ΔW of every input comes from PEFT itself (its scaling, rsLoRA, rank_pattern, alpha_pattern), so
it is independent of gradience's reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from support import tiny_models

pytest.importorskip("peft")
REL_TOL = 1e-5
pytestmark = pytest.mark.slow


def _deltas(adapter_dirs: list[Path], base_dir: Path, names: list[str] | None = None) -> dict[str, Any]:
    """{adapter name: {module: ΔW float64}} from one PEFT model holding every adapter."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = tiny_models._load_base(base_dir, "llama")
    names = names or [f"a{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    model = model.to(torch.float64)
    out: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    ranks: dict[str, dict[str, int]] = {n: {} for n in names}
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = mod_name.removeprefix("base_model.model.")
            for n in names:
                if n in module.r:
                    with torch.no_grad():
                        out[n][key] = module.get_delta_weight(n).detach().numpy().astype(np.float64)
                    ranks[n][key] = int(module.r[n])
    return {"deltas": out, "ranks": ranks, "model": model}


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_peft")
    base = tiny_models.make_tiny_llama(root / "base")
    one = tiny_models.make_peft_adapter(base, root / "one", arch="llama", r=8, alpha=16, init="random", seed=1,
                                        rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 24})
    two = tiny_models.make_peft_adapter(base, root / "two", arch="llama", r=4, alpha=8, init="random", seed=2,
                                        use_rslora=True, targets=["q_proj", "v_proj", "o_proj", "down_proj"])
    three = tiny_models.make_peft_adapter(base, root / "three", arch="llama", r=8, alpha=16, init="random", seed=3)
    four = tiny_models.make_peft_adapter(base, root / "four", arch="llama", r=8, alpha=32, init="random", seed=4)
    return {"root": root, "base": base, "one": one, "two": two, "three": three, "four": four}


def test_merged_adapter_loads_in_peft_and_equals_the_weighted_sum(adapters: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = adapters["root"] / "linear"
    assert main(["merge", str(adapters["one"]), str(adapters["two"]), "--out", str(out), "--weights", "0.6,-0.3",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = _deltas([adapters["one"], adapters["two"]], adapters["base"])["deltas"]
    got = _deltas([out], adapters["base"])
    rows = {r["name"]: r for r in doc["modules"]}
    assert set(got["deltas"]["a0"]) == set(ref["a0"]) | set(ref["a1"]) == set(rows)
    for name, dw in got["deltas"]["a0"].items():
        want = 0.6 * ref["a0"][name] + (-0.3 * ref["a1"][name] if name in ref["a1"] else 0.0)
        assert _rel(dw, want) <= REL_TOL, name
        assert got["ranks"]["a0"][name] == rows[name]["r_after"] == sum(r for r in rows[name]["ranks_before"] if r)
    # modules only the first adapter targets (k_proj, gate/up_proj) are merged with zero from the second
    assert sorted(doc["partial_modules"]) == sorted(n for n in ref["a0"] if n not in ref["a1"])


def test_svd_merge_equals_dense_truncation_of_the_sum(adapters: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = adapters["root"] / "svd"
    assert main(["merge", str(adapters["one"]), str(adapters["three"]), "--out", str(out), "--method", "svd",
                 "--rank", "6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = _deltas([adapters["one"], adapters["three"]], adapters["base"])["deltas"]
    got = _deltas([out], adapters["base"])["deltas"]["a0"]
    for name, dw in got.items():
        full = ref["a0"][name] + ref["a1"][name]
        u, s, vt = np.linalg.svd(full, full_matrices=False)
        assert _rel(dw, (u[:, :6] * s[:6]) @ vt[:6]) <= REL_TOL, name
    assert doc["summary"]["ranks_after"] == [6]


def test_peft_linear_combination_has_cross_terms_ours_does_not(adapters: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT combines A's and B's separately: (Σwᵢ^½Bᵢ)(Σwᵢ^½Aᵢ) ≠ ΣwᵢBᵢAᵢ (huggingface/peft issue 3004)."""
    import torch

    w = (0.6, 0.4)
    pack = _deltas([adapters["three"], adapters["four"]], adapters["base"])  # equal ranks: PEFT's linear needs them
    model = pack["model"]
    model.add_weighted_adapter(["a0", "a1"], list(w), "peft_linear", combination_type="linear")
    from peft.tuners.lora import LoraLayer

    worst_peft = 0.0
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "peft_linear" in module.r:
            key = mod_name.removeprefix("base_model.model.")
            with torch.no_grad():
                dw = module.get_delta_weight("peft_linear").detach().numpy().astype(np.float64)
            want = w[0] * pack["deltas"]["a0"][key] + w[1] * pack["deltas"]["a1"][key]
            worst_peft = max(worst_peft, _rel(dw, want))
    out = adapters["root"] / "ours"
    assert main(["merge", str(adapters["three"]), str(adapters["four"]), "--out", str(out), "--weights",
                 f"{w[0]},{w[1]}", "--json"]) == 0
    capsys.readouterr()
    got = _deltas([out], adapters["base"])["deltas"]["a0"]
    worst_ours = max(_rel(dw, w[0] * pack["deltas"]["a0"][k] + w[1] * pack["deltas"]["a1"][k])
                     for k, dw in got.items())
    assert worst_peft > 0.1, worst_peft      # the cross-term defect: tens of percent off the weighted sum
    assert worst_ours <= REL_TOL, worst_ours


def test_audit_and_compare_read_merge_outputs(adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = adapters["root"] / "for_audit"
    assert main(["merge", str(adapters["one"]), str(adapters["three"]), "--out", str(out), "--method", "ties",
                 "--rank", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main(["audit", "--peft-dir", str(out), "--json", "--no-udr"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["r"] for r in audit["layers"]} == {r["name"]: r["r_after"] for r in doc["modules"]}
    assert main(["compare", str(adapters["one"]), str(out), "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["schema"].startswith("gradience.compare/")
