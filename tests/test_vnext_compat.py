"""The reference tool's users switch without breaking (issue 17 item 4): its import paths (``gradience.vnext``,
``gradience.api``), its Guard field names as deprecated aliases, and its audit JSON read by compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from gradience.cli.main import main
from support.hostile import REPO_ROOT, audit_json_doc, good_adapter, reference_audit_json, synthetic_base


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- gradience.vnext: paths, laziness ------------------------------------------------------------------------
def test_vnext_import_is_light_until_the_hf_integration_is_touched() -> None:
    code = ("import sys, gradience.vnext as v; from gradience.vnext.telemetry import TelemetryWriter; "
            "from gradience.vnext.telemetry_reader import TelemetryReader; from gradience.vnext.types import "
            "Severity; v.TelemetryWriter; v.Severity; import gradience.api; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_vnext_names_are_ours() -> None:
    import gradience.vnext as v
    from gradience.telemetry import TelemetryReader, TelemetryWriter
    from gradience.telemetry.schema import ALERT_SEVERITIES, SCHEMA
    from gradience.telemetry.types import TASK_PROFILES, ConfigSnapshot, LoraConfig
    from gradience.vnext import types

    assert issubclass(v.TelemetryWriter, TelemetryWriter) and issubclass(v.TelemetryReader, TelemetryReader)
    from gradience.vnext import telemetry, telemetry_reader

    assert telemetry.TelemetryReader is telemetry_reader.TelemetryReader is v.TelemetryReader
    assert v.ConfigSnapshot is ConfigSnapshot and types.LoRAConfigSnapshot is LoraConfig
    assert v.TELEMETRY_SCHEMA_VERSION == SCHEMA == "gradience.vnext.telemetry/v1"
    assert [s.value for s in types.Severity] == list(ALERT_SEVERITIES)
    assert [p.value for p in types.TaskProfile] == list(TASK_PROFILES)
    assert types.Severity.WARNING == "warning" and f"{types.Severity.ERROR}" == "error"
    with pytest.raises(AttributeError, match=r"gradience\.audit\.audit_state_dict"):
        v.audit_lora_state_dict  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        v.nope  # noqa: B018


# -- the reference's writer call shapes write our records -------------------------------------------------------
def test_reference_writer_calls_write_the_same_records(tmp_path: Path) -> None:
    from gradience.telemetry import TelemetryWriter as Ours
    from gradience.vnext.telemetry import TelemetryWriter
    from gradience.vnext.telemetry_reader import TelemetryReader
    from gradience.vnext.types import ConfigSnapshot, Severity

    ref, ours = tmp_path / "ref.jsonl", tmp_path / "ours.jsonl"
    config = ConfigSnapshot.from_dict({"model_name": "m", "lora": {"r": 8, "alpha": 16}})
    with TelemetryWriter(ref, "run-1") as tw:  # run_id positional, as the reference passed it
        tw.run_start(config, meta={"who": "ref"})
        tw.train_step(1, loss=1.5, lr=1e-4)
        tw.eval(1, split="test", metrics={"loss": 1.25, "accuracy": 0.5})
        tw.metrics(1, kind="lora_audit", metrics={"n_layers": 2})          # reference: step first
        tw.alert(severity=Severity.WARNING, code="c", message="m", step=1)   # an enum member
        tw.log("custom", step=2, note="x")                                  # reference: **payload
        tw.run_end(status="ok", final_loss=1.0)                             # extras ride along
    with Ours(ours, run_id="run-1") as tw2:
        tw2.run_start(config, meta={"who": "ref"})
        tw2.train_step(1, loss=1.5, lr=1e-4)
        tw2.eval(1, "test", {"loss": 1.25, "accuracy": 0.5})
        tw2.metrics("lora_audit", {"n_layers": 2}, step=1)
        tw2.alert("warning", "c", "m", step=1)
        tw2.log("custom", {"note": "x"}, step=2)
        tw2.log("run_end", {"status": "ok", "final_loss": 1.0})

    def records(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "ts"} for line in path.read_text().splitlines()]

    assert records(ref) == records(ours)
    reader = TelemetryReader(ref)
    assert [e["event"] for e in reader.iter_events()] == ["run_start", "train_step", "eval", "metrics", "alert",
                                                          "custom", "run_end"]
    assert [e["metrics"] for e in reader.iter_events("metrics")] == [{"n_layers": 2}]
    cfg = reader.latest_config()
    assert cfg is not None and cfg.lora.r == 8 and cfg.model_name == "m"
    assert reader.latest_eval_event(split="test")["metrics"]["accuracy"] == 0.5  # type: ignore[index]
    assert reader.validate() == ["line 6: unknown event 'custom' (ignored by v1 readers)"]
    test = reader.latest_eval(split="test")
    assert test is not None and (test.loss, test.accuracy) == (1.25, 0.5)
    assert test.ppl == pytest.approx(math.exp(1.25))  # the writer adds ppl = exp(loss)
    assert reader.latest_eval(split="train") is None


def test_reference_reader_summarize(tmp_path: Path) -> None:
    """The reference README's ``r.summarize()`` / ``r.latest_eval(split="test")``, filled by our monitor."""
    from gradience.vnext.telemetry import TelemetryWriter
    from gradience.vnext.telemetry_reader import TelemetryReader
    from gradience.vnext.types import EvalMetrics, SignalSnapshot

    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, "r") as tw:
        tw.run_start({"model_name": "m", "lora": {"r": 8, "alpha": 16}})
        for step in (1, 2, 3):
            tw.train_step(step, loss=1.0 / step)
        tw.eval(3, split="train", metrics={"loss": 0.3, "accuracy": 0.9, "n": 10})
        tw.eval(3, split="test", metrics={"loss": 0.6, "accuracy": 0.7, "n": 10})
        tw.metrics(3, kind="lora_audit", metrics={"stable_rank_mean": 2.0, "utilization_mean": 0.25})
    snap = TelemetryReader(path).summarize()
    assert isinstance(snap, SignalSnapshot) and snap.test == EvalMetrics(0.6, math.exp(0.6), 0.7, 10)
    assert snap.gap == pytest.approx(math.exp(0.6) / math.exp(0.3))
    assert (snap.stable_rank_mean, snap.utilization_mean) == (2.0, 0.25)
    assert snap.to_dict()["train"]["accuracy"] == 0.9


