"""`gradience compare A B`: JSON contract (SPEC §13), text layout, audit-JSON inputs, matching, gates, bad input.

Numpy-only fixtures (synthetic PEFT-layout adapters and a numpy-written base checkpoint), so these run fast;
real PEFT adapters are in ``test_compare_peft.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from support import synthetic

TARGETS = synthetic.llama_targets(32, 48)
LAYERS = 3
TOP_KEYS = {"schema", "a", "b", "summary", "modules", "issues"}
SIDE_BLOCK_KEYS = {"path", "base_model_name_or_path", "r", "alpha", "targets"}
MODULE_SIDE_KEYS = {"r", "scale", "utilization", "stable_rank", "energy_rank_90", "delta_sigma_max",
                    "delta_frob_norm", "udr"}
SUMMARY_KEYS = {"n_matched", "only_in_a", "only_in_b", "cos_mean", "cos_median", "overlap_left_mean",
                "overlap_right_mean", "a", "b", "biggest_udr_differences", "udr_median_delta"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare_cli")
    base = root / "base"
    base.mkdir()
    rng = np.random.default_rng(0)
    weights = {}
    for name in synthetic.synthetic_pair_keys(LAYERS, TARGETS):
        d_out, d_in = TARGETS[name.rsplit(".", 1)[1]]
        weights[name + ".weight"] = (rng.standard_normal((d_out, d_in)) * 0.05).astype(np.float32)
    synthetic.write_safetensors(base / "model.safetensors", weights)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cons = synthetic.write_synthetic_adapter(root / "runs/conservative/adapter", layers=LAYERS, targets=TARGETS,
                                             r=4, alpha=8, seed=1, base_model_name_or_path=str(base))
    aggr = synthetic.write_synthetic_adapter(root / "runs/aggressive/adapter", layers=LAYERS, targets=TARGETS,
                                             r=16, alpha=64, seed=2, base_model_name_or_path=str(base))
    return {"root": root, "base": base, "cons": cons, "aggr": aggr}


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["compare", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def compare_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc, out, err = run([*args, "--json"], capsys)
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def audit_json(adapter: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Path:
    rc = main(["audit", "--peft-dir", str(adapter), "--json", *extra])
    text, err = capsys.readouterr()
    assert rc == 0, err
    out.write_text(text)
    return out


def test_json_contract_and_udr_both_sides(world: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "norms.json"
    doc = compare_json([str(world["cons"]), str(world["aggr"]), "--base-model", str(world["base"]),
                        "--base-norms-cache", str(cache)], capsys)
    assert doc["schema"] == "gradience.compare/v1"
    assert set(doc) >= TOP_KEYS
    for side, r, alpha in (("a", 4, 8.0), ("b", 16, 64.0)):
        assert set(doc[side]) >= SIDE_BLOCK_KEYS
        assert doc[side]["r"] == r and doc[side]["alpha"] == alpha
        assert doc[side]["base_model_name_or_path"] == str(world["base"])
        assert sorted(doc[side]["targets"]) == sorted(TARGETS)
    assert doc["a"]["label"] == "conservative" and doc["b"]["label"] == "aggressive"
    s = doc["summary"]
    assert set(s) >= SUMMARY_KEYS
    assert s["n_matched"] == LAYERS * len(TARGETS) and s["only_in_a"] == [] and s["only_in_b"] == []
    for m in doc["modules"]:
        assert set(m["a"]) >= MODULE_SIDE_KEYS and set(m["b"]) >= MODULE_SIDE_KEYS
        assert set(m["delta"]) == MODULE_SIDE_KEYS
        for key in MODULE_SIDE_KEYS:
            assert m["delta"][key] == pytest.approx(m["b"][key] - m["a"][key])
        assert {"cos", "overlap_left", "overlap_right", "k"} <= set(m)
        assert -1.0 <= m["cos"] <= 1.0 and 0.0 <= m["overlap_left"] <= 1.0
    # modules sorted by |Δudr|, largest first (the seed's "Biggest UDR differences", not name order)
    deltas = [abs(m["delta"]["udr"]) for m in doc["modules"]]
    assert deltas == sorted(deltas, reverse=True)
    big = s["biggest_udr_differences"]
    assert [b["name"] for b in big] == [m["name"] for m in doc["modules"][:10]]
    # each side's summary equals its own audit's (the seed's per-audit numbers)
    for side, adapter in (("a", world["cons"]), ("b", world["aggr"])):
        audit = json.loads(audit_json(adapter, tmp_path / f"{side}.json", capsys, "--base-model", str(world["base"]),
                                      "--base-norms-cache", str(cache)).read_text())
        for key in ("udr_median", "fraction_udr_gt_0_3", "utilization_mean"):
            assert s[side][key] == pytest.approx(audit[key])
        rows = {row["name"]: row for row in audit["layers"]}
        for m in doc["modules"]:
            assert m[side]["udr"] == pytest.approx(rows[m["name"]]["udr"])
    assert s["udr_median_delta"] == pytest.approx(s["b"]["udr_median"] - s["a"]["udr_median"])
    assert s["cos_mean"] == pytest.approx(np.mean([m["cos"] for m in doc["modules"]]))
    assert s["cos_median"] == pytest.approx(np.median([m["cos"] for m in doc["modules"]]))


def test_base_is_read_once_second_side_hits_the_cache(world: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = compare_json([str(world["cons"]), str(world["aggr"]), "--base-model", str(world["base"]),
                        "--base-norms-cache", str(tmp_path / "fresh.json")], capsys)
    n = LAYERS * len(TARGETS)
    assert doc["udr"]["a"]["tensors_read"] == n and doc["udr"]["a"]["cache_hits"] == 0
    assert doc["udr"]["b"]["tensors_read"] == 0 and doc["udr"]["b"]["cache_hits"] == n


def test_text_layout_summary_and_table_sorted_by_udr_difference(world: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(world["cons"]), str(world["aggr"]), "--base-model", str(world["base"]), "--base-norms-cache",
            str(tmp_path / "n.json"), "--top", "4"]
    doc = compare_json(args, capsys)
    rc, out, _ = run(args, capsys)
    assert rc == 0
    assert out.startswith("=" * 72 + "\nGRADIENCE LoRA COMPARE\n")
    s = doc["summary"]
    assert f"Conservative UDR median: {s['a']['udr_median']:.3f}" in out
    assert f"Aggressive UDR median:   {s['b']['udr_median']:.3f}" in out
    assert re.search(r"Conservative layers > 0\.3 UDR: +\d+\.\d%", out)
    assert "=== UDR Comparison ===" in out
    table = out.split("Biggest UDR differences (by |ΔUDR|), top 4 of 21:\n", 1)[1].splitlines()
    rows = table[1:5]
    assert [row.split()[-1] for row in rows] == [m["name"] for m in doc["modules"][:4]]
    assert rows[0].split()[0] == f"{doc['modules'][0]['delta']['udr']:+.3f}"


def test_sort_and_top(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(world["cons"]), str(world["aggr"])
    by_name = compare_json([a, b, "--sort", "name"], capsys)["modules"]
    assert [m["name"] for m in by_name] == sorted(m["name"] for m in by_name)
    by_cos = compare_json([a, b, "--sort", "cos"], capsys)["modules"]
    assert [m["cos"] for m in by_cos] == sorted(m["cos"] for m in by_cos)
    by_overlap = compare_json([a, b, "--sort", "overlap"], capsys)["modules"]
    means = [m["overlap_left"] + m["overlap_right"] for m in by_overlap]
    assert means == sorted(means)
    # the adapters name a base that resolves locally: UDR from it, sorted by |ΔUDR| by default (as audit does)
    assert compare_json([a, b], capsys)["options"]["sort"] == "udr"
    # no base at all: the default sort falls back to cos, and UDR is said to be unavailable
    na = synthetic.write_synthetic_adapter(tmp_path / "x", layers=1, targets=TARGETS, r=4, alpha=8, seed=1)
    nb = synthetic.write_synthetic_adapter(tmp_path / "y", layers=1, targets=TARGETS, r=8, alpha=8, seed=2)
    doc = compare_json([str(na), str(nb)], capsys)
    assert doc["options"]["sort"] == "cos" and "--base-model" in doc["summary"]["unavailable"]["udr"]
    rc, out, _ = run([str(na), str(nb), "--top", "2"], capsys)
    assert rc == 0 and "Least aligned updates (lowest cos first), top 2 of 7:" in out
    assert "UDR not computed" in out and "ΔUDR" not in out
    rc, out, _ = run([str(na), str(nb), "--sort", "udr"], capsys)
    assert rc == 0 and "Modules (by name)" in out and "sort_key_unavailable" in out


def test_audit_json_inputs_give_metric_deltas_only(world: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "n.json")
    ja = audit_json(world["cons"], tmp_path / "conservative_audit.json", capsys, "--base-model", str(world["base"]),
                    "--base-norms-cache", cache)
    jb = audit_json(world["aggr"], tmp_path / "aggressive_audit.json", capsys, "--base-model", str(world["base"]),
                    "--base-norms-cache", cache)
    full = compare_json([str(world["cons"]), str(world["aggr"]), "--base-model", str(world["base"]),
                         "--base-norms-cache", cache], capsys)
    for pair in ((ja, jb), (world["cons"], jb)):
        doc = compare_json([str(pair[0]), str(pair[1])], capsys)
        assert doc["a"]["kind"] == ("audit_json" if pair[0] == ja else "adapter") and doc["b"]["kind"] == "audit_json"
        assert all(m["cos"] is None and m["overlap_left"] is None for m in doc["modules"])
        assert set(doc["summary"]["unavailable"]) >= {"cos", "overlap_left", "overlap_right"}
        assert "audit JSON" in doc["summary"]["unavailable"]["cos"]
        assert any(i["code"] == "measures_unavailable" for i in doc["issues"])
        ref = {m["name"]: m for m in full["modules"]}
        for m in doc["modules"]:
            assert m["delta"]["udr"] == pytest.approx(ref[m["name"]]["delta"]["udr"])
            assert m["delta"]["utilization"] == pytest.approx(ref[m["name"]]["delta"]["utilization"])
        assert [m["name"] for m in doc["modules"]] == [m["name"] for m in full["modules"]]
    assert doc["a"]["label"] == "conservative"
    rc, out, _ = run([str(ja), str(jb)], capsys)
    assert rc == 0
    assert "Update cosine / subspace overlaps: not computed" in out
    assert "cos, overlap_left, overlap_right: A (" in out and "audit JSON" in out
    assert "Conservative_audit UDR median:" in out


def test_audit_json_side_gets_udr_from_base_model(world: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An audit JSON made without a base gets its UDR recomputed from the rows' norms with --base-model."""
    plain = audit_json(world["aggr"], tmp_path / "aggr_nobase.json", capsys, "--no-udr")
    assert json.loads(plain.read_text())["udr_median"] is None
    cache = str(tmp_path / "n.json")
    doc = compare_json([str(world["cons"]), str(plain), "--base-model", str(world["base"]), "--base-norms-cache",
                        cache], capsys)
    full = compare_json([str(world["cons"]), str(world["aggr"]), "--base-model", str(world["base"]),
                         "--base-norms-cache", cache], capsys)
    assert doc["summary"]["b"]["udr_median"] == pytest.approx(full["summary"]["b"]["udr_median"])
    assert doc["udr"]["b"]["tensors_read"] == 0  # the base norms came from the shared cache


