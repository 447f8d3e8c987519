"""``gradience report``: what the page shows, that it is escaped, deterministic, self-contained and small.

Inputs are real: synthetic PEFT-layout safetensors adapters (tests/support/synthetic.py) with a base
checkpoint written the same way, telemetry written by ``TelemetryWriter``, real PEFT adapters from the session
fixtures. Numbers on the page are checked against an independent computation (numpy SVD of the dense update).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import synthetic

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

HIDDEN, INTER = 64, 128   # small dims; the page's size and layout depend on layers and r, not on d


# -- input builders (shared with test_report_browser.py) ---------------------------------------------------
def write_base(out: Path, layers: int, targets: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """A base checkpoint (config.json + model.safetensors) holding the weights the adapter's modules name."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for leaf, (d_out, d_in) in targets.items():
            block = "mlp" if leaf in synthetic.MLP_LEAVES else "self_attn"
            tensors[f"model.layers.{i}.{block}.{leaf}.weight"] = (
                rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    synthetic.write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return out


def make_seven_b_shaped(root: Path) -> dict[str, Path]:
    """Llama-7B layout (32 blocks x q/k/v/o/gate/up/down = 224 pairs, r=16) with small dims, and its base."""
    targets = synthetic.llama_targets(HIDDEN, INTER)
    adapter = synthetic.write_synthetic_adapter(root / "adapter7b", layers=32, targets=targets, r=16, alpha=32,
                                                seed=3, exponent_range=(0.2, 3.0))
    base = write_base(root / "base7b", 32, targets)
    return {"adapter": adapter, "base": base}


def write_run(path: Path, *, steps: int, nan_steps: tuple[int, ...] = (), spike_steps: tuple[int, ...] = (),
              explode_steps: tuple[int, ...] = (), overfit: bool = False, eval_every: int = 100,
              names: dict[str, str] | None = None) -> Path:
    """A telemetry log as the callback writes it: run_start, train_steps, train/test evals, audit, run_end."""
    from gradience.telemetry import TelemetryWriter
    from gradience.telemetry.types import ConfigSnapshot, LoraConfig, OptimizerConfig

    names = names or {}
    rng = np.random.default_rng(0)
    config = ConfigSnapshot(model_name=names.get("model", "tiny-llama"), dataset_name=names.get("dataset", "toy"),
                            task_profile="easy_classification",
                            optimizer=OptimizerConfig(name="adamw_torch", lr=2e-4, weight_decay=0.0),
                            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    with TelemetryWriter(path, run_id="run-0001", append=False) as w:
        w.run_start(config)
        for step in range(1, steps + 1):
            loss = 0.4 + 2.0 * math.exp(-step / (steps / 5)) + 0.03 * float(rng.standard_normal())
            if step in spike_steps:
                loss *= 8.0
            if step in nan_steps:
                loss = math.nan
            grad = 1.0 + 0.1 * float(rng.standard_normal())
            if step in explode_steps:
                grad = 80.0
            warm = max(1, steps // 10)
            lr = 2e-4 * min(1.0, step / warm) * (1.0 - 0.9 * max(0, step - warm) / steps)
            w.train_step(step, loss=loss, lr=lr, grad_norm=grad, epoch=step / steps)
            if step % eval_every == 0:
                base_loss = 0.45 + 2.0 * math.exp(-step / (steps / 5))
                test = base_loss * 1.1 + (0.6 * max(0.0, step / steps - 0.6) if overfit else 0.0)
                w.eval(step, "train", {"loss": base_loss, "accuracy": min(0.99, 0.5 + step / steps / 2), "n": 200})
                w.eval(step, "test", {"loss": test, "accuracy": min(0.95, 0.5 + step / steps / 2.5), "n": 500})
        w.metrics("lora_audit", {"stable_rank_mean": 1.8, "utilization_mean": 0.11, "energy_rank_90_p50": 3,
                                 "energy_rank_90_p90": 6, "suggested_r_global_median": 4,
                                 "suggested_r_global_90": 8, "total_lora_params": 1_000_000,
                                 "adapter": {"r": 16}}, step=steps)
        w.alert("warning", "loss_spike", names.get("alert", "loss spiked"), {"step": 10}, step=10)
        w.run_end("ok", step=steps)
    return path


def make_nan_spike_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_run(root / "run.jsonl", steps=3000, nan_steps=(700, 701, 1900), spike_steps=(1200, 2500),
                     explode_steps=(1500,), overfit=True)


BENCH_ARMS: tuple[tuple[str, str, int | None, float], ...] = (
    # (name, kind, r, params share of the probe) as the bench runner writes them; the ranks of a probe r=16
    ("truncate_median", "truncate", 2, 2 / 16), ("truncate_p90", "truncate", 4, 4 / 16),
    ("truncate_per_layer", "truncate", None, 0.21), ("retrain_median", "retrain", 2, 2 / 16),
    ("retrain_p90", "retrain", 4, 4 / 16), ("retrain_per_layer", "retrain", None, 0.21),
    ("retrain_shuffled", "retrain", None, 0.21), ("uniform:16", "uniform", 16, 1.0),
    ("uniform:1", "uniform", 1, 1 / 16),
)


def make_bench_doc(seeds: tuple[int, ...] = (1, 2, 3), layers: int = 32) -> dict[str, Any]:
    """A ``gradience.bench/v1`` document with the runner's keys (bench/runner.py ``_assemble``): nine arms of a
    probe r=16 on a 7B-shaped model, three seeds, per-layer UDR per arm and seed. Several arms share one
    params share (their points sit on one x), ``uniform:16`` is the probe's own rank (the no-op control) and
    its UDR equals the probe's, so the sidebar has identical distributions to collapse."""
    rng = np.random.default_rng(5)
    modules = [f"base_model.model.model.layers.{i}.{'mlp' if leaf in synthetic.MLP_LEAVES else 'self_attn'}."
               f"{leaf}" for i in range(layers) for leaf in synthetic.llama_targets(HIDDEN, INTER)]
    probe_udr = {m: float(v) for m, v in zip(modules, rng.lognormal(-2.5, 0.6, len(modules)), strict=True)}

    def udr_block(per_layer: dict[str, float]) -> dict[str, Any]:
        vals = sorted(per_layer.values())
        return {"udr_median": float(np.median(vals)), "udr_mean": float(np.mean(vals)),
                "udr_p90": float(np.percentile(vals, 90)), "udr_max": vals[-1],
                "fraction_udr_gt_0_1": sum(v > 0.1 for v in vals) / len(vals),
                "fraction_udr_gt_0_3": sum(v > 0.3 for v in vals) / len(vals), "sdi_median": None,
                "n_layers_with_udr": len(vals), "per_layer": per_layer}

    probe_params = 16 * 1000
    arms, udr_arms = [], {}
    for j, (name, kind, r, share) in enumerate(BENCH_ARMS):
        deltas = [float(-0.004 * (1 - share) * (j % 3) + 0.003 * rng.standard_normal()) for _ in seeds]
        if name == "uniform:1":
            deltas = [-0.09 + 0.01 * float(rng.standard_normal()) for _ in seeds]
        per_seed = [{"seed": s, "metric": 0.9 + d, "delta": d, "ci95": [d - 0.01, d + 0.01],
                     "verdict": "PASS" if d >= -0.01 else "FAIL", "params": round(share * probe_params), "r": r,
                     "rank_pattern": None, "seconds": 10.0, "adapter_dir": None, "summary": {}} for s, d in
                    zip(seeds, deltas, strict=True)]
        mean = float(np.mean(deltas))
        arms.append({"name": name, "kind": kind, "r": r, "rank_pattern": None,
                     "label": "control: the probe's own rank" if name == "uniform:16" else None,
                     "params": round(share * probe_params), "params_ratio": share, "per_seed": per_seed,
                     "aggregate": {"n_seeds": len(seeds), "mean_delta": mean,
                                   "sd_delta": float(np.std(deltas, ddof=1)) if len(seeds) > 1 else None,
                                   "worst_delta": min(deltas), "pass_rate": sum(d >= -0.01 for d in deltas) / len(
                                       deltas), "verdict": "PASS" if min(deltas) >= -0.01 else "FAIL"}})
        scale = 1.0 if name == "uniform:16" else 0.4 + 0.15 * j
        udr_arms[name] = {str(s): udr_block({m: v * scale for m, v in probe_udr.items()}) for s in seeds}
    return {
        "schema": "gradience.bench/v1", "config": {}, "seeds": list(seeds),
        "task": {"kind": "classification", "model": "tiny-llama", "dataset": "toy", "metric": "accuracy",
                 "higher_is_better": True, "n_eval_items": 200},
        "probe": {"r": 16, "alpha": 32, "params": probe_params, "per_seed": []},
        "arms": arms, "noise_floor": {"sd": 0.004, "note": "sd of the probe's metric across seeds"},
        "policy": {"tolerance": 0.01, "min_pass_rate": 0.67, "rule": "Δ ≥ −tolerance"},
        "verdict": "PASS", "recommended_arm": "truncate_median", "screening": len(seeds) == 1,
        "udr": {"probe": {str(s): udr_block(dict(probe_udr)) for s in seeds}, "arms": udr_arms},
        "elapsed_seconds": 100.0,
    }


@pytest.fixture(scope="session")
def seven_b_shaped(fixture_root: Path) -> dict[str, Path]:
    return make_seven_b_shaped(fixture_root / "report_7b")


@pytest.fixture(scope="session")
def nan_spike_run(fixture_root: Path) -> Path:
    return make_nan_spike_run(fixture_root / "report_nan_run")


# -- helpers ---------------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Tags, attributes, text (outside <style>) and the <title> of every SVG rect, from a real HTML parser."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.rect_titles: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("path", "use", "rect", "meta", "br", "link", "img", "input") or tag == "rect":
            self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop() == tag:
                break

    def handle_data(self, data: str) -> None:
        if "style" in self._stack:
            return
        self.text.append(data)
        if len(self._stack) >= 2 and self._stack[-1] == "title" and self._stack[-2] == "rect":
            self.rect_titles.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def render(path: Path, **kwargs: Any) -> str:
    from gradience.report import render_report

    return render_report(path, **kwargs)


def tooltips(page: _Page) -> dict[tuple[str, str], str]:
    """{(module, metric): value} from the heatmap cells' <title> texts."""
    out = {}
    for t in page.rect_titles:
        name, _, rest = t.partition("\n")
        metric, _, value = rest.rpartition(": ")
        out[(name, metric)] = value
    return out


def dense_metrics(adapter: Path, name: str, scale: float) -> tuple[float, int, float]:
    """(utilization, k@90, sigma_max of the scaled update) of one module, from a dense numpy SVD."""
    from safetensors.numpy import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    a = t[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
    b = t[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
    sigma = np.linalg.svd(scale * b @ a, compute_uv=False)
    r = a.shape[0]
    util = float((sigma**2).sum() / sigma[0] ** 2 / r)
    energy = np.cumsum(sigma**2) / (sigma**2).sum()
    k90 = int(np.searchsorted(energy, 0.9 - 1e-12) + 1)
    return util, k90, float(sigma[0])


FORBIDDEN_URL = re.compile(r"""(?:\b(?:src|href|xlink:href)\s*=\s*["']?\s*https?:|url\(\s*["']?\s*https?:)""",
                           re.IGNORECASE)


def assert_self_contained(page: str) -> None:
    assert not FORBIDDEN_URL.search(page)
    parsed = parse(page)
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)
            if key in ("src", "href", "xlink:href"):
                assert value is not None and value.startswith("#"), (tag, key, value)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


# -- the adapter view -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_with_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_small")
    targets = synthetic.llama_targets(HIDDEN, INTER)
    adapter = synthetic.write_synthetic_adapter(root / "adapter", layers=3, targets=targets, r=8, alpha=16, seed=1)
    return {"adapter": adapter, "base": write_base(root / "base", 3, targets), "root": root}


def test_adapter_page_numbers_match_a_dense_svd(small_with_base: dict[str, Path]) -> None:
    adapter, base = small_with_base["adapter"], small_with_base["base"]
    page = render(adapter, base_model=str(base), base_norms_cache=str(small_with_base["root"] / "norms.json"))
    parsed = parse(page)
    tips = tooltips(parsed)
    from safetensors.numpy import load_file

    weights = load_file(str(base / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        util, k90, dsm = dense_metrics(adapter, name, 16 / 8)
        assert tips[(name, "utilization")] == f"{100 * util:.1f}%"
        assert tips[(name, "k@90%")] == str(k90)
        base_sigma = float(np.linalg.svd(weights[name + ".weight"].astype(np.float64), compute_uv=False)[0])
        assert float(tips[(name, "UDR")]) == pytest.approx(dsm / base_sigma, rel=2e-3)
    # 3 blocks x 7 modules, three heatmaps, one tooltip per cell
    assert len(parsed.rect_titles) == 3 * 21
    text = " ".join(parsed.text)
    assert "UDR distribution" in text and "Rank suggestions" in text and "rank_pattern" in text
    assert "Most used layers" in page and "Least used layers" in page  # the spectra chart
    assert_self_contained(page)


def test_same_input_same_bytes_across_processes(small_with_base: dict[str, Path], tmp_path: Path) -> None:
    adapter, base = small_with_base["adapter"], small_with_base["base"]
    cache = str(small_with_base["root"] / "norms.json")
    first = render(adapter, base_model=str(base), base_norms_cache=cache)
    assert render(adapter, base_model=str(base), base_norms_cache=cache) == first
    code = ("import sys; from gradience.report import render_report; "
            f"sys.stdout.write(render_report({str(adapter)!r}, base_model={str(base)!r}, base_norms_cache={cache!r}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.returncode == 0, other.stderr
    assert other.stdout == first
    assert first.startswith("<!DOCTYPE html>") and first.count("<html") == 1
    assert first.count("<svg") >= 5  # 3 heatmaps, spectra, UDR histogram
    assert "<!DOCTYPE svg" not in first and "<?xml" not in first and "<metadata" not in first


def test_hostile_module_names_appear_only_escaped(tmp_path: Path) -> None:
    evil_tag, evil_attr = "<script>alert(1)</script>", '"onmouseover=alert(1)'
    rng = np.random.default_rng(0)
    tensors = {}
    names = [f"model.layers.0.self_attn.{evil_tag}", f"model.layers.1.{evil_attr}.q_proj",
             "model.layers.2.self_attn.q_proj"]
    for n in names:
        tensors[f"base_model.model.{n}.lora_A.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
        tensors[f"base_model.model.{n}.lora_B.weight"] = rng.standard_normal((16, 4)).astype(np.float32)
    run = tmp_path / "run"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    synthetic.write_safetensors(adapter / "adapter_model.safetensors", tensors)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [evil_tag, evil_attr],
        "base_model_name_or_path": evil_attr}))
    write_run(run / "run.jsonl", steps=50, eval_every=10,
              names={"model": evil_tag, "dataset": evil_attr, "alert": evil_tag + evil_attr})
    page = render(run, title=evil_tag)
    for needle in ("<script", "</script", "onmouseover=alert"):
        for m in re.finditer(re.escape(needle), page, re.IGNORECASE):
            before = page[max(0, m.start() - 6): m.start()]
            assert needle == "onmouseover=alert" and before.endswith(("&#34;", "&quot;")), \
                page[max(0, m.start() - 80): m.end() + 80]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = parse(page)
    assert not any(tag == "script" for tag, _ in parsed.tags)
    assert not any(k.startswith("on") for _, attrs in parsed.tags for k in attrs)
    assert any(evil_tag in t for t in parsed.rect_titles)  # the tooltip names the module, as text
    assert_self_contained(page)


# -- the run view -----------------------------------------------------------------------------------------
def test_run_page_marks_nan_spikes_and_onset(nan_spike_run: Path) -> None:
    page = render(nan_spike_run)
    parsed = parse(page)
    text = " ".join(parsed.text)
    assert "NaN/Inf (3 steps)" in page            # the NaN ticks on the loss curve
    assert "loss spike (2)" in page
    assert "overfitting onset (step" in page
    assert "explosion (1)" in page
    assert "min–max per 4 steps" in page          # 3000 steps > 800 buckets: banded, spikes kept
    assert re.search(r"NaN/Inf losses\s*3\s*700, 701, 1900", text)
    assert not re.search(r"\b(nan|inf)\b", text)  # unknown values print as '-', never 'nan'
    assert "early_stop_at" in text and "nan_loss" in text
    assert_self_contained(page)


def test_non_finite_everywhere_never_breaks_the_page(tmp_path: Path) -> None:
    from gradience.telemetry import TelemetryWriter

    with TelemetryWriter(tmp_path / "run.jsonl", append=False) as w:
        w.run_start({"model_name": "m"})
        for step in range(1, 40):
            w.train_step(step, loss=math.inf if step % 3 else math.nan, lr=math.nan, grad_norm=-math.inf)
        w.eval(39, "test", {"loss": math.nan, "accuracy": math.nan})
        w.run_end("ok", step=39)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 16)).astype(np.float32)
    a[0, 0] = np.nan
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    synthetic.write_safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(
            np.float32)})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    page = render(tmp_path)
    text = " ".join(parse(page).text)
    assert not re.search(r"\b(nan|inf)\b", text)
    assert "non_finite_weights" in text
    assert "No loss was logged" not in text          # infinite losses were logged: shown as NaN/Inf ticks
    assert "NaN/Inf (39 steps)" in page
    assert_self_contained(page)


def test_trainer_state_json_is_a_run(tmp_path: Path) -> None:
    history = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0, "epoch": s / 10}
               for s in range(1, 11)]
    history += [{"step": 10, "eval_loss": 0.5, "eval_accuracy": 0.8, "epoch": 1.0},
                {"step": 10, "train_runtime": 3.0, "train_loss": 0.7, "total_flos": 1.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history, "max_steps": 10}))
    page = render(tmp_path / "trainer_state.json")
    assert "Training run" in page and "eval loss: eval" in page
    assert "No loss was logged" not in page


