"""``audit --suggest-per-layer`` in text and ``--emit-config``: the written LoraConfig fragment, given to real
PEFT (``LoraConfig(**fragment)`` + ``get_peft_model`` on a tiny Llama), gives every module its suggested rank
and keeps its scale; plus composition by block, the --help examples and the text warts of issue 9."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from gradience.cli.main import build_parser, main
from support import synthetic

# tiny Llama shapes (hidden 32, intermediate 64, 2 KV heads: k/v_proj 32 -> 16), see tests/support/tiny_models
TARGETS = synthetic.llama_targets(32, 64, kv_out=16)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def steep_adapter(path: Path, *, use_rslora: bool = False) -> Path:
    """Spectra that differ per module, so the suggestion is a real mix of ranks (and alphas)."""
    return synthetic.write_synthetic_adapter(path, layers=2, targets=TARGETS, r=8, alpha=16, spectrum="steep",
                                             use_rslora=use_rslora)


def peft_modules(tiny_llama_dir: Path, fragment: dict) -> dict[str, tuple[int, float]]:
    """{module name: (r, scaling)} of every LoRA layer PEFT builds from the fragment."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    peft_model = get_peft_model(model, LoraConfig(**fragment))
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            out[name.removeprefix("base_model.model.")] = (int(module.r["default"]), float(module.scaling["default"]))
    return out


@pytest.mark.parametrize(("ext", "use_rslora"), [(".json", False), (".yaml", False), (".yml", True)])
def test_emitted_config_retrains_with_the_suggestion(tiny_llama_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], ext: str,
                                                     use_rslora: bool) -> None:
    adapter = steep_adapter(tmp_path / "adapter", use_rslora=use_rslora)
    out_file = tmp_path / f"lora{ext}"
    rc, out, err = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--json", "--emit-config",
                       str(out_file))
    assert rc == 0 and "wrote LoraConfig fragment" in err
    summary = json.loads(out)
    text = out_file.read_text()
    fragment = json.loads(text) if ext == ".json" else yaml.safe_load(text)
    assert set(fragment) == {"r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern"}
    assert fragment["use_rslora"] is use_rslora and sorted(fragment["target_modules"]) == sorted(TARGETS)

    suggested = {row["name"]: row["suggested_r"] for row in summary["rank_suggestions"]["layers"]}
    scales = {row["name"]: row["scale"] for row in summary["layers"]}
    assert len(set(suggested.values())) > 1  # a real mix, or the patterns would be trivially empty
    built = peft_modules(tiny_llama_dir, fragment)
    assert set(built) == set(suggested)
    for name, (r, scaling) in built.items():
        assert r == suggested[name], name
        assert scaling == pytest.approx(scales[name], rel=1e-12), name  # alpha_pattern keeps s = alpha/r
        # and the scale matches the definition independently: alpha/r (alpha/sqrt(r) with rsLoRA)
        assert scales[name] == pytest.approx(16 / (math.sqrt(8) if use_rslora else 8), rel=1e-12)


def test_suggestion_is_printed_in_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = steep_adapter(tmp_path / "adapter")
    rc, out, _ = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--suggest-per-layer")
    assert rc == 0
    rc, js, _ = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--suggest-per-layer", "--json")
    rs = json.loads(js)["rank_suggestions"]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("rank_pattern = "))
    assert json.loads(line.split("=", 1)[1]) == rs["rank_pattern"]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("alpha_pattern = "))
    assert json.loads(line.split("=", 1)[1]) == rs["alpha_pattern"]
    assert f"LoraConfig: r={rs['default_r']}, lora_alpha={rs['lora_alpha']}" in out


@pytest.mark.parametrize(("name", "needle"), [("cfg.txt", "must end in .json, .yaml or .yml"),
                                              ("missing/dir/cfg.json", "does not exist")])
def test_emit_config_bad_paths_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                          needle: str) -> None:
    adapter = steep_adapter(tmp_path / "adapter")
    rc, out, err = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--emit-config", str(tmp_path / name))
    assert rc == 2 and out == "" and needle in err and err.count("\n") == 1


