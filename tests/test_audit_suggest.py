"""Rank suggestions, --fail-on evaluation and text helpers on hand-built audits (fast, no subprocess)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gradience.adapter.model import LoadedAdapter, LoraPair, NonLoraTensors
from gradience.audit import AuditOptions, run_audit
from gradience.audit.gates import evaluate_gates
from gradience.audit.render import render_text, wasteful_line
from gradience.audit.suggest import parse_allowed_ranks, round_up_rank, unique_pattern_key
from gradience.errors import InputError
from gradience.gates import parse_gates
from gradience.textfmt import human_count


def pair_with_spectrum(name: str, sigma: list[float], *, r: int, d_in: int = 32, d_out: int = 24,
                       scale: float = 2.0) -> LoraPair:
    """A pair whose B·A has exactly the singular values ``sigma`` (padded with zeros to r)."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, r)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, r)))
    s = np.zeros(r)
    s[: len(sigma)] = sigma
    a = (np.diag(s) @ v.T).astype(np.float64)
    b = u.astype(np.float64)
    return LoraPair(name=name, peft_prefix="base_model.model." + name, kind="linear", dora=False, r=r,
                    alpha=scale * r, scale=scale, a_key="", b_key="", a_shape=a.shape, b_shape=b.shape,
                    d_in=d_in, d_out=d_out, loader=lambda: (a, b))


def adapter(pairs: list[LoraPair], **config: object) -> LoadedAdapter:
    return LoadedAdapter(None, None, None, dict(config), pairs, NonLoraTensors(), [])


def test_round_up_rank_and_allowed_ranks_parsing() -> None:
    allowed = (1, 2, 4, 8, 16)
    assert round_up_rank(2.5, allowed, 16) == 4
    assert round_up_rank(4, allowed, 16) == 4
    assert round_up_rank(0, allowed, 16) == 1
    assert round_up_rank(9, allowed, 12) == 12          # never above the adapter's r
    assert round_up_rank(40, allowed, 64) == 16         # beyond the largest allowed: the largest
    assert parse_allowed_ranks("8, 2,4,2") == (2, 4, 8)
    for bad in ("", "0,2", "a,b"):
        with pytest.raises(InputError):
            parse_allowed_ranks(bad)


def test_global_suggestions_from_hand_spectra() -> None:
    # k90 per layer: σ²-energy of (1) -> 1; (1,1) -> 2; (1,1,1,1,1) -> 5; (3,1) -> 1 (exactly 90%)
    pairs = [
        pair_with_spectrum("model.layers.0.self_attn.q_proj", [1.0], r=8),
        pair_with_spectrum("model.layers.0.self_attn.v_proj", [1.0, 1.0], r=8),
        pair_with_spectrum("model.layers.1.self_attn.q_proj", [1.0] * 5, r=8),
        pair_with_spectrum("model.layers.1.self_attn.v_proj", [3.0, 1.0], r=8),
    ]
    result = run_audit(adapter(pairs, r=8, lora_alpha=16))
    assert [la.energy_rank_90 for la in result.layers] == [1, 2, 5, 1]
    summary = result.to_summary()
    # p50 of (1,2,5,1) = 1.5 -> 2; p90 = 4.1 -> 8
    assert summary["energy_rank_90_p50"] == pytest.approx(1.5)
    assert summary["suggested_r_global_median"] == 2
    assert summary["suggested_r_global_90"] == 8
    g = summary["global_rank_suggestions"]["median"]
    assert g["params_at_suggested"] == 4 * 2 * (32 + 24)
    assert g["reduction_ratio"] == pytest.approx(1 - 2 / 8)
    # stable ranks by hand: 1, 2, 5, 10/9
    assert [la.stable_rank for la in result.layers] == pytest.approx([1, 2, 5, 10 / 9])
    # effective rank of (3,1): p=(.75,.25)
    p = np.array([0.75, 0.25])
    assert result.layers[3].effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_suggestion_never_below_one_when_most_layers_are_zero() -> None:
    pairs = [pair_with_spectrum(f"model.layers.{i}.mlp.up_proj", [0.0], r=4) for i in range(5)]
    pairs.append(pair_with_spectrum("model.layers.9.mlp.up_proj", [1.0, 0.5], r=4))
    summary = run_audit(adapter(pairs, r=4)).to_summary()
    assert summary["energy_rank_90_p50"] == 0
    assert summary["suggested_r_global_median"] == 1
    assert summary["n_layers_zero_update"] == 5


