"""What a user reads from an MoE expert audit (issue 21): every layer's expert coverage (compact, bounded, never
cut silently), never-adapted experts apart from rank waste; and the audit JSON writer's per-row fast paths give
the document :func:`gradience.jsonio.dumps` gives (a real PEFT Llama adapter, hostile rows, the stable layout)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience import jsonio, stats
from gradience.adapter import load_adapter
from gradience.adapter.pairs import _natural_key, _natural_keys
from gradience.audit.core import AuditOptions, run_audit
from gradience.audit.experts import coverage_lines
from gradience.audit.jsonout import dumps_json
from gradience.audit.render import render_text

E, R, D_IN, D_OUT = 4, 2, 6, 5


def _expert_adapter(out: Path, n_layers: int, never: dict[int, list[int]], plain_zero: bool = False) -> Path:
    """PEFT's saved layout of ``target_parameters=["mlp.experts.down_proj"]`` (a Qwen3-MoE-like (E, out, in)
    parameter): lora_A (r·E, in), expert e's rows e·r..; lora_B (out, r·E), expert e's columns e, e+E, ...
    ``never[layer]``: experts whose B columns are zero (never routed to)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    tensors = {}
    for layer in range(n_layers):
        b = rng.standard_normal((D_OUT, R * E)).astype(np.float32)
        for e in never.get(layer, []):
            b[:, e::E] = 0.0
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((R * E, D_IN)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = b
    if plain_zero:  # an ordinary LoRA pair left at PEFT's init (B = 0)
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.ones((R, D_IN), np.float32)
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((D_OUT, R), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": [],
        "target_parameters": ["mlp.experts.down_proj"]}))
    return out


def _summary(path: Path, **options: Any) -> dict[str, Any]:
    return run_audit(load_adapter(str(path)), AuditOptions(udr=False, **options)).to_summary()


def _coverage_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Experts: "))
    end = lines.index("", start)
    return lines[start + 1:end]


def test_every_layer_has_its_coverage_line(tmp_path: Path) -> None:
    """48 layers whose never-adapted experts differ from one layer to the next: 48 lines, in order, each naming
    its layer's untrained expert (the zeroed B columns), with the count of adapted experts."""
    n = 48
    never = {layer: [layer % E] for layer in range(n) if layer % 3}
    summary = _summary(_expert_adapter(tmp_path, n, never))
    text = render_text(summary, top_wasteful=5)
    block = _coverage_block(text)
    assert block[0].startswith("  Never adapted: 32 expert updates are zero") and "32 of 48 stacked" in block[0]
    cover = block[1:]
    spans = [re.match(r"  layers? (\d+)(?:-(\d+))?: ", line) for line in cover]
    assert all(spans)
    covered = [x for m in spans if m for x in range(int(m[1]), int(m[2] or m[1]) + 1)]
    assert covered == list(range(n))  # every layer once, in order, no "more" line needed
    for layer in range(n):
        line = next(c for c, m in zip(cover, spans, strict=True)
                    if m and int(m[1]) <= layer <= int(m[2] or m[1]))
        if layer in never:
            assert f"down_proj {E - 1}/{E} experts adapted; never adapted: down_proj {layer % E}" in line
        else:
            assert line.endswith(f"down_proj {E}/{E} experts adapted")


def test_same_coverage_shares_a_line_and_a_bound_says_where_the_rest_is(tmp_path: Path) -> None:
    summary = _summary(_expert_adapter(tmp_path, 6, {layer: [1, 3] for layer in range(6)}))
    block = _coverage_block(render_text(summary, top_wasteful=5))
    assert block[1:] == [f"  layers 0-5: down_proj {E - 2}/{E} experts adapted; never adapted: down_proj 1, 3"]
    # a bound on the lines: the rest is counted and pointed to, never cut silently
    params = [{"parameter": f"model.layers.{i}.mlp.experts.down_proj", "layer": i, "num_experts": 8,
               "n_adapted": 8 - i % 2, "never_adapted": [0] if i % 2 else []} for i in range(30)]
    lines = coverage_lines({"parameters": params}, max_lines=10)
    assert len(lines) == 11 and lines[9].startswith("layer 9: down_proj 7/8")
    assert lines[10] == ("... 20 more layers (layers 10-29): every parameter's coverage is in --json, "
                         "experts.parameters")
    # many never-adapted experts: the first few spelled out, the rest counted
    many = [{"parameter": "m.layers.0.mlp.experts.gate_up_proj", "layer": 0, "num_experts": 64, "n_adapted": 44,
             "never_adapted": list(range(20))}]
    assert coverage_lines({"parameters": many}) == [
        "layer 0: gate_up_proj 44/64 experts adapted; never adapted: gate_up_proj 0, 1, 2, 3, 4, 5, 6, 7 +12 more"]