# -- downsampling ----------------------------------------------------------------------------------------
def test_downsampler_keeps_every_spike_and_matches_numpy() -> None:
    from gradience.report.curves import CURVE_BUCKETS, Downsampler

    rng = np.random.default_rng(0)
    ys = rng.normal(1.0, 0.05, 100_003)
    ys[31_337] = 50.0           # one-step spike
    ys[77_000] = -20.0          # one-step dip
    ys[5_000] = np.nan
    d = Downsampler()
    for i, y in enumerate(ys):
        d.add(float(i), float(y))
    assert len(d.buckets) <= CURVE_BUCKETS and not d.exact
    assert d.count == len(ys) and d.nonfinite_count == 1 and d.nonfinite_steps == [5000.0]
    covered = 0
    for b in d.buckets:  # each bucket = the consecutive points x_first..x_last; compare with numpy
        seg = ys[int(b.x_first): int(b.x_last) + 1]
        covered += len(seg)
        fin = seg[np.isfinite(seg)]
        assert b.n == len(fin) and b.nonfinite == len(seg) - len(fin)
        assert b.hi == fin.max() and b.lo == fin.min()
        assert b.mean == pytest.approx(fin.mean(), rel=1e-12)
    assert covered == len(ys)
    assert max(b.hi for b in d.buckets) == 50.0 and min(b.lo for b in d.buckets) == -20.0
    spike = next(b for b in d.buckets if b.hi == 50.0)
    assert spike.x_hi == 31_337.0
    short = Downsampler()
    for i in range(100):
        short.add(float(i), float(i * i))
    assert short.exact and [b.lo for b in short.buckets] == [float(i * i) for i in range(100)]