def test_reference_writer_appends_instead_of_truncating(tmp_path: Path) -> None:
    from gradience.vnext.telemetry import TelemetryWriter

    path = tmp_path / "run.jsonl"
    for run in ("a", "b"):
        with TelemetryWriter(path, run) as tw:
            tw.train_step(1, loss=1.0)
    assert [json.loads(line)["run_id"] for line in path.read_text().splitlines()] == ["a", "b"]


# -- Guard field names ----------------------------------------------------------------------------------------
REF_GUARD = {"enable_guard": True, "guard_ring_size": 7, "guard_window_steps": 50, "guard_grad_threshold": 100.0,
             "guard_cooldown_steps": 20, "guard_steps_back": 1, "guard_prune_newer_on_rollback": True}


def test_reference_guard_fields_translate_with_one_warning_each() -> None:
    from gradience.integrations.guard import translate_reference_guard_fields

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = translate_reference_guard_fields({**REF_GUARD, "guard_snapshot_every": 5, "output_dir": "x"})
    assert out == {"guard": True, "guard_ring": 7, "guard_window": 50, "guard_snapshot_every": 5, "output_dir": "x"}
    assert [w.category for w in caught] == [DeprecationWarning] * len(REF_GUARD)
    assert sorted(str(w.message).split()[0] for w in caught) == sorted(REF_GUARD)
    with pytest.raises(TypeError, match="both enable_guard"):
        translate_reference_guard_fields({"enable_guard": True, "guard": False})