def test_never_adapted_experts_are_not_rank_waste(tmp_path: Path) -> None:
    """'Most wasteful layers' ranks what was trained: the zero experts are listed under Experts instead, in the
    text and in the JSON top_wasteful alike (compared against the rows sorted independently)."""
    summary = _summary(_expert_adapter(tmp_path, 3, {0: [0, 2], 2: [1]}), top_wasteful=4)
    rows = summary["layers"]
    zero = {r["name"] for r in rows if r["delta_frob_norm"] == 0.0}
    assert len(zero) == 3 and all(r["adapted"] is False for r in rows if r["name"] in zero)
    expected = sorted((r for r in rows if r["name"] not in zero), key=lambda r: (r["utilization"], r["name"]))[:4]
    assert [r["name"] for r in summary["top_wasteful"]] == [r["name"] for r in expected]
    text = render_text(summary, top_wasteful=4)
    head = "Most wasteful layers (lowest utilization, top 4; 3 never-adapted experts are under Experts):"
    shown = text.split(head + "\n", 1)[1].splitlines()[:4]
    assert [line.rsplit("  ", 1)[1] for line in shown] == [r["name"] for r in expected]
    assert "util=0.0%" not in text.split(head)[1]


def test_zero_update_issue_tells_experts_apart(tmp_path: Path) -> None:
    summary = _summary(_expert_adapter(tmp_path, 2, {1: [0, 3]}, plain_zero=True))
    zero = next(i for i in summary["issues"] if i["code"] == "zero_update")
    assert zero["modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.experts.down_proj[0]",
                               "model.layers.1.mlp.experts.down_proj[3]"]
    assert "(B or A all zeros, e.g. an adapter saved before training; 2 of them MoE experts, see " \
           "expert_never_adapted)" in zero["message"]


@pytest.mark.slow
def test_real_peft_moe_text(tmp_path: Path) -> None:
    """A Qwen3-MoE adapter saved by PEFT (expert 3 of 4 untrained in both parameters of both layers)."""
    pytest.importorskip("peft")
    from support.moe_models import make_moe_adapter

    make_moe_adapter("qwen3_moe", tmp_path)
    summary = _summary(tmp_path)
    text = render_text(summary, top_wasteful=5)
    block = _coverage_block(text)
    assert block[1:] == [f"  layers 0-1: down_proj {E - 1}/{E}, gate_up_proj {E - 1}/{E} experts adapted; "
                         f"never adapted: experts {E - 1} in each"]
    assert "  Layers:      18  (16 MoE expert rows of 4 stacked parameters)" in text
    issue = next(line for line in text.splitlines() if "] expert_never_adapted: " in line)
    zero = next(line for line in text.splitlines() if "] zero_update: " in line)
    assert "MoE experts never routed to in training, see expert_never_adapted" in zero
    assert "saved before training" not in zero
    assert issue.count("down_proj[3]") == 2 and " [model." not in issue  # named once, no repeated tail
    shown = [line.rsplit("  ", 1)[1] for line in text.split("Most wasteful layers", 1)[1].splitlines()[1:6]]
    adapted = sorted((r for r in summary["layers"] if r.get("adapted") is not False),
                     key=lambda r: (r["utilization"], r["name"]))
    assert shown == [r["name"] for r in adapted[:5]] and not any(name.endswith("[3]") for name in shown)


# -- the JSON writer ----------------------------------------------------------------------------------------
def _reference(doc: Any) -> Any:
    return json.loads(jsonio.dumps(doc, pretty=True))