def test_per_layer_patterns_with_rslora_and_mixed_scales() -> None:
    pairs = [
        pair_with_spectrum("model.layers.0.self_attn.q_proj", [1.0], r=8, scale=16 / np.sqrt(8)),
        pair_with_spectrum("model.layers.1.self_attn.q_proj", [1.0], r=8, scale=16 / np.sqrt(8)),
        pair_with_spectrum("model.layers.11.self_attn.q_proj", [1.0] * 6, r=8, scale=16 / np.sqrt(8)),
        pair_with_spectrum("model.layers.1.self_attn.v_proj", [1.0, 1.0], r=8, scale=4 / np.sqrt(8)),
    ]
    opts = AuditOptions(suggest_per_layer=True, allowed_ranks=(1, 2, 4, 8))
    rs = run_audit(adapter(pairs, r=8, lora_alpha=16, use_rslora=True), opts).to_summary()["rank_suggestions"]
    assert [row["suggested_r"] for row in rs["layers"]] == [1, 1, 8, 2]
    assert rs["default_r"] == 1 and rs["use_rslora"] is True
    # PEFT semantics by hand: first matching key wins, otherwise the defaults
    for pair, row in zip(pairs, rs["layers"], strict=True):
        r = next((v for k, v in rs["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", pair.name)),
                 rs["default_r"])
        alpha = next((v for k, v in rs["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", pair.name)),
                     rs["lora_alpha"])
        assert r == row["suggested_r"]
        assert alpha / np.sqrt(r) == pytest.approx(pair.scale, rel=1e-12)
    assert set(rs["rank_pattern"]) == {"model.layers.11.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_pattern_keys_are_unambiguous_for_nested_names() -> None:
    names = ["model.layers.1.self_attn.q_proj", "encoder.model.layers.1.self_attn.q_proj",
             "model.layers.11.self_attn.q_proj"]
    for name in names:
        key = unique_pattern_key(name, names)
        assert [n for n in names if re.match(rf"(.*\.)?({key})$", n)] == [name]
    assert unique_pattern_key(names[2], names) == names[2]  # readable when already unique


def _gate_summary() -> dict:
    pairs = [pair_with_spectrum("model.layers.0.self_attn.q_proj", [1.0], r=8),
             pair_with_spectrum("model.layers.0.mlp.up_proj", [1.0] * 4, r=8),
             pair_with_spectrum("model.layers.1.mlp.up_proj", [0.0], r=8)]
    return run_audit(adapter(pairs, r=8)).to_summary()


def test_gate_semantics() -> None:
    summary = _gate_summary()
    # per-layer: any layer; zero-update layers have utilization 0 and count
    assert len(evaluate_gates(parse_gates("utilization<0.2"), summary)) == 1
    assert "met by 2 of 3" in evaluate_gates(parse_gates("utilization<0.2"), summary)[0]
    assert evaluate_gates(parse_gates("utilization>0.9"), summary) == []
    # summary key: the summary value only; util mean = (1/8 + 4/8 + 0)/3
    assert evaluate_gates(parse_gates("utilization_mean<0.21"), summary)
    assert not evaluate_gates(parse_gates("utilization_mean<0.2"), summary)
    # a rule on a metric that was not computed never passes silently (no base model: udr is null everywhere)
    for rule in ("udr>0", "udr_median>0"):
        with pytest.raises(InputError, match=rf"rule '{rule}' cannot be evaluated.*no base model"):
            evaluate_gates(parse_gates(rule), summary)
    assert evaluate_gates(parse_gates("zero_update"), summary)
    assert evaluate_gates(parse_gates("issues"), summary)        # zero_update is a warning
    assert not evaluate_gates(parse_gates("non_finite,error"), summary)
    with pytest.raises(InputError, match="unknown metric"):
        evaluate_gates(parse_gates("utilisation<1"), summary)
    with pytest.raises(InputError, match="unknown flag"):
        evaluate_gates(parse_gates("nonsense"), summary)


def test_text_helpers() -> None:
    assert human_count(294912) == "294.9K"
    assert human_count(999) == "999"
    assert human_count(1_500_000) == "1.5M"
    row = {"module_type": "attn", "r": 8, "utilization": 0.127, "stable_rank": 1.02, "energy_rank_90": 1,
           "name": "model.layers.5.self_attn.q_proj"}
    assert wasteful_line(1, row) == "  01. attn r=8   util=12.7%  sr=1.02  k@90%=1  model.layers.5.self_attn.q_proj"
    text = render_text(_gate_summary(), top_wasteful=2)
    assert "Most wasteful layers (lowest utilization, top 2):" in text
    assert "[warning] zero_update:" in text