def test_vnext_callback_config_accepts_reference_names() -> None:
    pytest.importorskip("transformers")
    from gradience.integrations.hf import GradienceCallback as OurCallback
    from gradience.integrations.hf import GradienceCallbackConfig as OurConfig
    from gradience.vnext.integrations.hf import GradienceCallback, GradienceCallbackConfig

    assert GradienceCallback is OurCallback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = GradienceCallbackConfig(output_dir="out", **REF_GUARD)
    assert len(caught) == len(REF_GUARD) and all(w.filename == __file__ for w in caught)  # points at the caller
    assert isinstance(cfg, OurConfig) and (cfg.guard, cfg.guard_ring, cfg.guard_window) == (True, 7, 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cfg.enable_guard is True and cfg.guard_ring_size == 7
        cfg.enable_guard = False
    assert cfg.guard is False and len(caught) == 3
    GradienceCallback(cfg)._guard_settings()  # the callback builds its Guard from the translated fields


# -- gradience.api -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_api_wrappers_run_the_cli(tmp_path: Path) -> None:
    from gradience import api
    from gradience.errors import GradienceError

    adapter = good_adapter(tmp_path / "a")
    proc = api.audit(peft_dir=adapter, no_udr=True, extra_args=["--json"], log_path=tmp_path / "audit.log")
    assert proc.returncode == 0
    doc = json.loads((tmp_path / "audit.log").read_text())
    assert doc["n_layers"] == 2 and len(doc["layers"][0]["singular_values"]) == 4  # --layers: every σ
    (tmp_path / "run.jsonl").write_text(json.dumps({"schema": "gradience.vnext.telemetry/v1", "ts": 1.0,
                                                    "run_id": "r", "event": "train_step", "step": 1,
                                                    "loss": 1.0}) + "\n")
    assert api.monitor(run_jsonl=tmp_path / "run.jsonl", log_path=tmp_path / "m.log").returncode == 0
    assert "r" in (tmp_path / "m.log").read_text()
    with pytest.raises(subprocess.CalledProcessError):
        api.audit(peft_dir=tmp_path / "missing", log_path=tmp_path / "bad.log")
    (tmp_path / "bench.json").write_text('{"schema": "gradience.bench/v1"}')
    assert api.load_bench_report(tmp_path) == {"schema": "gradience.bench/v1"}
    with pytest.raises(GradienceError, match=r"bench_aggregate\.json"):
        api.load_bench_aggregate(tmp_path)
    with pytest.raises(GradienceError, match="--seeds"):
        api.aggregate_bench_runs(runs=[tmp_path], output=tmp_path / "agg")
    # run_bench's command line, seen by a stand-in interpreter that prints its arguments (no training here)
    arts = api.run_bench(config="c.yaml", output=tmp_path / "out", smoke=True, ci=True, python="/bin/echo",
                         log_path=tmp_path / "bench.log")
    assert (tmp_path / "bench.log").read_text().split() == [
        "-m", "gradience.bench.run_bench", "--config", "c.yaml", "--output", str(tmp_path / "out"), "--smoke", "--ci"]
    assert arts.bench_json == tmp_path / "out" / "bench.json" and arts.bench_md.name == "bench.md"


# -- the reference's audit JSON in compare --------------------------------------------------------------------
@pytest.mark.parametrize("bench_layout", [False, True])
def test_compare_reads_reference_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            bench_layout: bool) -> None:
    from gradience.compare.sides import load_audit_json

    ours = audit_json_doc(good_adapter(tmp_path / "a"))
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(reference_audit_json(ours, bench_layout=bench_layout)))
    doc = load_audit_json(ref)
    assert doc["schema"] == "gradience.audit/v1" and doc["converted_from"]
    assert [r["name"] for r in doc["layers"]] == [r["name"] for r in ours["layers"]]  # PEFT prefix stripped
    assert [r["delta_frob_norm"] for r in doc["layers"]] == [r["delta_frob_norm"] for r in ours["layers"]]
    assert doc["adapter"]["r"] == 4 and doc["adapter"]["lora_alpha"] == 8 and doc["n_layers"] == 2
    assert [r["module_type"] for r in doc["layers"]] == [r["module_type"] for r in ours["layers"]]
    code, out, err = cli(capsys, "compare", str(ref), str(tmp_path / "ours.json"), "--json")
    assert code == 0, err
    cmp = json.loads(out)
    assert cmp["summary"]["n_matched"] == 2 and not cmp["summary"]["only_in_a"]
    for module in cmp["modules"]:
        for key in ("r", "utilization", "stable_rank", "delta_frob_norm", "delta_sigma_max"):
            assert module["delta"][key] == 0, (module["name"], key)


