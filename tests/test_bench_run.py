"""Real bench runs on CPU: the shipped toy smoke, resume after a kill, a causal LM, a local model, accelerate DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradience.bench.tasks import answer_matches
from gradience.cli.main import main

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "bench" / "toy.yaml"
TOY_CAUSAL = REPO / "examples" / "bench" / "toy_causal.yaml"
SEVEN_ARMS = ("truncate_median", "truncate_p90", "truncate_per_layer", "retrain_median", "retrain_p90",
              "retrain_per_layer", "retrain_shuffled")


def _tiny_config(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.fixture(scope="module")
def toy_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`gradience bench --config examples/bench/toy.yaml --smoke --json`, run once for this module."""
    out = tmp_path_factory.mktemp("bench") / "toy"
    proc = subprocess.run([sys.executable, "-m", "gradience.bench", "--config", str(TOY), "--smoke",
                           "--output-dir", str(out), "--json"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(proc.stdout)
    # One progress line per arm (and the probe) on stderr, with elapsed time and ETA.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bench: seed")]
    assert len(lines) == 1 + len(SEVEN_ARMS) and all("elapsed" in ln and "ETA" in ln for ln in lines)
    return out, bench


@pytest.mark.slow
def test_toy_smoke_bench_writes_every_output(toy_smoke: tuple[Path, dict]) -> None:
    out, bench = toy_smoke
    assert bench["schema"] == "gradience.bench/v1"
    for key in ("config", "seeds", "probe", "arms", "noise_floor", "policy", "verdict", "screening", "udr"):
        assert key in bench
    assert bench["screening"] is True and bench["seeds"] == [42]
    assert bench["policy"]["headline"] == "interval" and bench["policy"]["point_estimate_verdict"] in ("PASS", "FAIL")
    assert bench["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert bench["policy"]["tolerance"] == 0.02 and bench["policy"]["min_pass_rate"] == pytest.approx(2 / 3)
    assert bench["probe"]["r"] == 16 and bench["probe"]["params"] > 0
    probe_metric = bench["probe"]["per_seed"][0]["metric"]
    assert 0.5 < probe_metric <= 1.0  # the probe learned the toy task (chance is ~0.5)
    assert [a["name"] for a in bench["arms"]] == list(SEVEN_ARMS)
    for arm in bench["arms"]:
        assert arm["kind"] in ("truncate", "retrain")
        (s,) = arm["per_seed"]
        assert s["delta"] == pytest.approx(s["metric"] - probe_metric)
        lo, hi = s["ci95"]
        assert lo <= s["delta"] + 1e-12 and s["delta"] - 1e-12 <= hi
        # Headline: the interval against −tol (issue 18); the reference tool's point rule is kept beside it.
        assert s["point_estimate_verdict"] == ("PASS" if s["delta"] >= -0.02 - 1e-9 else "FAIL")
        assert s["verdict"] == ("PASS" if lo >= -0.02 - 1e-9 else "FAIL" if hi < -0.02 - 1e-9 else "INCONCLUSIVE")
        assert (s.get("n_eval_items_needed") is not None) == (s["verdict"] == "INCONCLUSIVE" and s["delta"] != -0.02)
        assert arm["aggregate"]["point_estimate_verdict"] == s["point_estimate_verdict"]
        assert arm["aggregate"]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and arm["aggregate"]["ci95"]
        assert 0 < arm["params_ratio"] <= 1.0
        assert (out / "seed_42" / arm["name"] / "result.json").is_file()
        # an arm whose ranks coincide with an earlier one's reuses its run (issue 17): its files are the twin's
        arm_dir = out / "seed_42" / (s.get("same_as") or arm["name"])
        assert (arm_dir / "adapter" / "adapter_config.json").is_file()
        if arm["kind"] == "retrain":
            assert (arm_dir / "run.jsonl").is_file()
        else:
            assert (arm_dir / "adapter" / "compress.json").is_file()
    # Truncation keeps the top singular directions, so its σ₁ (hence UDR) equals the probe's.
    udr = bench["udr"]
    assert udr["probe"]["42"]["udr_median"] > 0
    assert udr["arms"]["truncate_p90"]["42"]["udr_median"] == pytest.approx(udr["probe"]["42"]["udr_median"],
                                                                          rel=1e-6)
    # The shuffled control uses the per-layer arm's ranks, permuted: the same parameter count.
    arms = {a["name"]: a for a in bench["arms"]}
    assert arms["retrain_shuffled"]["params"] == arms["retrain_per_layer"]["params"]
    assert sorted(arms["retrain_shuffled"]["per_seed"][0]["rank_pattern"].values()) == \
        sorted(arms["retrain_per_layer"]["per_seed"][0]["rank_pattern"].values())
    md = (out / "bench.md").read_text()
    assert "Screening run (one seed)" in md and "truncate_per_layer" in md
    assert json.loads((out / "bench.json").read_text())["verdict"] == bench["verdict"]
    assert (out / "seed_42" / "probe" / "run.jsonl").is_file()


@pytest.mark.slow
def test_peft_dir_on_a_bench_arm_reproduces_its_delta_and_interval(toy_smoke: tuple[Path, dict], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --peft-dir ARM --against PROBE` on the bench's own adapters (base OUT/base found beside them): the
    same eval items, so the same Δ, interval and verdict as the training bench computed for that arm."""
    out, bench = toy_smoke
    arm = next(a for a in bench["arms"] if a["name"] == "retrain_p90")
    s = arm["per_seed"][0]
    adapter = out / "seed_42" / (s.get("same_as") or "retrain_p90") / "adapter"
    code = main(["bench", "--config", str(TOY), "--smoke", "--peft-dir", str(adapter), "--against",
                 str(out / "seed_42" / "probe" / "adapter"), "--output-dir", str(tmp_path / "eval"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["mode"] == "peft_dir" and doc["evaluation"]["base"] == str(out / "base")
    (mine,) = doc["arms"][0]["per_seed"]
    assert mine["delta"] == pytest.approx(s["delta"], abs=1e-12)
    assert mine["ci95"] == pytest.approx(s["ci95"], abs=1e-12) and mine["verdict"] == s["verdict"]
    assert doc["probe"]["per_seed"][0]["metric"] == pytest.approx(bench["probe"]["per_seed"][0]["metric"])
    assert doc["arms"][0]["params"] == arm["params"] and doc["probe"]["params"] == bench["probe"]["params"]


@pytest.mark.slow
def test_resume_skips_finished_arms_and_ci_exit_code(toy_smoke: tuple[Path, dict],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, bench = toy_smoke
    before = {p: p.stat().st_mtime_ns for p in out.glob("seed_42/*/result.json")}
    started = time.perf_counter()
    code = main(["bench", "--config", str(TOY), "--smoke", "--output-dir", str(out), "--resume", "--json", "--ci"])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == (0 if bench["verdict"] == "PASS" else 1)
    again = json.loads(captured.out)
    assert [a["aggregate"] for a in again["arms"]] == [a["aggregate"] for a in bench["arms"]]
    assert captured.err.count("resumed") == 1 + len(SEVEN_ARMS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed_42/*/result.json")} == before
    assert elapsed < 120  # nothing retrained
    # Without --resume an earlier bench is never overwritten.
    assert main(["bench", "--config", str(TOY), "--smoke", "--output-dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_bench_resumes_where_it_stopped(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, "b.yaml", """train: {max_steps: 12, eval_steps: 12, lr: 0.005,
        per_device_train_batch_size: 16}
lora: {probe_r: 8, alpha: 16}
task: {max_train_samples: 200, max_eval_samples: 100}
compression: {allowed_ranks: [1, 2, 4, 8], acc_tolerance: 0.05}
arms: [retrain_median, retrain_p90, uniform:2]
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gradience.bench", "--config", str(cfg), "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    first = out / "seed_42" / "retrain_median" / "result.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the first arm never finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "bench.json").exists()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("seed_42/*/result.json")}
    assert "probe" in finished and "retrain_median" in finished
    done = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads(done.stdout)
    assert [a["name"] for a in bench["arms"]] == ["retrain_median", "retrain_p90", "uniform:2"]
    for name, mtime in finished.items():  # finished arms were not retrained
        assert (out / "seed_42" / name / "result.json").stat().st_mtime_ns == mtime
    assert "probe" in done.stderr and "resumed" in done.stderr


@pytest.mark.slow
def test_causal_lm_bench_on_the_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "causal"
    code = main(["bench", "--config", str(TOY_CAUSAL), "--smoke", "--output-dir", str(out),
                 "--arms", "truncate_per_layer,uniform:4"])
    assert code == 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["task"]["kind"] == "causal_lm" and bench["task"]["metric"] == "eval_loss"
    assert bench["task"]["higher_is_better"] is False
    probe = bench["probe"]["per_seed"][0]
    assert probe["summary"]["ppl"] == pytest.approx(2.718281828 ** probe["summary"]["eval_loss"], rel=1e-6)
    assert probe["metric"] == pytest.approx(probe["summary"]["eval_loss"])
    assert probe["metric"] < 5.0  # below a uniform guess over the word vocabulary: the LoRA learned something
    for arm in bench["arms"]:
        s = arm["per_seed"][0]
        assert s["point_estimate_verdict"] == ("PASS" if s["delta"] <= 0.05 + 1e-9 else "FAIL")  # lower is better
        lo, hi = s["ci95"]  # the headline mirrors the interval for a loss: PASS when its upper bound ≤ +tol
        assert s["verdict"] == ("PASS" if hi <= 0.05 + 1e-9 else "FAIL" if lo > 0.05 + 1e-9 else "INCONCLUSIVE")


def test_exact_match_rules() -> None:
    assert answer_matches(" five apples .", "five")
    assert not answer_matches(" four apples .", "five")
    assert answer_matches("so she has 3 + 4 = 7 apples. The answer is 7", "She has 3+4=7 #### 7")
    assert not answer_matches("the answer is 8", "#### 7")
    assert answer_matches("1,000 in total", "#### 1000")
    assert not answer_matches("", "five")


@pytest.mark.slow
def test_exact_match_task_runs(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, "em.yaml", """model: {name: gradience/tiny-llama}
task: {type: causal_lm, dataset: gradience/tiny-stories, exact_match: true, max_new_tokens: 2,
       max_train_samples: 200, max_eval_samples: 12}
train: {max_steps: 8, eval_steps: 8, lr: 0.003}
lora: {probe_r: 4, alpha: 8}
compression: {allowed_ranks: [1, 2, 4]}
arms: [truncate_median]
""")
    assert main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "em")]) == 0
    bench = json.loads((tmp_path / "em" / "bench.json").read_text())
    assert bench["task"]["metric"] == "exact_match" and bench["task"]["n_eval_items"] == 12
    assert 0.0 <= bench["probe"]["per_seed"][0]["metric"] <= 1.0


@pytest.mark.slow
def test_local_model_directory_is_loaded_like_a_hub_checkpoint(toy_smoke: tuple[Path, dict],
                                                                tmp_path: Path) -> None:
    """The non-built-in path: AutoTokenizer / AutoModelForSequenceClassification on a local directory."""
    out, _ = toy_smoke
    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"{w} film", "label": int(w in ('good', 'great'))} for w in ('good', 'great', 'bad', 'awful') * 30]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _tiny_config(tmp_path, "local.yaml", f"""model: {{name: "{out / 'base'}"}}
task: {{dataset: "{data}"}}
train: {{max_steps: 6, eval_steps: 6, lr: 0.005}}
lora: {{probe_r: 4, alpha: 8, target_modules: [q_lin, v_lin]}}
compression: {{allowed_ranks: [1, 2, 4]}}
arms: [truncate_median]
""")
    assert main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "local")]) == 0
    bench = json.loads((tmp_path / "local" / "bench.json").read_text())
    assert bench["task"]["model"] == str(out / "base") and bench["task"]["n_eval_items"] == 24  # 20% held out
    adapter_cfg = json.loads((tmp_path / "local" / "seed_42" / "probe" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["q_lin", "v_lin"]


@pytest.mark.slow
def test_accelerate_launcher_runs_ddp_with_two_processes(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, "ddp.yaml", """train: {max_steps: 6, eval_steps: 6, lr: 0.005,
        per_device_train_batch_size: 8}
task: {max_train_samples: 128, max_eval_samples: 64}
lora: {probe_r: 4, alpha: 8}
compression: {allowed_ranks: [1, 2, 4]}
arms: [uniform:2]
""")
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "gradience.bench", "--config", str(cfg), "--output-dir", str(out),
                           "--launcher", "accelerate", "--num-processes", "2"],
                          capture_output=True, text=True, timeout=540,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in ("probe", "uniform_2"):
        records = [json.loads(line) for line in (out / "seed_42" / arm / "run.jsonl").read_text().splitlines()]
        assert records[0]["event"] == "run_start" and records[0]["meta"]["world_size"] == 2
        assert [r["event"] for r in records].count("run_start") == 1  # only rank 0 wrote
        assert records[-1]["event"] == "run_end" and records[-1]["status"] == "ok"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["config"]["runtime"]["launcher"] == "accelerate"
    assert bench["arms"][0]["per_seed"][0]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")


@pytest.mark.slow
def test_bench_report_page_opens_in_chromium(toy_smoke: tuple[Path, dict], tmp_path: Path) -> None:
    """report.html of the toy bench: the arms table with verdicts, Δ vs parameters, the UDR sidebar per arm."""
    from test_report_browser import _require_chromium, check_page, open_in_browser

    out, bench = toy_smoke
    html = (out / "report.html").read_text()
    assert 'id="bench"' in html and "Δ against parameters" in html
    for arm in bench["arms"]:
        assert arm["name"] in html
    assert f">{bench['verdict']}<" in html
    _require_chromium()
    result = open_in_browser(out / "report.html", tmp_path / "bench_report.png", tmp_path)
    check_page(result)
    assert result["sections"] == ["bench"] and result["sidebar"]
    assert result["svgs"] >= 2  # the Δ-vs-parameters plot and the sidebar's UDR histogram


def test_bench_report_escapes_names_from_the_config(toy_smoke: tuple[Path, dict], tmp_path: Path) -> None:
    from gradience.report import render_report

    _, bench = toy_smoke
    doc = json.loads(json.dumps(bench))
    doc["task"]["model"] = '<script>alert(1)</script>"onmouseover="x'
    doc["arms"][0]["label"] = "<img src=x onerror=alert(2)>"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    html = render_report(path)
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
