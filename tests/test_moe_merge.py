"""merge of MoE expert LoRA (PEFT target_parameters) against real PEFT and dense numpy.

Per expert, the merged ΔW_e must equal Σ_i w_i·ΔW_e^(i) (``linear``/``cat``, exact) or its dense best rank-K
approximation (``svd``), every ΔW_e^(i) taken from PEFT's own ``get_delta_weight`` of the inputs; the output
loads in PEFT with one rank per stacked parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main

pytest.importorskip("peft")
from support.moe_models import E, make_moe_adapter, peft_expert_deltas


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moe_merge")
    make_moe_adapter("qwen3_moe", root / "a", seed=0, r=2)
    make_moe_adapter("qwen3_moe", root / "b", seed=1, r=4)
    return root / "a", root / "b"


def _merge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | None, str]:
    rc = main(["merge", *args, "--json"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def _dense_rank_k(dw: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_linear_and_svd_merge_per_expert(inputs: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inputs
    da, _ = peft_expert_deltas(a, "qwen3_moe")
    db, _ = peft_expert_deltas(b, "qwen3_moe")
    want = {name: 0.5 * da[name] + 1.5 * db[name] for name in da}

    rc, doc, err = _merge(capsys, str(a), str(b), "--out", str(tmp_path / "lin"), "--weights", "0.5,1.5")
    assert rc == 0, err
    got, ranks = peft_expert_deltas(tmp_path / "lin", "qwen3_moe")
    assert set(got) == set(want) and set(ranks.values()) == {6}  # exact sum: r_a + r_b per expert
    for name, ref in want.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6)
    assert doc is not None
    rows = [row for row in doc["modules"] if "expert" in row]
    assert len(rows) == len(want) and {row["num_experts"] for row in rows} == {E}

    rc, doc, err = _merge(capsys, str(a), str(b), "--out", str(tmp_path / "svd"), "--weights", "0.5,1.5",
                          "--method", "svd", "--energy", "0.9")
    assert rc == 0, err
    got, ranks = peft_expert_deltas(tmp_path / "svd", "qwen3_moe")
    for param, k in ranks.items():
        per_expert = []
        for e in range(E):
            s2 = np.linalg.svd(want[f"{param}[{e}]"], compute_uv=False) ** 2
            per_expert.append(0 if s2.sum() == 0 else int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9 - 1e-9) + 1))
        assert k == max(per_expert)  # one rank per stack: the largest per-expert energy rank
        for e in range(E):
            ref = _dense_rank_k(want[f"{param}[{e}]"], k)
            np.testing.assert_allclose(got[f"{param}[{e}]"], ref, rtol=1e-5, atol=1e-6)


def _ties_ref(updates: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023, §3) on one dense matrix: keep each input's top-density |entries|, elect the sign
    of the weighted sum, average the agreeing weighted entries."""
    vals = []
    for w, t in zip(weights, updates, strict=True):
        keep = int(density * t.size)
        thr = np.sort(np.abs(t).ravel())[t.size - keep] if keep > 0 else np.inf
        vals.append(w * np.where(np.abs(t) >= thr, t, 0.0))
    stack = np.stack(vals)
    agree = (np.sign(stack) == np.sign(stack.sum(0))) & (stack != 0)
    return np.where(agree, stack, 0.0).sum(0) / np.maximum(agree.sum(0), 1)


def test_ties_per_expert(inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inputs
    da, _ = peft_expert_deltas(a, "qwen3_moe")
    db, _ = peft_expert_deltas(b, "qwen3_moe")
    # --rank 16 = the full rank of every expert matrix (capped per expert at min(out, in)): the exact TIES merge
    rc, _doc, err = _merge(capsys, str(a), str(b), "--out", str(tmp_path / "ties"), "--method", "ties",
                           "--density", "0.3", "--weights", "1,0.5", "--rank", "16")
    assert rc == 0, err
    got, ranks = peft_expert_deltas(tmp_path / "ties", "qwen3_moe")
    assert {p.rpartition(".")[2]: k for p, k in ranks.items()} == {"gate_up_proj": 16, "down_proj": 12}
    for name in da:
        ref = _ties_ref([da[name], db[name]], [1.0, 0.5], 0.3)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(ref).max()))


def test_budget_one_rank_per_stack(inputs: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inputs
    da, _ = peft_expert_deltas(a, "qwen3_moe")
    db, _ = peft_expert_deltas(b, "qwen3_moe")
    rc, doc, err = _merge(capsys, str(a), str(b), "--out", str(tmp_path / "bud"), "--method", "svd",
                          "--budget", "40%")
    assert rc == 0 and doc is not None, err
    assert sum(row["params_after"] for row in doc["modules"]) <= doc["policy"]["budget_params"]
    got, ranks = peft_expert_deltas(tmp_path / "bud", "qwen3_moe")
    for row in doc["modules"]:
        if "expert" in row:
            assert row["r_after"] == ranks[row["parameter"]]
    for name in da:
        param = name.rpartition("[")[0]
        ref = _dense_rank_k(da[name] + db[name], ranks[param])
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(ref).max()))