def test_reference_audit_without_layers_says_how_to_get_them(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ours = audit_json_doc(good_adapter(tmp_path / "a"))
    ref = reference_audit_json(ours)
    del ref["layer_data"]
    f = tmp_path / "ref.json"
    f.write_text(json.dumps(ref))
    code, _, err = cli(capsys, "compare", str(f), str(f))
    assert code == 2 and "--layers" in err and str(f) in err


# -- our audit rows carry the reference's spellings; --no-udr keeps null keys (documented) ---------------------
def test_audit_rows_have_reference_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--base-model",
                         str(synthetic_base(tmp_path / "base")), "--json")
    assert code == 0, err
    rows = json.loads(out)["layers"]
    assert all(r["delta_fro_norm"] == r["delta_frob_norm"] > 0 for r in rows)
    assert all(r["base_fro_norm"] == r["base_frob_norm"] > 0 for r in rows)


def test_no_udr_keeps_the_keys_as_null_as_the_readme_says(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.udr import PER_LAYER_KEYS, SUMMARY_KEYS

    doc = audit_json_doc(good_adapter(tmp_path / "a"))
    assert doc["udr_requested"] is False
    assert all(key in doc and doc[key] is None for key in SUMMARY_KEYS if key.startswith(("udr_", "sdi_")))
    assert all(row[key] is None for row in doc["layers"] for key in PER_LAYER_KEYS)
    readme = (REPO_ROOT / "README.md").read_text()
    assert "its\nsummary omits the `udr_*` keys, ours keeps them as `null`" in readme


# -- gradience.vnext.audit / check_config (its docs' other two calls) -----------------------------------------
def test_vnext_audit_lora_peft_dir_is_our_audit(tmp_path: Path) -> None:
    from gradience.adapter import load_adapter
    from gradience.audit import AuditOptions, run_audit
    from gradience.errors import GradienceError
    from gradience.vnext.audit import audit_lora_peft_dir

    adapter, base = good_adapter(tmp_path / "a"), synthetic_base(tmp_path / "base")
    res = audit_lora_peft_dir(adapter, include_top_singular_values=2)
    ours = run_audit(load_adapter(str(adapter)), AuditOptions(top_singular_values=2)).to_summary()
    assert res.config.r == 4 and res.config.lora_alpha == 8 and len(res.layers) == 2
    full = res.to_summary_dict(include_layers=True)
    assert [r["singular_values"] for r in full["layers"]] == [r["singular_values"] for r in ours["layers"]]
    assert all(len(r["singular_values"]) == 2 for r in full["layers"]) and "layers" not in res.to_summary_dict()
    lowest = min(ours["layers"], key=lambda r: r["utilization"])["name"]
    assert [r["name"] for r in res.to_summary_dict(include_layers=True, topk_layers=1)["layers"]] == [lowest]
    with_base = audit_lora_peft_dir(adapter, base_model_id=str(base), base_norms_cache=tmp_path / "c.json")
    assert all(r["udr"] is not None for r in with_base.to_summary_dict(include_layers=True)["layers"])
    with pytest.raises(GradienceError, match="base_model_id=DIR"):
        audit_lora_peft_dir(adapter, base_model_weights={"w": 1})


def test_vnext_check_config_returns_the_check_recommendations() -> None:
    import gradience.vnext as v
    from gradience.policy.check_rules import check_config as run_check

    cfg = {"model_name": "m", "lora": {"r": 64, "alpha": 8}, "optimizer": {"name": "adamw", "lr": 0.1}}
    recs = v.check_config(cfg)
    expected = run_check(v.ConfigSnapshot.from_dict(cfg)).recommendations
    assert [(r.severity, r.action, r.message) for r in recs] == [(r.severity, r.action, r.message) for r in expected]
    assert len(recs) > 1
