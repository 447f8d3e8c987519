"""PEFT's stacked expert layout as compress and merge write it (the batched fast paths of issue 21 item 5).

Reference: PEFT 0.21 ``ParamWrapper.get_delta_weight`` reads expert e's A as rows e·k..e·k+k-1 of lora_A and its
B as ``lora_B.reshape(out, k, E)[:, :, e]``; the checks below index the written arrays that way, by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradience.compress.experts import join_stack, split_stack
from gradience.compress.factors import batched_gram_truncation


@pytest.mark.parametrize("experts", [1, 16, 37])
def test_join_stack_is_peft_layout(experts: int) -> None:
    rng = np.random.default_rng(experts)
    k, d_in, d_out = 3, 5, 7
    parts = [(rng.standard_normal((k, d_in)), rng.standard_normal((d_out, k)).astype(np.float32))
             for _ in range(experts)]
    a, b = join_stack(parts, k)
    assert a.shape == (experts * k, d_in) and b.shape == (d_out, k * experts)
    for e, (a_e, b_e) in enumerate(parts):
        assert np.array_equal(a[e * k:(e + 1) * k], a_e)
        for j in range(k):  # B column j·E + e is expert e's rank-j column
            assert np.array_equal(b[:, j * experts + e], b_e[:, j].astype(np.float64))
    back = split_stack(a, b, experts, k)
    assert all(np.array_equal(x, y) and np.array_equal(u, v) for (x, u), (y, v) in zip(back, parts, strict=True))


def test_batched_truncation_b_is_the_stacked_layout_and_matches_each_expert() -> None:
    """B' comes back as a view of an (out, k, E) array (written straight into PEFT's layout, no join), and each
    expert's B'·A' is the dense per-expert product truncated to k (Eckart–Young), chunk boundaries included."""
    rng = np.random.default_rng(5)
    experts, r, d_in, d_out, k = 21, 4, 2000, 40, 2  # 16 experts per float64 chunk: a full one, a ragged one
    a3 = rng.standard_normal((experts, r, d_in)).astype(np.float32)
    b3 = rng.standard_normal((d_out, r, experts)).astype(np.float32)
    a_new, b_new, ok = batched_gram_truncation(a3, b3, k, 0.5)
    stacked = b_new.transpose(1, 2, 0)
    assert stacked.shape == (d_out, k, experts) and stacked.flags.c_contiguous
    assert ok.all()
    for e in range(experts):
        dense = b3[:, :, e].astype(np.float64) @ a3[e].astype(np.float64)
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        ref = 0.5 * (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(b_new[e] @ a_new[e], ref, rtol=1e-9, atol=1e-9 * s[0])