def test_json_writer_equals_the_reference_on_real_peft(llama_adapter_dir: Path) -> None:
    summary = run_audit(load_adapter(str(llama_adapter_dir)),
                        AuditOptions(udr=False, top_wasteful=3, suggest_per_layer=True)).to_summary()
    text = dumps_json(summary)
    assert json.loads(text) == _reference(summary)
    lines = text.splitlines()
    first = lines.index('  "layers": [') + 1
    rows = [json.loads(line.strip().rstrip(",")) for line in lines[first:first + len(summary["layers"])]]
    assert rows == _reference(summary["layers"])  # one row per line, in order
    # the non-row part is laid out exactly as json.dumps(indent=2) lays it out
    no_rows = {k: v for k, v in summary.items() if k not in ("layers", "top_wasteful")}
    assert dumps_json(no_rows) == json.dumps(jsonio.to_jsonable(no_rows), indent=2, ensure_ascii=False)
    multi = {"schema": "gradience.audit.multi/v1", "adapters": {"a": summary, "b": no_rows}}
    assert json.loads(dumps_json(multi)) == _reference(multi)


_HOSTILE: dict[str, Any] = {
    # names holding the writer's row separator (escaped inside a string, so rows are still split by one call)
    "names": lambda s: s["layers"][0].update(name='x}, {"name": "y') or s["layers"][1].update(
        name='\u00fc "q" \\ }, {"name": \u2028'),
    # a nested list of dicts writes the separator outside strings: the row split must not be trusted
    "nested": lambda s: s["layers"][4].update(sub=[{"name": 1}, {"name": 2}]),
    "nan_row": lambda s: s["layers"][2].update(utilization=math.nan),
    "numpy_row": lambda s: s["layers"][3].update(stable_rank=np.float64(1.5)),
    "flat_values": lambda s: s["composition"]["energy_share"].update({"z": math.inf, "w": np.float32(0.25)}),
    "flat_key": lambda s: s["composition"]["energy_share"].update({7: 0.5}),
    "flat_lists": lambda s: s.update(flat=[np.int64(3), *range(20)], names=["a\u2028b", "\u00e9", *"0123456789" * 2],
                                     nans=[math.nan] * 20, infs={f"k{i}": -math.inf for i in range(20)},
                                     mixed=[None, True, False, 1, 2.5, "s", *range(20)]),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_json_writer_hostile_rows_and_containers(llama_adapter_dir: Path, case: str) -> None:
    """Every value the fast paths must write exactly, or hand back to the general path: the same document as
    the reference writer."""
    summary = run_audit(load_adapter(str(llama_adapter_dir)), AuditOptions(udr=False)).to_summary()
    _HOSTILE[case](summary)
    assert json.loads(dumps_json(summary)) == _reference(summary)


def test_row_keys_keep_their_order_whatever_the_udr_dict(llama_adapter_dir: Path) -> None:
    from gradience.audit.layers import UDR_ROW_KEYS

    result = run_audit(load_adapter(str(llama_adapter_dir)), AuditOptions(udr=False))
    layer = result.layers[0]
    plain = list(layer.to_row())
    layer.udr = {key: 1.0 for key in reversed(UDR_ROW_KEYS)}
    row = layer.to_row()
    assert list(row) == plain and all(row[key] == 1.0 for key in UDR_ROW_KEYS)
    layer.udr = {"udr": 2.0}
    row = layer.to_row()
    assert list(row) == plain and row["udr"] == 2.0 and row["sdi"] is None


def test_pair_order_and_stats_shortcuts_agree_with_the_plain_code() -> None:
    names = [f"model.layers.{i}.mlp.experts.{leaf}[{e}]" for i in (10, 2, 1) for leaf in ("w2", "gate_up_proj")
             for e in (11, 2, 0, 100)]
    names += ["model.layers.3.q_proj", "[5]", "7[5]", "a[]", "b[1]]", "v[0012]", "w[\u0663]", "x2[3]", ""]
    assert _natural_keys(names) == [_natural_key(n) for n in names]
    values = [3, None, 2.5, math.nan, True, -math.inf, 1e308, 7]
    finite = [3.0, 2.5, 1.0, 1e308, 7.0]
    assert stats.mean(values) == sum(finite) / 5
    assert stats.percentile(values, 90.0) == pytest.approx(float(np.percentile(finite, 90.0)), rel=1e-15)
    assert stats.median([None, math.nan]) is None
