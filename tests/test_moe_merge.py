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


@pytest.mark.slow
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


def test_unsupported_methods_are_one_line(inputs: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inputs
    for flags in (["--method", "ties"], ["--method", "dare"], ["--budget", "50%"]):
        rc, _doc, err = _merge(capsys, str(a), str(b), "--out", str(tmp_path / "x"), *flags)
        assert rc == 2 and err.count("\n") == 1 and "expert" in err and "Traceback" not in err