def test_composition_by_block_against_hand_sums(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = synthetic.write_synthetic_adapter(tmp_path / "a", layers=3, targets=TARGETS, r=4, alpha=8)
    rc, out, _ = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr", "--json")
    doc = json.loads(out)
    energy: dict[int, float] = {}
    for row in doc["layers"]:
        energy[row["layer"]] = energy.get(row["layer"], 0.0) + row["delta_frob_norm"] ** 2
    total = sum(energy.values())
    blocks = doc["composition"]["by_block"]
    assert blocks["n_blocks"] == 3 and set(blocks["energy_share"]) == {"0", "1", "2"}
    for block, e in energy.items():
        assert blocks["energy_share"][str(block)] == pytest.approx(e / total, rel=1e-12)
    shares = sorted((e / total for e in energy.values()), reverse=True)
    assert [b["share"] for b in blocks["top5"]] == pytest.approx(shares)
    assert blocks["hhi"] == pytest.approx(sum(x * x for x in shares), rel=1e-12)
    assert sum(blocks["energy_share"].values()) == pytest.approx(1.0)
    assert rc == 0
    rc, text, _ = cli(capsys, "audit", "--peft-dir", str(adapter), "--no-udr")
    assert rc == 0
    top = blocks["top5"][0]
    assert f"Update energy by block (top 3 of 3): {top['block']}: {top['share'] * 100:.1f}%" in text


def test_by_block_groups_modules_without_an_index() -> None:
    from gradience.audit.composition import composition

    class Row:
        def __init__(self, name: str, layer: int | None, dfn: float) -> None:
            self.name, self.layer, self.delta_frob_norm = name, layer, dfn

    rows = [Row("model.embed_tokens", None, 3.0), Row("lm_head", None, 1.0), Row("model.layers.0.q", 0, 2.0),
            Row("model.layers.7.q", 7, 2.0), Row("bad", 7, None)]  # type: ignore[arg-type]
    blocks = composition(rows)["by_block"]  # type: ignore[arg-type]
    assert blocks["energy_share"] == pytest.approx({"0": 4 / 18, "7": 4 / 18, "none": 10 / 18})
    assert list(blocks["energy_share"]) == ["0", "7", "none"]
    assert blocks["top5"][0] == {"block": None, "share": pytest.approx(10 / 18)}
    assert blocks["hhi"] == pytest.approx((4 / 18) ** 2 * 2 + (10 / 18) ** 2)
    assert composition([])["by_block"]["top5"] == []


def test_text_warts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.audit.render import render_text

    zero = synthetic.write_synthetic_adapter(tmp_path / "zero", layers=1, targets={"q_proj": (16, 16)}, r=4,
                                             alpha=8, zero_b=True)
    rc, out, _ = cli(capsys, "audit", "--peft-dir", str(zero), "--no-udr", "--layers")
    assert rc == 0 and "1 of 1 LoRA pair has a zero update" in out and "|s|σ1" not in out and "sigma1(dW)=0" in out
    _, js, _ = cli(capsys, "audit", "--peft-dir", str(zero), "--no-udr", "--json")
    summary = json.loads(js)
    # a zero update measured against a base: UDR 0, SDI at the ε guard (-12) is shown as '-', not -12.00
    summary.update(udr_requested=True, n_layers_with_udr=1, udr_median=0.0, udr_p90=0.0, udr_max=0.0,
                   fraction_udr_gt_0_1=0.0, fraction_udr_gt_0_3=0.0, sdi_median=-12.0)
    summary["layers"][0]["udr"] = 0.0
    text = render_text(summary, top_wasteful=5)
    assert "SDI (log10 UDR) median: -" in text and "-12.00" not in text
    assert "Top 1 module by UDR:" in text


@pytest.mark.parametrize("command", ["check", "monitor", "audit", "demo"])
def test_every_command_help_has_working_examples(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    help_text = sub.choices[command].format_help()  # type: ignore[attr-defined]
    examples = [ln.strip() for ln in help_text.split("examples:", 1)[1].splitlines() if ln.strip()]
    assert 2 <= len(examples) <= 6  # short: monitor shows one line per log format it reads
    for line in examples:
        argv = shlex.split(line, comments=True)  # "# TensorBoard" notes are shell comments
        assert argv[:2] == ["gradience", command]
        args = parser.parse_args(argv[1:])  # every example is a valid command line
        assert args.command == command