# -- size -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_seven_b_adapter_and_100k_step_log_fit_in_one_megabyte(tmp_path: Path,
                                                               seven_b_shaped: dict[str, Path]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(seven_b_shaped["adapter"], run / "adapter")
    write_run(run / "run.jsonl", steps=100_000, nan_steps=(5000,), spike_steps=(40_000,), eval_every=1000)
    page = render(run, base_model=str(seven_b_shaped["base"]), base_norms_cache=str(tmp_path / "n.json"))
    size = len(page.encode("utf-8"))
    assert size <= 1_000_000, size
    parsed = parse(page)
    assert len(parsed.rect_titles) == 3 * 224
    assert "min–max per" in page and "NaN/Inf (1 steps)" in page and "loss spike (1)" in page


# -- other inputs -------------------------------------------------------------------------------------------
def test_audit_json_and_compare_json_from_the_real_commands(small_with_base: dict[str, Path],
                                                            tmp_path: Path) -> None:
    from gradience.cli.main import main

    adapter = small_with_base["adapter"]
    other = synthetic.write_synthetic_adapter(tmp_path / "other", layers=3, targets=synthetic.llama_targets(
        HIDDEN, INTER), r=16, alpha=32, seed=9)
    audit_json = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "gradience", "audit", "--peft-dir", str(adapter), "--json",
                           "--no-udr"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    audit_json.write_text(proc.stdout)
    page = render(audit_json)
    assert "--suggest-per-layer --json" in page  # the JSON has no per-layer suggestion: the command that adds it
    tips = tooltips(parse(page))
    util, _, _ = dense_metrics(adapter, "model.layers.1.self_attn.v_proj", 2.0)
    assert tips[("model.layers.1.self_attn.v_proj", "utilization")] == f"{100 * util:.1f}%"

    proc = subprocess.run([sys.executable, "-m", "gradience", "compare", str(adapter), str(other), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "compare.json").write_text(proc.stdout)
    doc = json.loads(proc.stdout)
    out = tmp_path / "cmp.html"
    assert main(["report", str(tmp_path / "compare.json"), "-o", str(out)]) == 0
    page = out.read_text()
    tips = tooltips(parse(page))
    module = doc["modules"][0]
    assert tips[(module["name"], "cos(ΔW_A, ΔW_B)")] == f"{module['cos']:.3f}"
    assert tips[(module["name"], "overlap (left)")] == f"{module['overlap_left']:.3f}"
    assert tips[(module["name"], "Δ utilization (B − A)")] == f"{module['delta']['utilization']:+.3g}"
    assert "Comparison A ↔ B" in page
    assert_self_contained(page)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradience", "report", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_default_output_and_bad_inputs(tmp_path: Path, small_with_base: dict[str, Path]) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(small_with_base["adapter"], adapter)
    proc = _cli(str(adapter), "--no-udr", "--title", "My adapter", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (adapter / "report.html").is_file()
    assert "<title>My adapter</title>" in (adapter / "report.html").read_text()
    (tmp_path / "other.json").write_text('{"schema": "something/v1"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    for target, message in (("missing", "no such file"), ("other.json", "not a report input"),
                            ("empty", "nothing to report"), ("bad.json", "not valid JSON")):
        proc = _cli(target, cwd=tmp_path)
        assert proc.returncode == 2, (target, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradience report: error:") and message in lines[0], lines
        assert target in lines[0]


def test_missing_report_extra_is_one_line_naming_it(tmp_path: Path, small_with_base: dict[str, Path]) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from gradience.cli.main import main\n"
            f"sys.exit(main(['report', {str(small_with_base['adapter'])!r}, '-o', 'x.html']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gradience[report]" in lines[0] and "matplotlib" in lines[0], proc.stderr
    assert not (tmp_path / "x.html").exists()


def test_importing_the_command_stays_light() -> None:
    code = ("import sys, gradience.cli.report, gradience.report, gradience.cli.main as m; m.build_parser(); "
            "print(sorted(k for k in ('matplotlib', 'jinja2', 'torch', 'numpy') if k in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_demo_writes_a_report_with_udr(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, "-m", "gradience", "demo", "--out", "d", "--max-steps", "10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Report: d/report.html" in proc.stdout
    assert (tmp_path / "d" / "base" / "model.safetensors").is_file()
    page = (tmp_path / "d" / "report.html").read_text()
    parsed = parse(page)
    assert "Training run" in page and "Per-layer heatmaps" in page
    assert "base model unresolved" not in page and "d/base" in page
    udr = [float(v) for (_, metric), v in tooltips(parsed).items() if metric == "UDR" and v != "-"]
    assert len(udr) == 8 and all(v > 0 for v in udr)  # 2 blocks x q/k/v/out_lin of the toy model
    from test_report_browser import CHROMIUM, check_page, open_in_browser

    if os.path.exists(CHROMIUM) or os.environ.get("CI"):
        result = open_in_browser(tmp_path / "d" / "report.html", tmp_path / "golden_path.png", tmp_path)
        check_page(result)
        assert result["sections"] == ["run", "adapter"] and result["sidebar"]


def test_run_with_an_unreadable_adapter_still_reports_the_run(tmp_path: Path) -> None:
    write_run(tmp_path / "run.jsonl", steps=30, eval_every=10)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"\x10" * 64)
    page = render(tmp_path)
    assert "Training run" in page and "The adapter was not audited:" in page
    assert "adapter_model.safetensors" in page
    assert_self_contained(page)


# -- readable at a glance (issue 17 item 2) -------------------------------------------------------------------
_FIGURE = re.compile(r'<figure class="heatmap"[^>]*>(.*?)</figure>', re.DOTALL)
_CELL = re.compile(r'<rect x="\d+" y="\d+" width="(\d+)" height="(\d+)" fill="([^"]+)"[^>]*><title>([^<]*)</title>')
_LEGEND = re.compile(r'<text class="legend[^"]*" [^>]*>([^<]*)</text>')


def heatmaps(page: str) -> dict[str, dict[str, Any]]:
    """{map title: {"cells": [(w, h, fill, module, value text)], "legend": [label texts]}} of every heatmap."""
    import html as html_mod

    out = {}
    for body in _FIGURE.findall(page):
        title = html_mod.unescape(re.search(r"<b>(.*?)</b>", body).group(1))  # type: ignore[union-attr]
        cells = []
        for w, h, fill, tip in _CELL.findall(body):
            name, _, rest = html_mod.unescape(tip).partition("\n")
            cells.append((int(w), int(h), fill, name, rest.rpartition(": ")[2]))
        out[title] = {"cells": cells, "legend": [html_mod.unescape(t) for t in _LEGEND.findall(body)], "svg": body}
    return out


def _value(text: str) -> float:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _luminance(hex_fill: str) -> float:
    r, g, b = (int(hex_fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heatmaps_have_readable_cells_and_colour_bars_spanning_the_data(small_with_base: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    page = render(small_with_base["adapter"], base_model=str(small_with_base["base"]),
                  base_norms_cache=str(tmp_path / "norms.json"))
    maps = heatmaps(page)
    assert set(maps) == {"utilization", "k@90%", "UDR"}
    for title, m in maps.items():
        computed = [c for c in m["cells"] if not c[2].startswith("url(")]
        assert len(computed) == 21, title  # 3 blocks x 7 modules, every one computed here
        assert all(w >= 14 and h >= 14 for w, h, *_ in m["cells"]), title
        lo = min(computed, key=lambda c: _value(c[4]))
        hi = max(computed, key=lambda c: _value(c[4]))
        # The colour bar's end labels are the data's min and max, formatted as the cells' own tooltips.
        assert m["legend"][:2] == [lo[4], hi[4]], (title, m["legend"])
        # One direction for "more" on every map: the largest value is the darker colour.
        if lo[4] != hi[4]:
            assert _luminance(hi[2]) < _luminance(lo[2]) - 0.2, (title, lo, hi)


def test_compare_maps_tell_zero_from_not_computed_and_use_blue_for_more(tmp_path: Path) -> None:
    names = [f"model.layers.{i}.self_attn.{leaf}_proj" for i in range(2) for leaf in "qk"]
    deltas = [0.0, None, 0.05, -0.02]
    modules = [{"name": n, "cos": 0.5, "a": {"udr": 0.1}, "b": {"udr": None if d is None else 0.1 + d},
                "delta": {"udr": d, "utilization": d}} for n, d in zip(names, deltas, strict=True)]
    doc = {"schema": "gradience.compare/v1", "a": {"path": "runs/a/peft"}, "b": {"path": "runs/b/peft"},
           "summary": {"n_matched": 4}, "modules": modules, "issues": []}
    (tmp_path / "cmp.json").write_text(json.dumps(doc))
    page = render(tmp_path / "cmp.json")
    m = heatmaps(page)["Δ UDR (B − A)"]
    fill = {c[3]: c[2] for c in m["cells"]}
    assert fill[names[1]].startswith("url(#") and fill[names[1]].endswith("-na)")  # the hatch pattern
    assert f'<pattern id="{fill[names[1]][5:-1]}"' in m["svg"]
    assert fill[names[0]].startswith("#") and _luminance(fill[names[0]]) > 0.9  # zero: the white middle
    r, _g, b = (int(fill[names[2]][i:i + 2], 16) for i in (1, 3, 5))
    assert b > r + 60  # more (B − A > 0): blue, as the darker end of the sequential maps
    r, _g, b = (int(fill[names[3]][i:i + 2], 16) for i in (1, 3, 5))
    assert r > b + 30
    assert m["legend"] == ["-0.02", "+0.05", "0", "not computed (1)"]
    assert "<title>Comparison a/peft ↔ b/peft</title>" in page


def test_titles_name_the_run_and_the_adapter(tmp_path: Path, nan_spike_run: Path,
                                             small_with_base: dict[str, Path]) -> None:
    import shutil

    assert "<title>Run run-0001 · report_nan_run</title>" in render(nan_spike_run)
    peft = tmp_path / "my-run" / "peft"
    shutil.copytree(small_with_base["adapter"], peft)
    page = render(peft, udr=False)
    assert "<title>Adapter my-run/peft</title>" in page
    assert '<h1>Adapter my-run/peft</h1>' in page


def test_bench_page_collapses_identical_udr_and_wraps_names_between_parts(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bench.json").write_text(json.dumps(make_bench_doc()))
    page = render(tmp_path / "b")
    assert "<title>Bench b: tiny-llama on toy</title>" in page
    # 10 distributions (probe + 9 arms); probe, retrain_p90 and uniform:16 are the same one.
    assert "10 distributions, 8 distinct" in page
    compact = re.search(r'<table class="udr-compact">(.*?)</table>', page, re.DOTALL).group(1)  # type: ignore[union-attr]
    assert compact.count("<tr>") == 1 + 8
    assert "probe = retrain_<wbr>p90 = uniform:<wbr>16" in compact
    # One label per arm and the probe, each in its own group the browser test measures.
    assert len(set(re.findall(r'id="c\d+-gx-arm-label-(\d+)"', page))) == 10
    assert "bars: ± 1 sd of Δ over 3 seeds" in page
    assert '<td class="name">retrain_<wbr>per_<wbr>layer</td>' in page
    assert "0.<wbr>" not in page  # numbers never get a break opportunity


def test_one_seed_bench_says_there_are_no_error_bars(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps(make_bench_doc(seeds=(1,))))
    page = render(tmp_path / "bench.json")
    assert "one seed: no error bars" in page


@pytest.mark.parametrize(("wanted", "gap"), [
    ([0.5, 0.5, 0.5, 0.5], 0.1), ([0.1, 0.9, 0.12, 0.11, 0.5], 0.05), ([0.0, 1.0], 0.3),
    ([0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.0], 0.1), (list(np.random.default_rng(1).random(30)), 0.03),
])
def test_spread_labels_keeps_every_pair_a_line_apart(wanted: list[float], gap: float) -> None:
    from gradience.report.arm_chart import spread_labels

    ys = spread_labels(wanted, gap, 0.0, 1.0)
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    placed = [ys[i] for i in order]
    assert all(b - a >= gap - 1e-12 for a, b in itertools.pairwise(placed))  # same order, apart
    assert all(-1e-12 <= y <= 1.0 + 1e-12 for y in ys)
    spaced = sorted(wanted)
    if all(b - a >= gap for a, b in itertools.pairwise(spaced)):
        assert ys == pytest.approx(wanted)  # nothing to move: labels stay level with their points


def _report_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from gradience.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", *args])
    return code, err.getvalue()


def test_report_never_overwrites_another_inputs_page_without_force(tmp_path: Path) -> None:
    from support.hostile import _compare_doc

    (tmp_path / "a.json").write_text(json.dumps(_compare_doc()))
    (tmp_path / "b.json").write_text(json.dumps({**_compare_doc(), "a": {"path": "x/other"}}))
    assert _report_cli(str(tmp_path / "a.json")) == (0, "")
    a_page = (tmp_path / "a.html").read_bytes()  # the default name comes from the input's
    assert f'<meta name="gradience-report-input" content="{tmp_path / "a.json"}">'.encode() in a_page
    code, err = _report_cli(str(tmp_path / "b.json"), "-o", str(tmp_path / "a.html"))
    assert code == 2 and "holds the report of another input" in err and "--force" in err, err
    assert (tmp_path / "a.html").read_bytes() == a_page
    assert _report_cli(str(tmp_path / "a.json")) == (0, "")  # the same input: rewritten
    (tmp_path / "notes.html").write_text("<p>mine</p>")
    code, err = _report_cli(str(tmp_path / "a.json"), "-o", str(tmp_path / "notes.html"))
    assert code == 2 and "not a gradience report" in err, err
    assert (tmp_path / "notes.html").read_text() == "<p>mine</p>"
    assert _report_cli(str(tmp_path / "b.json"), "-o", str(tmp_path / "a.html"), "--force") == (0, "")
    assert f'content="{tmp_path / "b.json"}">'.encode() in (tmp_path / "a.html").read_bytes()
    # A directory and a file in it describe the same thing (the bench writes OUT/report.html from
    # OUT/bench.json; `gradience report OUT` rewrites it).
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(make_bench_doc(seeds=(1,), layers=1)))
    assert _report_cli(str(tmp_path / "bench" / "bench.json"), "-o", str(tmp_path / "bench" / "report.html")) == (0, "")
    assert _report_cli(str(tmp_path / "bench")) == (0, "")
    # Any other file in that directory is another input.
    (tmp_path / "bench" / "cmp.json").write_text(json.dumps(_compare_doc()))
    code, err = _report_cli(str(tmp_path / "bench" / "cmp.json"), "-o", str(tmp_path / "bench" / "report.html"))
    assert code == 2 and "holds the report of another input" in err, err


def test_reference_tool_audit_json_is_reported_with_our_numbers(small_with_base: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """The reference tool's audit JSON (no schema, ``layer_data.layer_rows``, full PEFT names) is converted by
    compare's reader and shows the same per-layer values as our own audit of the adapter."""
    from support.hostile import audit_json_doc, reference_audit_json

    ours = audit_json_doc(small_with_base["adapter"])
    (tmp_path / "ref.json").write_text(json.dumps(reference_audit_json(ours)))
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    ref_tips = tooltips(parse(render(tmp_path / "ref.json")))
    our_tips = tooltips(parse(render(tmp_path / "ours.json")))
    util = {k: v for k, v in our_tips.items() if k[1] == "utilization"}
    assert len(util) == 21 and all(ref_tips[k] == v for k, v in util.items())


def test_a_bench_with_hundreds_of_arms_draws_a_bounded_page(tmp_path: Path) -> None:
    """Sizes an input controls are bounded: 300 arms draw 40 points and 12 histograms, every arm in the table."""
    import time

    doc = make_bench_doc(seeds=(1,), layers=1)
    template = doc["arms"][0]
    doc["arms"] = [{**template, "name": f"arm_{i}", "params_ratio": 1 / (2 + i % 7)} for i in range(300)]
    block = doc["udr"]["arms"]["truncate_median"]["1"]
    doc["udr"]["arms"] = {f"arm_{i}": {"1": {**block, "per_layer": {k: v * (1 + i) for k, v in
                                                                    block["per_layer"].items()}}}
                          for i in range(300)}
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    started = time.perf_counter()
    page = render(tmp_path / "bench.json")
    assert time.perf_counter() - started < 30
    assert "(first 40 of 300 arms)" in page
    assert len(set(re.findall(r'id="c\d+-gx-arm-label-(\d+)"', page))) == 41  # 40 arms and the probe
    assert "The first 12 of 301 distributions are drawn." in page
    assert "… and 251 more." in page
    assert page.count('<td class="name">arm_<wbr>') == 2 * 300  # the arms table and the per-seed table