def test_matching_across_task_head_prefix_and_unmatched_modules(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    targets_a = {"q_lin": (16, 16), "v_lin": (16, 16), "lin1": (32, 16)}
    targets_b = {"q_lin": (16, 16), "lin1": (32, 16), "lin2": (16, 32)}
    a = synthetic.write_synthetic_adapter(tmp_path / "seqcls", layers=2, targets=targets_a, r=4, alpha=8,
                                          prefix="base_model.model.distilbert.transformer.layer.{i}.attention",
                                          mlp_prefix="base_model.model.distilbert.transformer.layer.{i}.ffn",
                                          base_model_name_or_path="org/distilbert-seqcls")
    b = synthetic.write_synthetic_adapter(tmp_path / "bare", layers=2, targets=targets_b, r=4, alpha=8,
                                          prefix="base_model.model.transformer.layer.{i}.attention",
                                          mlp_prefix="base_model.model.transformer.layer.{i}.ffn",
                                          base_model_name_or_path="org/distilbert")
    doc = compare_json([str(a), str(b)], capsys)
    s = doc["summary"]
    assert s["n_matched"] == 4
    matched = {m["name"]: m["name_b"] for m in doc["modules"]}
    assert matched["distilbert.transformer.layer.0.attention.q_lin"] == "transformer.layer.0.attention.q_lin"
    assert matched["distilbert.transformer.layer.1.ffn.lin1"] == "transformer.layer.1.ffn.lin1"
    assert s["only_in_a"] == ["distilbert.transformer.layer.0.attention.v_lin",
                              "distilbert.transformer.layer.1.attention.v_lin"]
    assert s["only_in_b"] == ["transformer.layer.0.ffn.lin2", "transformer.layer.1.ffn.lin2"]
    codes = {i["code"]: i for i in doc["issues"]}
    assert codes["base_model_mismatch"]["severity"] == "warning"
    assert "matched_by_suffix" in codes and "unmatched_modules" in codes
    rc, out, err = run([str(a), str(b), "--fail-on", "unmatched"], capsys)
    assert rc == 1 and "fail-on met: unmatched" in err
    assert "Only in A (2): distilbert.transformer.layer.0.attention.v_lin" in out


def test_fail_on_rules(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(world["cons"]), str(world["aggr"])
    rc, _, err = run([a, b, "--fail-on", "cos<0.5"], capsys)  # independent random updates: cos ~ 0
    assert rc == 1 and "fail-on met: cos<0.5: met by" in err
    rc, _, err = run([a, a, "--fail-on", "cos<0.5,overlap_left_mean<0.99"], capsys)  # the same adapter twice
    assert rc == 0, err
    # a rule on a metric that could not be computed never passes: exit 2 naming the rule and why
    na = synthetic.write_synthetic_adapter(tmp_path / "x", layers=1, targets=TARGETS, r=4, alpha=8, seed=1)
    nb = synthetic.write_synthetic_adapter(tmp_path / "y", layers=1, targets=TARGETS, r=8, alpha=8, seed=2)
    rc, out, err = run([str(na), str(nb), "--fail-on", "udr_median_delta>0.2"], capsys)  # no base anywhere
    assert rc == 2 and "'udr_median_delta>0.2'" in err and "--base-model" in err and out == ""
    rc, _, err = run([str(na), str(nb), "--fail-on", "udr_delta>0.2"], capsys)
    assert rc == 2 and "'udr_delta>0.2'" in err
    ja = audit_json(world["cons"], tmp_path / "a.json", capsys)
    rc, out, err = run([str(ja), b, "--fail-on", "cos<0.5"], capsys)
    assert rc == 2 and "'cos<0.5'" in err and "audit JSON" in err and out == ""
    rc, _, err = run([a, b, "--fail-on", "bogus>1"], capsys)
    assert rc == 2 and "unknown metric 'bogus'" in err
    rc, _, err = run([a, b, "--base-model", str(world["base"]), "--base-norms-cache", str(tmp_path / "n.json"),
                      "--fail-on", "udr_median_delta>0.2"], capsys)
    doc = compare_json([a, b, "--base-model", str(world["base"]), "--base-norms-cache", str(tmp_path / "n.json")],
                       capsys)
    assert rc == (1 if doc["summary"]["udr_median_delta"] > 0.2 else 0)
    rc, _, err = run([a, b, "--base-model", str(world["base"]), "--base-norms-cache", str(tmp_path / "n.json"),
                      "--fail-on", "udr_delta>0"], capsys)
    assert rc == 1 and "udr_delta>0: met by" in err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "not found"),
    (lambda p: _write(p / "bad.json", "{not json"), "not valid JSON"),
    (lambda p: _write(p / "other.json", json.dumps({"schema": "gradience.compare/v1"})), "expected 'gradience.audit/v1'"),
    (lambda p: _write(p / "multi.json", json.dumps({"schema": "gradience.audit.multi/v1", "adapters": {"x": {}}})),
     "several adapter audits"),
    (lambda p: _write(p / "notes.txt", "hello"), "expected an adapter directory or an audit JSON"),
    (lambda p: _write(p / "empty.json", json.dumps({"schema": "gradience.audit/v1", "layers": []})), "no layers"),
])
def test_bad_input_is_one_line_exit_2(world: dict[str, Path], tmp_path: Path, make: Any, message: str) -> None:
    bad = make(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gradience", "compare", str(world["cons"]), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradience compare: error: ")
    assert str(bad) in lines[0] and message in lines[0]
    assert "Traceback" not in proc.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_usage_errors(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run([str(world["cons"]), str(world["aggr"]), "--k", "0"], capsys)
    assert rc == 2 and "--k must be >= 1" in err
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(world["cons"]), str(world["aggr"]), "--sort", "size"])
    assert exc.value.code == 2


def test_help_has_examples_and_no_torch_import(world: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "gradience", "compare", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "gradience compare runs/conservative/adapter" in proc.stdout
    assert "--fail-on 'cos<0.5,udr_median_delta>0.2'" in proc.stdout
    code = ("import sys; from gradience.cli.main import main; "
            f"rc = main(['compare', {str(world['cons'])!r}, {str(world['aggr'])!r}, '--json']); "
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]; "
            "sys.stderr.write(repr(heavy)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip().endswith("[]")
